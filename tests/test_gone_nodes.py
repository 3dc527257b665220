"""Saying it when a machine goes away: `evo status` shows a lost node, since when, what of the
queue prefers it and when that falls back; `evo broker --notify CMD` runs the user's command
for a lost node, a job failed for good and a completed sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evo.broker import protocol as p
from evo.broker.cluster import Cluster, Rule
from evo.broker.desk import Desk
from evo.client import Client
from evo.events.schema import JobSpec
from tests.conftest import run_evo, wait_until
from tests.test_nodes import PY, joined, of, wait_for

CLUSTER = Cluster(wait_limit_s=30, rules=[
    Rule(model_type="XGBoost", route_to=["gpu"], reason="GPU acceleration", wait_limit_s=100)])


def _gone(desk: Desk, name: str, now: float) -> dict:
    (row,) = [n for n in desk.handle(p.Status(), now).reply.nodes if n["node"] == name]
    return row


def test_status_says_since_when_a_node_is_lost_and_when_its_queue_falls_back():
    desk = Desk(cluster=CLUSTER)
    now = 1000.0
    for name, labels in (("gpu-1", ["gpu"]), ("gpu-2", ["gpu"]), ("laptop", ["cpu"])):
        desk.handle(p.Join(node=name, cpus=4, mem_gb=8, slots=1, labels=labels,
                           heartbeat_s=2.0), now, mono=0.0)
    long = desk.handle(p.Submit(spec=JobSpec(command=["x"], model_type="XGBoost")), now).reply.job_id
    (g,) = desk.handle(p.Ready(node="gpu-2", max_leases=1), now, mono=0.0).reply.leases
    assert g.job_id == long  # gpu-2 is busy from here on
    for i in range(3):
        desk.handle(p.Submit(spec=JobSpec(command=["x", str(i)], model_type="XGBoost")), now + 1)
    desk.handle(p.Submit(spec=JobSpec(command=["y"], model_type="GLM")), now + 1)
    for t in (2.0, 4.0, 6.0):  # gpu-2 and the laptop beat; gpu-1 is silent
        desk.handle(p.Heartbeat(node="gpu-2", running=[(long, g.lease_epoch)]), now + t, mono=t)
        desk.handle(p.Heartbeat(node="laptop"), now + t, mono=t)
    desk.tick(now + 7, 7.0)
    row = _gone(desk, "gpu-1", now + 10)
    assert row["gone"] == "lost" and row["since"] == now + 7 and not row["alive"]
    # three XGBoost jobs prefer it; gpu-2 (busy) is still there, so they wait the rule's
    # 100 s from when they were queued (now + 1) before another node may take them
    assert row["prefer"] == 3 and row["fall_back_s"] == 91.0
    desk.handle(p.Leave(node="gpu-2"), now + 11, mono=11.0)
    row = _gone(desk, "gpu-1", now + 12)
    # no gpu node left (and gpu-2's job queued again): they may now
    assert row["prefer"] == 4 and row["fall_back_s"] == 0.0
    assert _gone(desk, "gpu-2", now + 12)["gone"] == "left"


def test_evo_status_prints_the_lost_node(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    n = nodes(home, "gpu-1", "--labels", "gpu", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, joined("gpu-1"))
        n.kill()
        wait_for(c, lambda evs: of(evs, "NodeLost"), timeout=20)
        c.submit(["true"], model_type="XGBoost")
    r = run_evo("status", home=home, env={"COLUMNS": "200"})  # one line per notice
    assert r.returncode == 0, r.stderr
    assert "gpu-1 lost at" in r.stdout and "1 queued job(s) prefer it" in r.stdout
    assert "fall back to other nodes now" in r.stdout
    shown = json.loads(run_evo("status", "--json", home=home).stdout)
    (row,) = shown["nodes"]
    assert row["gone"] == "lost" and row["prefer"] == 1


def test_notify_runs_the_users_command_with_each_event_on_stdin(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    told = tmp_path / "told"
    told.mkdir()
    hook = tmp_path / "hook.py"
    hook.write_text("import sys, uuid, pathlib\n"
                    f"pathlib.Path({str(told)!r}, uuid.uuid4().hex).write_bytes(sys.stdin.buffer.read())\n")
    b = pbroker(home, "--notify", f"{sys.executable} {hook}")
    n = nodes(home, "n1", "--slots", "1")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: tiny\ncommand: ['{PY}', -c, 'import evo; evo.result(loss={{x}})']\n"
                     "space: {x: [1, 2]}\nmetric: loss\n")
    with Client(b.address) as c:
        wait_for(c, joined("n1"))
        bad = c.submit([PY, "-c", "raise SystemExit(3)"], max_attempts=1)
        assert run_evo("sweep", str(sweep), "--wait", home=home, cwd=tmp_path).returncode == 0
        wait_for(c, lambda evs: any(e.final for e in of(evs, "JobFailed", bad)))
        n.kill()
        wait_for(c, lambda evs: of(evs, "NodeLost"), timeout=20)

    def kinds() -> list[str]:
        return sorted(json.loads(f.read_text())["type"] for f in told.iterdir() if f.stat().st_size)

    wait_until(lambda: kinds() == ["JobFailed", "NodeLost", "SweepCompleted"], 20,
               "the three notices")
    failed = [json.loads(f.read_text()) for f in told.iterdir()
              if json.loads(f.read_text())["type"] == "JobFailed"][0]
    assert failed["job_id"] == bad and failed["final"] is True


def test_a_notify_command_that_is_not_there_is_refused_at_start(tmp_path):
    r = run_evo("broker", "--notify", "no-such-program --x", home=tmp_path / "h")
    assert r.returncode == 2 and "no program 'no-such-program'" in r.stderr
    assert not Path(tmp_path / "h" / "broker.json").exists()
