"""Warm workers and shipped output, with a real broker and node processes."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
import subprocess

from evo.client import Client, make_spec
from tests.conftest import ROOT, evo_cmd, run_evo
from tests.test_nodes import cluster, done, wait_for  # noqa: F401 - the fixture is used by name


def _started(events, job):
    return [e for e in events if type(e).__name__ == "JobStarted" and e.job_id == job]


def _completed(events, job):
    return next(e for e in events if type(e).__name__ == "JobCompleted" and e.job_id == job)


def test_callables_reuse_a_warm_worker_and_isolate_gets_a_fresh_one(cluster):
    home, b, node = cluster
    node("solo", "--slots", "1")
    with Client(b.address) as c:
        ids = [c.submit(callable="tests.jobs:whoami", params={"tag": str(i)}) for i in range(4)]
        iso = [c.submit(callable="tests.jobs:whoami", params={"tag": "iso"}, isolate=True,
                        after=ids) for _ in range(2)]
        ck = c.submit(callable="tests.jobs:keep", params={"text": "epoch 3"}, after=iso)
        events = wait_for(c, lambda evs: all(done(j)(evs) for j in ids + iso + [ck]))
    ck_path = home / "nodes" / "solo" / "jobs" / ck / "checkpoints" / "state.txt"
    assert _completed(events, ck).artifacts["path"] == str(ck_path)
    assert ck_path.read_text() == "epoch 3"
    pids = {_completed(events, j).metrics["pid"] for j in ids}
    assert len(pids) == 1, f"4 callables on one slot should share one warm worker, got {pids}"
    iso_pids = {_completed(events, j).metrics["pid"] for j in iso}
    assert len(iso_pids) == 2 and not iso_pids & pids
    # JobStarted names the worker's pid; every job runs where it was submitted from; warm
    # tasks make no attempt folders, while an isolated job gets one for its output
    assert {_started(events, j)[0].pid for j in ids} == pids
    here = str(Path.cwd())
    assert {_completed(events, j).artifacts["cwd"] for j in ids + iso} == {here}
    assert not (home / "nodes" / "solo" / "jobs" / ids[2]).exists()
    assert (home / "nodes" / "solo" / "jobs" / iso[0] / "attempt-1" / "stdout.log").exists()
    # each task's output is its own byte range of the worker's stdout, shipped to the broker
    for i, j in enumerate(ids):
        out = (home / "logs" / j / "attempt-1.stdout").read_text()
        assert out == f"running {i} in {int(next(iter(pids)))}\n"


def test_a_crashed_worker_is_replaced_and_the_job_retried(cluster, tmp_path):
    home, b, node = cluster
    node("solo", "--slots", "1")
    flag = tmp_path / "crashed.flag"
    with Client(b.address) as c:
        job = c.submit(callable="tests.jobs:crash_once", params={"flag": str(flag)})
        bad = c.submit(callable="tests.jobs:boom", max_attempts=1, after=[job])
        wait_for(c, done(bad), timeout=40)
        after = c.submit(callable="tests.jobs:whoami")
        events = wait_for(c, lambda evs: done(job)(evs) and done(after)(evs), timeout=40)
    failed = [e for e in events if type(e).__name__ == "JobFailed" and e.job_id == job]
    assert len(failed) == 1 and "warm worker" in failed[0].error and "SIGKILL" in failed[0].error
    assert _completed(events, job).metrics == {"ok": 1.0}
    first, second = (s.pid for s in _started(events, job))
    assert first != second  # the dead worker was replaced
    # a job that raises fails with its exception (the worker survives it) ...
    err = next(e for e in events if type(e).__name__ == "JobFailed" and e.job_id == bad)
    assert "ValueError: bad hyperparameter: depth=-1" in err.error and err.final
    # ... and the traceback is in its stderr; the next job runs in the same worker
    err_log = home / "logs" / bad / "attempt-1.stderr"
    assert "Traceback" in err_log.read_text() and "depth=-1" in err_log.read_text()
    assert _started(events, after)[0].pid == _started(events, bad)[0].pid


def test_logs_are_shipped_to_the_broker_and_outlive_the_node(cluster):
    home, b, node = cluster
    n = node("solo", "--slots", "1")
    with Client(b.address) as c:
        job = c.submit(callable="tests.jobs:chatty", params={"lines": 3})
        cmd = c.submit(["python3", "-c", "import sys; print('to out'); print('to err', file=sys.stderr); sys.exit(3)"],
                       max_attempts=2)
        wait_for(c, lambda evs: done(job)(evs) and done(cmd)(evs))
    n.kill()
    shutil.rmtree(home / "nodes")  # the node's copy is gone: the broker's remains
    r = run_evo("logs", job, home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "line 0\nline 1\nline 2\n"
    assert "warn 0\nwarn 1\nwarn 2\n" in r.stderr
    r = run_evo("logs", cmd, "--stream", "stdout", home=home)
    assert r.stdout == "to out\n"
    r1 = run_evo("logs", cmd, "--attempt", "1", "--stream", "stderr", home=home)
    assert r1.stderr.strip() == "to err"
    assert (home / "logs" / cmd / "attempt-2.stdout").read_text() == "to out\n"


def test_logs_follow_prints_lines_as_they_come_and_ends_with_the_job(cluster):
    home, b, node = cluster
    node("solo", "--slots", "1")
    with Client(b.address) as c:
        job = c.submit(callable="tests.jobs:chatty", params={"lines": 6, "delay": 0.4})
        wait_for(c, lambda evs: _started(evs, job))
        env = dict(os.environ, EVO_HOME=str(home), PYTHONPATH=str(ROOT))
        proc = subprocess.run(evo_cmd("logs", job, "--follow", "--stream", "stdout"),
                              capture_output=True, text=True, env=env, timeout=30)
        events = wait_for(c, done(job))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(f"line {i}\n" for i in range(6))
    assert _completed(events, job)


def test_logs_of_an_unknown_job_is_an_error(cluster):
    home, b, node = cluster
    r = run_evo("logs", "j999", home=home)
    assert r.returncode == 2 and "no job 'j999'" in r.stderr


def test_short_trials_are_leased_ahead_but_never_run_past_the_slots(cluster):
    home, b, node = cluster
    node("solo", "--slots", "1", "--lease-ahead", "3")
    with Client(b.address) as c:
        ids = c.submit_many([make_spec(callable="tests.jobs:whoami") for _ in range(40)])
        events = wait_for(c, lambda evs: all(done(j)(evs) for j in ids))
    leased = [e for e in events if type(e).__name__ == "JobLeased"]
    assert any(e.ahead for e in leased), "short trials should be leased ahead"
    running: set[str] = set()
    most = 0
    for e in events:
        name = type(e).__name__
        if name == "JobStarted":
            running.add(e.job_id)
            most = max(most, len(running))
        elif name in ("JobCompleted", "JobFailed"):
            running.discard(e.job_id)
    assert most == 1  # one slot: one job at a time, however many were leased ahead
    completed = [e.job_id for e in events if type(e).__name__ == "JobCompleted"]
    assert sorted(completed) == sorted(ids)  # each exactly once


def test_warm_workers_die_with_their_node(cluster):
    import psutil

    home, b, node = cluster
    n = node("solo", "--slots", "2")
    with Client(b.address) as c:
        job = c.submit(callable="tests.jobs:whoami")
        wait_for(c, done(job))
    kids = psutil.Process(n.proc.pid).children()
    kinds = sorted(" ".join(k.cmdline()).split("-m ")[1].split()[0] for k in kids)
    assert kinds == ["evo.nodes.keeper", "evo.nodes.worker", "evo.nodes.worker"]
    n.signal(signal.SIGKILL)  # the node alone: its workers live in sessions of their own
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, f"workers or the keeper outlived their node: {[w.pid for w in alive]}"
