"""Keys: a broker with keys refuses peers without one, with an unknown or revoked one, and a
key acting as another node; the key a machine needs is one file; two machines for real in
network namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evo.broker import protocol as p
from evo.client import BrokerUnavailable, Client, CommandRejected
from evo.keys import has_keys, init, issue, revoke
from tests.conftest import ROOT, evo_cmd, run_evo, wait_until
from evo.nodes.link import KeyRefused
from tests.fakenode import FakeNode


def test_keys_are_made_listed_issued_and_revoked_and_mistakes_exit_2(tmp_path):
    home = tmp_path / "home"
    r = run_evo("keys", "issue", "laptop", home=home, cwd=tmp_path)
    assert r.returncode == 2 and "run `evo keys init` first" in r.stderr
    assert run_evo("keys", "init", home=home).returncode == 0
    assert has_keys(home) and oct((home / "keys" / "broker.json").stat().st_mode & 0o777) == "0o600"
    r = run_evo("keys", "init", home=home)
    assert r.returncode == 2 and "keys already exist" in r.stderr
    r = run_evo("keys", "issue", "laptop", home=home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = json.loads((tmp_path / "laptop.key").read_text())
    assert key["name"] == "laptop" and key["broker_public"] and key["secret"]
    assert oct((tmp_path / "laptop.key").stat().st_mode & 0o777) == "0o600"
    assert run_evo("keys", "issue", "laptop", home=home, cwd=tmp_path).returncode == 2
    r = run_evo("keys", "issue", "../x", home=home, cwd=tmp_path)
    assert r.returncode == 2 and "key name '../x'" in r.stderr
    listed = run_evo("keys", "list", home=home).stdout.split("\n")
    assert [line.split()[:2] for line in listed if line] == [["laptop", "authorized"],
                                                            ["local", "authorized"]]
    assert run_evo("keys", "revoke", "laptop", home=home).returncode == 0
    r = run_evo("keys", "revoke", "laptop", home=home)
    assert r.returncode == 2 and "no authorized key 'laptop'" in r.stderr
    assert "laptop                   revoked" in run_evo("keys", "list", home=home).stdout
    r = run_evo("--key-file", str(tmp_path / "nope.key"), "status", home=home)
    assert r.returncode == 2 and "no such key file" in r.stderr


def test_a_broker_with_keys_lets_in_only_authorized_keys_checked_on_every_message(tbroker, tmp_path):
    home = tmp_path / "home"
    init(home)
    n1 = issue(home, "n1", tmp_path / "n1.key")
    other = tmp_path / "other"
    init(other)
    stranger = issue(other, "n1", tmp_path / "stranger.key")  # same name, another broker's
    b = tbroker(home, bind="tcp://0.0.0.0:*")  # every interface: allowed with keys
    address = f"tcp://127.0.0.1:{b.address.rsplit(':', 1)[1]}"
    with Client(address, home=home) as c:  # the machine's own key, found in its home
        job = c.submit(["true"])
        assert c.sql("SELECT count(*) FROM jobs").column(0).to_pylist() == [1]
        assert next(iter(c.follow(1, idle_s=0.1))).seq == 1  # the relay, through the gate
    bare = Client(address, home=tmp_path / "nokeys", timeout_s=1.0)
    with pytest.raises(BrokerUnavailable):
        bare.status()
    bare.close()
    with Client(address, home=tmp_path / "nokeys", key=stranger, timeout_s=30.0) as c:
        with pytest.raises(CommandRejected, match="refuses key 'n1'") as refused:
            c.status()  # told in the handshake, long before the timeout
        assert refused.value.exit_code == 2
    node = FakeNode(address, "n2", key=str(n1))  # a key cannot act as another node
    with pytest.raises(CommandRejected, match="key 'n1' cannot act as node 'n2'"):
        node.join()
    node.close()
    node = FakeNode(address, "n1", key=str(n1))
    node.join()
    node.pump(lambda: job in node.started)
    local, mine = _subscriber(home / "keys" / "local.json", b), _subscriber(n1, b)
    with Client(address, home=home) as c:
        c.submit(["before"])
        wait_until(lambda: local.poll(0) and mine.poll(0), 10, "both subscribers fed")
        local.recv_multipart(), mine.recv_multipart()
        with Client(address, key=n1) as watcher:
            watcher.status()
            revoke(home, "n1")
            # connected already: refused from the next message on
            wait_until(lambda: _refused(watcher), 10, "the revoked key refused")
        with pytest.raises(KeyRefused, match="n1 is not authorized"):
            node.pump(lambda: False, timeout_s=5)
        # the relay shook hands again without it: the next batch reaches only the other
        c.submit(["after"])
        wait_until(lambda: local.poll(0), 10, "the authorized subscriber fed again")
        # what reached the revoked one was sent before the revocation took hold (a node's
        # beat in between): never the batch after it
        from evo.events.codec import decode_batch

        seen = []
        while mine.poll(200):
            seen += decode_batch(mine.recv_multipart()[1])
        assert not [e for e in seen if getattr(getattr(e, "spec", None), "command", None) == ["after"]]
    local.close(0)
    mine.close(0)
    node.close()


def _subscriber(key_file: Path, b):  # noqa: ANN001, ANN202 - a zmq SUB socket
    import zmq

    from evo.keys import load_key

    key = load_key(key_file)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = (
        key.broker_public, key.public, key.secret)
    sub.setsockopt(zmq.SUBSCRIBE, p.RELAY_TOPIC)
    sub.connect(b.broker.events_endpoint.replace("0.0.0.0", "127.0.0.1"))
    return sub


def _refused(c: Client) -> bool:
    try:
        c.status()
    except CommandRejected as exc:
        return exc.code == "unauthorized"
    return False


# --- two machines ---------------------------------------------------------------------------


def test_a_node_on_a_second_machine_runs_a_job_with_one_key_file(two_machines, tmp_path):
    ns_a, ns_b, _ = two_machines
    home, far = tmp_path / "broker-home", tmp_path / "node-home"
    init(home)
    key = issue(home, "workstation", tmp_path / "workstation.key")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EVO_BROKER", None)
    procs = []
    try:
        broker = subprocess.Popen(["ip", "netns", "exec", ns_a, *evo_cmd(
            "--home", str(home), "broker", "--bind", "tcp://10.77.0.1:5555")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "b.log", "wb"))
        procs.append(broker)
        wait_until(lambda: (home / "broker.json").exists(), 20, "the broker on machine A")
        # a job submitted on A from a folder that B does not have (it is moved away before B
        # runs it): its files travel through the broker's store, over CURVE
        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "train.py").write_text("print('read on B:', open('words.txt').read())")
        (proj / "words.txt").write_text("from A")
        out = subprocess.run(["ip", "netns", "exec", ns_a, *evo_cmd(
            "--home", str(home), "submit", "--", sys.executable, "train.py")], env=env,
            capture_output=True, text=True, timeout=60, cwd=proj)
        assert out.returncode == 0, out.stderr
        carried = out.stdout.strip()
        proj.rename(tmp_path / "gone")
        node = subprocess.Popen(["ip", "netns", "exec", ns_b, *evo_cmd(
            "--home", str(far), "--key-file", str(key), "node", "--broker", "tcp://10.77.0.1:5555",
            "--slots", "1", "--heartbeat-s", "0.5")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "n.log", "wb"))
        procs.append(node)
        out = subprocess.run(["ip", "netns", "exec", ns_b, *evo_cmd(
            "--home", str(far), "--key-file", str(key), "submit", "--broker", "tcp://10.77.0.1:5555",
            "--", sys.executable, "-c", "print('on B')")], env=env, capture_output=True,
            text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()

        def done(job: str) -> bool:
            r = subprocess.run(["ip", "netns", "exec", ns_a, *evo_cmd(
                "--home", str(home), "show", job, "--json")], env=env, capture_output=True,
                text=True, timeout=60)
            shown = json.loads(r.stdout) if r.returncode == 0 else {}
            return shown.get("state") == "completed" and shown.get("node") == "workstation"

        wait_until(lambda: done(job) and done(carried), 60, "the jobs completed on machine B")
        r = subprocess.run(["ip", "netns", "exec", ns_a, *evo_cmd(
            "--home", str(home), "logs", carried)], env=env, capture_output=True, text=True,
            timeout=60)
        assert "read on B: from A" in r.stdout, r.stdout + r.stderr
        # without the key, machine B gets nothing from the broker
        r = subprocess.run(["ip", "netns", "exec", ns_b, *evo_cmd(
            "--home", str(far), "status", "--broker", "tcp://10.77.0.1:5555")],
            env={**env, "EVO_TIMEOUT_S": "2"}, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "no answer from the broker" in r.stderr
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
