"""Checkpoints and outputs come home: uploaded while the job runs, restored for a retry on
another machine, pulled to the user's. Real broker and node processes, each node with a home
of its own (another machine's), the job's folder moved away so that only the store has it."""

from __future__ import annotations

import json

from evo.client import Client
from evo.content import decode_manifest
from evo.nodes.cache import Cache
from evo.nodes.uploads import snapshot
from tests.conftest import run_evo
from tests.test_nodes import PY, done, of, wait_for

TRAIN = """\
import json, os, time, evo
ck = evo.checkpoint_dir() / "state.json"
start, state = 0, 1.0
if os.environ.get("EVO_RESUME_STEP"):
    saved = json.loads(ck.read_text())
    start, state = saved["epoch"], saved["state"]
    print("resumed at", start, "step", os.environ["EVO_RESUME_STEP"])
for epoch in range(start + 1, 6):
    state = state * 1.5 + epoch  # the training: deterministic
    ck.write_text(json.dumps({"epoch": epoch, "state": state}))
    evo.checkpoint("state.json", step=epoch)
    evo.report(step=epoch, loss=1 / state)
    if epoch == 3 and os.environ["EVO_NODE"] == "a":
        time.sleep(600)  # killed here, with its node
evo.result(final=state)
"""


def test_a_job_killed_with_its_node_resumes_on_another_from_its_last_checkpoint(
        pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text(TRAIN)
    r = run_evo("submit", "--", PY, "train.py", home=home, cwd=proj)
    job = r.stdout.strip()
    a = nodes(tmp_path / "machine-a", "a", "--broker", b.address, "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, lambda evs: any(e.step == 3 and e.digest for e in of(evs, "Checkpointed", job)))
        a.kill()  # the node, its keeper and the job: kill -9
        proj.rename(tmp_path / "moved")  # machine b has neither the folder nor a's files
        nodes(tmp_path / "machine-b", "b", "--broker", b.address, "--slots", "1")
        events = wait_for(c, done(job), timeout=60)
        (tmp_path / "moved").rename(proj)
        again = c.submit([PY, "train.py"], workdir=str(proj))  # the same, never interrupted
        events = wait_for(c, done(again), timeout=60)
    (resumed,) = of(events, "JobCompleted", job)
    (whole,) = of(events, "JobCompleted", again)
    assert resumed.metrics["final"] == whole.metrics["final"]
    leases = of(events, "JobLeased", job)
    assert [e.node for e in leases][-1] == "b" and leases[0].node == "a"
    steps = [e.step for e in of(events, "Progress", job) if e.lease_epoch == leases[-1].seq]
    assert steps == [4, 5], "the retry starts after the checkpoint of step 3"
    out = run_evo("logs", job, home=home)
    assert "resumed at 3 step 3" in out.stdout
    assert "checkpoint at step 3 restored" in out.stderr


def test_outputs_come_home_and_evo_pull_gets_them(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "make.py").write_text(
        "import os, evo\n"
        "os.makedirs('out', exist_ok=True); os.makedirs('logs', exist_ok=True)\n"
        "open('out/model.txt', 'w').write('weights')\n"
        "open('logs/a.log', 'w').write('log a'); open('logs/b.log', 'w').write('log b')\n"
        "evo.artifact('out/model.txt')\n"
        "(evo.checkpoint_dir() / 'c.bin').write_bytes(b'ckpt')\n"
        "evo.checkpoint('c.bin', step=1)\n"
        "evo.checkpoint('ghost.bin', step=2)  # never written: not sent home, said so\n")
    r = run_evo("submit", "--output", "logs/*.log", "--", PY, "make.py", home=home, cwd=proj)
    job = r.stdout.strip()
    proj.rename(tmp_path / "moved")
    nodes(tmp_path / "far", "far", "--broker", b.address, "--slots", "1")
    with Client(b.address) as c:
        events = wait_for(c, done(job))
    (completed,) = of(events, "JobCompleted", job)
    assert set(completed.outputs) == {"out/model.txt", "logs/a.log", "logs/b.log"}
    ckpts = {e.path: e for e in of(events, "Checkpointed", job)}
    assert ckpts["c.bin"].digest and ckpts["c.bin"].size == 4
    assert not ckpts["ghost.bin"].digest  # a failed upload is a warning, the job completed
    assert "checkpoint ghost.bin not sent home" in run_evo("logs", job, home=home).stderr
    dest = tmp_path / "pulled"
    r = run_evo("pull", job, "--to", str(dest), "--checkpoint", home=home)
    assert r.returncode == 0, r.stderr
    assert (dest / "out" / "model.txt").read_text() == "weights"
    assert (dest / "logs" / "b.log").read_text() == "log b"
    assert (dest / "checkpoints" / "c.bin").read_bytes() == b"ckpt"
    none = run_evo("pull", job.replace("j", "x"), home=home)
    assert none.returncode == 2 and "no job" in none.stderr


def test_a_snapshot_is_taken_at_once_and_lists_a_folder(tmp_path):
    base = tmp_path / "ck"
    (base / "epoch3").mkdir(parents=True)
    (base / "epoch3" / "w.bin").write_bytes(b"w" * 10)
    (base / "epoch3" / "opt.bin").write_bytes(b"o" * 5)
    cache = Cache(tmp_path / "cache", 1 << 20)
    manifest, where = snapshot(cache, base, ("epoch3",))
    (base / "epoch3" / "w.bin").write_bytes(b"changed")  # the job goes on writing
    assert [(e.path, e.size) for e in manifest.files] == [("epoch3/opt.bin", 5), ("epoch3/w.bin", 10)]
    assert sorted(p.read_bytes() for p in where.values()) == [b"o" * 5, b"w" * 10]
    assert decode_manifest(json.dumps({"files": [[e.path, e.digest, e.size, e.exe]
                                                 for e in manifest.files]}).encode()) == manifest
