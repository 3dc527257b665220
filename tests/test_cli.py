"""The `evo` command line as a user runs it: real processes, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import time

from evo.client import Client
from evo.events.schema import JobSpec
from tests.conftest import evo_cmd, run_evo


def test_submit_tail_status_cancel(pbroker, tmp_path):
    home = tmp_path / "home"
    pbroker(home)
    r = run_evo("submit", "--model-type", "XGBoost", "--gpus", "1", "--vram-gb", "8",
                "--priority", "5", "--tag", "grid=xgb", "--max-attempts", "2", "--key", "k1",
                "--", "python", "train.py", "--lr", "0.1", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "j1"
    r = run_evo("submit", "--model-type", "XGBoost", "--gpus", "1", "--vram-gb", "8",
                "--priority", "5", "--tag", "grid=xgb", "--max-attempts", "2", "--key", "k1",
                "--", "python", "train.py", "--lr", "0.1", home=home)
    assert r.stdout.strip() == "j1" and "submitted before" in r.stderr
    r = run_evo("submit", "--key", "k1", "--", "python", "train.py", home=home)
    assert r.returncode == 2 and "belongs to job j1" in r.stderr
    r = run_evo("tail", "--json", home=home)
    (ev,) = [json.loads(line) for line in r.stdout.splitlines()]
    spec = ev["spec"]
    assert ev["type"] == "JobSubmitted" and spec["command"][-1] == "0.1"
    assert spec["resources"] == {"cpus": 1.0, "mem_gb": 0.0, "gpus": 1, "vram_gb": 8.0}
    assert spec["priority"] == 5 and spec["tags"] == {"grid": "xgb"} and spec["max_attempts"] == 2
    r = run_evo("status", home=home)
    assert r.returncode == 0 and "queued 1" in r.stdout and "j1" in r.stdout
    r = run_evo("cancel", "j1", home=home)
    assert r.returncode == 0 and "j1" in r.stdout
    r = run_evo("tail", home=home)
    lines = r.stdout.splitlines()
    assert [ln.split()[2] for ln in lines] == ["JobSubmitted", "CancelRequested", "JobCancelled"]


def test_bad_input_exits_2_with_a_message(pbroker, tmp_path):
    home = tmp_path / "home"
    pbroker(home)
    cases = [
        (["submit", "--cpus", "-2", "--", "x"], "$.spec.resources.cpus"),
        (["submit", "--gpus", "0", "--vram-gb", "4", "--", "x"], "vram_gb"),
        (["submit"], "give a command"),
        (["submit", "--tag", "novalue", "--", "x"], "--tag 'novalue'"),
        (["submit", "--trainer", "nope"], "unknown trainer"),
        (["submit", "--after", "j77", "--", "x"], "$.spec.after[0]"),
        (["cancel", "j5"], "no job or sweep"),
        (["submit", "--cpus", "lots", "--", "x"], "--cpus"),
    ]
    for args, needle in cases:
        r = run_evo(*args, home=home)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    # a NUL byte cannot come through argv, but it can through a sweep file
    spec = tmp_path / "nul.yaml"
    spec.write_text('name: nul\ncommand: ["echo", "a\\0b", "{x}"]\nspace: {x: [1, 2]}\n')
    r = run_evo("sweep", str(spec), home=home)
    assert r.returncode == 2 and "$.jobs[0].command[1]: a NUL byte" in r.stderr, r.stderr
    assert run_evo("tail", home=home).stdout == ""


def test_no_broker_is_a_clear_error(tmp_path):
    r = run_evo("submit", "--", "x", home=tmp_path / "nohome")
    assert r.returncode == 1 and "no broker" in r.stderr and "evo up" in r.stderr
    r = run_evo("status", "--broker", "127.0.0.1:1", home=tmp_path, env={"EVO_TIMEOUT_S": "1"})
    assert r.returncode == 1 and "no answer" in r.stderr


def test_tail_reads_the_log_when_no_broker_runs(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    with Client(b.address) as c:
        c.submit_many([JobSpec(command=["x", str(i)]) for i in range(40)])
    b.stop()
    r = run_evo("tail", "--from", "31", home=home)
    assert r.returncode == 0, r.stderr
    assert [int(ln.split()[0]) for ln in r.stdout.splitlines()] == list(range(31, 41))


def test_late_tail_follow_sees_every_event_once(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    with Client(b.address) as c:
        c.submit_many([JobSpec(command=["early", str(i)]) for i in range(200)])
        proc = subprocess.Popen(evo_cmd("--home", str(home), "tail", "--follow"),
                                stdout=subprocess.PIPE, text=True)
        try:
            for i in range(10):
                c.submit_many([JobSpec(command=["live", str(i), str(k)]) for k in range(10)])
            seqs = []
            deadline = time.monotonic() + 30
            while len(seqs) < 300 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                seqs.append(int(line.split()[0]))
        finally:
            proc.terminate()
            proc.wait(10)
    assert seqs == list(range(1, 301))


def test_an_internal_error_is_one_line_unless_debugging(tmp_path):
    import os
    import sys

    code = ("import sys; from evo.cli import app\n"
            "@app.app.command()\ndef boom() -> None:\n    {}['missing']\n"
            "sys.argv = ['evo', 'boom']; app.main()\n")
    env = {k: v for k, v in os.environ.items() if k != "EVO_DEBUG"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("evo: internal error: KeyError: 'missing' at <string>:4")
    assert "EVO_DEBUG=1" in r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "EVO_DEBUG": "1"}, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr


def test_after_a_broker_is_killed_commands_read_the_files_at_once(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    j = run_evo("submit", "--", "true", home=home).stdout.strip()
    b.kill()  # kill -9: broker.json stays behind, naming a pid that is gone
    assert (home / "broker.json").exists()
    slow = {"EVO_TIMEOUT_S": "600"}  # were the stale address tried, these would hang
    r = run_evo("tail", home=home, env=slow)
    assert r.returncode == 0 and "JobSubmitted" in r.stdout and j in r.stdout, r.stderr
    r = run_evo("sql", "SELECT job_id, state FROM jobs", "--format", "csv", home=home, env=slow)
    assert r.returncode == 0 and r.stdout.split() == ["job_id,state", f"{j},queued"], r.stderr
    r = run_evo("submit", "--", "true", home=home, env=slow)
    assert r.returncode == 1 and "is gone" in r.stderr, r.stderr
