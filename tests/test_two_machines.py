"""Two machines for real: network namespaces joined by a veth pair, keys, and a node that
cannot see the client's folder (its own mount namespace has a tmpfs over it), so a sweep's
code and data can reach it only through the broker's store, over CURVE."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from evo.keys import init, issue, revoke
from tests.conftest import ROOT, evo_cmd, wait_until

MARK = "zebra-7731"  # in the script, the data and the sweep's parameters: never on the wire


def _sweep_folder(client: Path) -> None:
    (client / "data").mkdir(parents=True)
    (client / "data" / "points.csv").write_text(f"x\n1\n2\n3\n# {MARK}-data\n")
    (client / "train.py").write_text(
        "import sys, evo\n"
        f"TAG = '{MARK}-code'\n"
        "xs = [float(l) for l in open('data/points.csv') if l.strip() and l[0].isdigit()]\n"
        "lr = float(sys.argv[2])\n"
        "print(TAG, sys.argv[4], 'sum', sum(xs))\n"
        "evo.result(score=sum(xs) * lr)\n")
    (client / "sweep.yaml").write_text(
        "name: far\n"
        "command: [" + sys.executable + ", train.py, --lr, '{lr}', --tag, '{tag}']\n"
        "metric: score\nmode: max\n"
        f"space: {{lr: [0.5, 1.0, 2.0], tag: [{MARK}-param]}}\n")


def test_a_sweep_from_machine_b_runs_there_from_files_only_its_client_has(two_machines, tmp_path):
    ns_a, ns_b, dev_a = two_machines
    home, far, client, empty = (tmp_path / n for n in ("broker-home", "node-home", "client", "empty"))
    empty.mkdir()
    _sweep_folder(client)
    init(home)
    node_key = issue(home, "workstation", tmp_path / "workstation.key")
    user_key = issue(home, "laptop", tmp_path / "laptop.key")
    old_key = issue(home, "old-laptop", tmp_path / "old.key")
    revoke(home, "old-laptop")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EVO_BROKER", None)
    address = "tcp://10.77.0.1:5555"
    capture, ready = tmp_path / "veth.bin", tmp_path / "tap.ready"
    procs: list[subprocess.Popen] = []

    def on_b(*args: str, key: Path | None = user_key, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        keyed = ["--key-file", str(key)] if key is not None else []
        return subprocess.run(["ip", "netns", "exec", ns_b, *evo_cmd(
            "--home", str(tmp_path / "client-home"), *keyed, *args)], env=kw.pop("env", env),
            capture_output=True, text=True, timeout=timeout, **kw)

    try:
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable,
                                       str(ROOT / "tests" / "tap.py"), dev_a, str(capture),
                                       str(ready)]))
        wait_until(ready.exists, 20, "the tap on machine A's veth")
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns_a, *evo_cmd(
            "--home", str(home), "broker", "--bind", address)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "b.log", "wb")))
        wait_until(lambda: (home / "broker.json").exists(), 20, "the broker on machine A")
        # the node runs in an empty folder and cannot see the client's: a tmpfs hides it
        hide = 'mount -t tmpfs tmpfs "$0" && cd "$1" && shift && exec "$@"'
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns_b, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", hide, str(client), str(empty), *evo_cmd(
                 "--home", str(far), "--key-file", str(node_key), "node", "--broker", address,
                 "--slots", "2", "--heartbeat-s", "0.5")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "n.log", "wb")))
        r = on_b("sweep", "sweep.yaml", "--wait", "--broker", address, cwd=client)
        assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "n.log").read_text()
        shown = on_b("sql", "SELECT count(*) FILTER (WHERE state = 'completed'), "
                     "count(*) FILTER (WHERE node = 'workstation') FROM jobs", "--format", "csv",
                     "--broker", address)
        assert shown.stdout.split()[-1] == "3,3", shown.stdout + shown.stderr
        logs = on_b("logs", "j1", "--broker", address)
        assert f"{MARK}-code {MARK}-param sum 6.0" in logs.stdout, logs.stdout + logs.stderr
        assert f"it runs in a copy of those, {far / 'cache' / 'trees'}" in logs.stderr  # (the
        # node sees an empty folder at the client's path: the files there differ)
        # no key, and a revoked key, get nothing
        refused = on_b("status", "--broker", address, key=None, timeout=60,
                       env={**env, "EVO_TIMEOUT_S": "3"})
        assert refused.returncode == 1 and "no answer from the broker" in refused.stderr
        refused = on_b("status", "--broker", address, key=old_key, timeout=60)
        assert refused.returncode == 2 and "refuses key 'old-laptop'" in refused.stderr
        # the tap sees plain bytes when there are some: a datagram sent in the clear
        subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c",
                        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto("
                        "b'plain-canary', ('10.77.0.1', 9))"], check=True)
        wait_until(lambda: b"plain-canary" in capture.read_bytes(), 20, "the canary in the capture")
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    wire = capture.read_bytes()
    assert len(wire) > 20_000, "the sweep's traffic went over the veth"
    assert MARK.encode() not in wire, "a job's code, data or parameter crossed in plain text"
    assert b"train.py" not in wire
