"""Nodes, leases and execution with real processes on loopback: a broker and node daemons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evo.client import Client
from tests.conftest import ROOT, evo_cmd, wait_until

HB = "0.3"  # heartbeat seconds: leases expire after ~0.9 s of silence


class NodeProc:
    def __init__(self, home: Path, name: str, *args: str) -> None:
        self.name = name
        self.log = open(home / f"node-{name}.log", "wb")  # noqa: SIM115
        env = dict(os.environ, EVO_HOME=str(home), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(evo_cmd("node", "--name", name, "--heartbeat-s", HB, *args),
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def cluster(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    nodes: list[NodeProc] = []

    def node(name: str, *args: str) -> NodeProc:
        n = NodeProc(home, name, *args)
        nodes.append(n)
        return n

    yield home, b, node
    for n in nodes:
        n.signal(signal.SIGCONT)
        n.kill()


def wait_for(client: Client, pred, timeout: float = 30.0):
    """Events so far, once ``pred(events)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        events = list(client.read_all(1))
        if pred(events):
            return events
        if time.monotonic() > deadline:
            kinds = [(e.seq, type(e).__name__, getattr(e, "job_id", getattr(e, "node", ""))) for e in events]
            raise AssertionError(f"timed out; events: {kinds[-40:]}")
        time.sleep(0.05)


def of(events, kind, job=None):
    return [e for e in events if type(e).__name__ == kind and (job is None or getattr(e, "job_id", None) == job)]


def joined(*names):
    return lambda evs: {e.node for e in of(evs, "NodeJoined")} >= set(names)


def done(job):
    return lambda evs: any(type(e).__name__ in ("JobCompleted", "JobCancelled") and e.job_id == job
                           for e in evs) or any(e.job_id == job and e.final for e in of(evs, "JobFailed"))


PY = sys.executable


def test_routing_devices_progress_and_callables(cluster):
    home, b, node = cluster
    node("laptop", "--labels", "cpu", "--slots", "2")
    node("gpu-1", "--labels", "gpu", "--gpus", "1", "--vram-gb", "24", "--slots", "2")
    with Client(b.address) as c:
        wait_for(c, joined("laptop", "gpu-1"))
        show = "import os; print('devices=' + os.environ['CUDA_VISIBLE_DEVICES'] + '.')"
        xgb = c.submit([PY, "-c", show], model_type="XGBoost", gpus=1)
        glm = c.submit([PY, "-c", show + "; print('epoch 1/2 loss=0.5 auc=0.61')"], model_type="GLM")
        fn = c.submit(callable="tests.jobs:square", params={"x": 3.0})
        rep = c.submit([PY, "-c", "import evo; evo.report(step=7, loss=0.25); evo.checkpoint('c.pt', step=7)"])
        events = wait_for(c, lambda evs: all(done(j)(evs) for j in (xgb, glm, fn, rep)))
    leased = {e.job_id: e for e in of(events, "JobLeased")}
    assert leased[xgb].node == "gpu-1" and leased[xgb].devices == [0]
    assert leased[glm].node == "laptop"
    assert all(of(events, "JobCompleted", j) for j in (xgb, glm, fn, rep))
    out = {j: (home / "nodes" / leased[j].node / "jobs" / j / f"attempt-{leased[j].attempt}" / "stdout.log").read_text()
           for j in (xgb, glm)}
    assert "devices=0." in out[xgb] and "devices=." in out[glm]
    (prog,) = of(events, "Progress", glm)
    assert prog.epoch == 1 and prog.metrics == {"loss": 0.5, "auc": 0.61}
    (rp,) = of(events, "Progress", rep)
    assert rp.step == 7 and rp.metrics == {"loss": 0.25}
    assert of(events, "Checkpointed", rep)[0].path == "c.pt"
    (fdone,) = of(events, "JobCompleted", fn)  # a callable's returned dict: metrics and artifacts
    assert fdone.metrics == {"y": 9.0} and fdone.artifacts == {"model": "square.json"}
    assert [e.step for e in of(events, "Progress", fn)] == [1, 2]
    started = of(events, "JobStarted", glm)[0]
    assert started.env["python"] and "packages" in started.env


def test_kill9_of_a_node_mid_job_expires_the_lease_and_the_job_completes_once_elsewhere(cluster):
    home, b, node = cluster
    a = node("a", "--labels", "cpu", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, joined("a"))
        job = c.submit([PY, "-c", "import time; time.sleep(1.0); print('done')"])
        running = wait_for(c, lambda evs: of(evs, "JobStarted", job))
        epoch = of(running, "JobStarted", job)[-1].lease_epoch  # a's lease may have lapsed once
        a.kill()
        wait_for(c, lambda evs: any(e.lease_epoch == epoch for e in of(evs, "LeaseExpired", job)),
                 timeout=10)
        node("b", "--labels", "cpu", "--slots", "1")
        events = wait_for(c, done(job))
    (completed,) = of(events, "JobCompleted", job)
    leases = of(events, "JobLeased", job)
    assert leases[-1].node == "b" and completed.lease_epoch == leases[-1].seq
    assert {e.node for e in leases[:-1]} == {"a"}
    assert any(e.node == "a" for e in of(events, "NodeLost"))


def test_sigstop_past_the_lease_then_sigcont_late_reports_are_rejected(cluster, tmp_path):
    home, b, node = cluster
    a = node("a", "--slots", "1")
    ended = tmp_path / "ended-on-a"
    code = (f"import os, time; time.sleep(1.5)\n"
            f"if os.environ['EVO_NODE'] == 'a': open({str(ended)!r}, 'w').close()")
    with Client(b.address) as c:
        wait_for(c, joined("a"))
        job = c.submit([PY, "-c", code])
        # on a loaded machine a's first lease may lapse before it starts and a lease it again:
        # the lease that matters is the one a is running when it is stopped
        running = wait_for(c, lambda evs: of(evs, "JobStarted", job))
        epoch = of(running, "JobStarted", job)[-1].lease_epoch
        a.signal(signal.SIGSTOP)
        wait_for(c, lambda evs: any(e.lease_epoch == epoch for e in of(evs, "LeaseExpired", job)),
                 timeout=10)
        node("b", "--slots", "1")
        wait_for(c, lambda evs: any(e.node == "b" for e in of(evs, "JobLeased", job)))
        wait_until(ended.exists, what="a's copy of the job to end while a is stopped")
        a.signal(signal.SIGCONT)
        # a's last word is its completed report of the old lease: once it is rejected, all is in
        events = wait_for(c, lambda evs: done(job)(evs) and any(
            r.report == "completed" and r.lease_epoch == epoch
            for r in of(evs, "ReportRejected", job)), timeout=20)
    (completed,) = of(events, "JobCompleted", job)
    b_lease = next(e for e in of(events, "JobLeased", job) if e.node == "b")
    assert completed.lease_epoch == b_lease.seq
    rej = of(events, "ReportRejected", job)
    assert rej and all(r.node == "a" and r.lease_epoch != b_lease.seq for r in rej)


def test_cancel_of_a_running_job_kills_its_process_group(cluster, tmp_path):
    home, b, node = cluster
    node("a", "--slots", "1")
    pidfile = tmp_path / "child.pid"
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    with Client(b.address) as c:
        wait_for(c, joined("a"))
        job = c.submit([PY, "-c", script])
        wait_for(c, lambda evs: of(evs, "JobStarted", job) and pidfile.exists() and pidfile.read_text())
        child = int(pidfile.read_text())
        c.cancel(job, "test")
        events = wait_for(c, done(job), timeout=15)
    assert of(events, "JobCancelled", job)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the job's child process survived the cancel")


def test_retries_follow_the_backoff_and_stop_at_max_attempts(cluster):
    home, b, node = cluster
    node("a", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, joined("a"))
        job = c.submit([PY, "-c", "import sys; sys.exit(3)"], max_attempts=3)
        events = wait_for(c, done(job), timeout=20)
    fails = of(events, "JobFailed", job)
    assert [f.final for f in fails] == [False, False, True] and fails[0].exit_code == 3
    retries = of(events, "RetryScheduled", job)
    assert [r.delay_s for r in retries] == [1.0, 2.0] and [r.attempt for r in retries] == [2, 3]
    leases = of(events, "JobLeased", job)
    for retry, lease in zip(retries, leases[1:]):
        assert lease.time >= retry.not_before - 0.01


def test_priority_and_dependency_order(cluster):
    home, b, node = cluster
    with Client(b.address) as c:
        low = c.submit([PY, "-c", "pass"])
        high = c.submit([PY, "-c", "pass"], priority=5)
        after_low = c.submit([PY, "-c", "pass"], after=[low], priority=9)
        node("a", "--slots", "1")
        events = wait_for(c, lambda evs: all(done(j)(evs) for j in (low, high, after_low)))
    order = [e.job_id for e in of(events, "JobStarted")]
    assert order == [high, low, after_low]


def test_queued_gpu_work_falls_back_when_the_gpu_node_is_lost(cluster):
    home, b, node = cluster
    gpu = node("gpu-1", "--labels", "gpu", "--gpus", "1", "--slots", "1")
    node("laptop", "--labels", "cpu", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, joined("gpu-1", "laptop"))
        gpu.kill()
        wait_for(c, lambda evs: of(evs, "NodeLost"), timeout=10)
        job = c.submit([PY, "-c", "pass"], model_type="XGBoost")
        events = wait_for(c, done(job))
    (lease,) = of(events, "JobLeased", job)
    assert lease.node == "laptop" and "no node labelled gpu" in lease.fallback
