"""The broker and its nodes over real sockets, with fake nodes (the real node core, no
processes): leases and epochs, expiry and retries, cancel, drain."""

from __future__ import annotations

import time

import pytest

from evo.broker import protocol as p
from evo.events.schema import JobSpec

from .fakenode import FakeNode


@pytest.fixture
def cluster(tbroker):
    made: list[FakeNode] = []
    b = tbroker()

    def node(name: str = "fake", **kw) -> FakeNode:
        n = FakeNode(b.address, name, **kw)
        made.append(n)
        n.join()
        return n

    client = b.client()
    yield b, client, node
    for n in made:
        n.close()
    client.close()


def wait_for(cond, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)  # a poll interval while waiting on the condition, not a wait for it


def test_a_fake_node_runs_a_job_to_completion_and_its_report_is_acknowledged(cluster):
    b, client, node = cluster
    n = node(slots=2)
    job = client.submit(["train"])
    n.pump(lambda: job in n.started)
    n.progress(job, loss=0.5)
    n.end(job, p.CompletedReport(metrics={"loss": 0.25}))
    n.pump(lambda: not n.core.finishing)
    st = b.broker.desk.state.jobs[job]
    assert st.state == "completed" and st.metrics == {"loss": 0.25} and st.attempt == 1


def test_a_silent_node_loses_its_lease_its_late_report_is_stale_and_the_job_runs_again(cluster):
    b, client, node = cluster
    n = node(heartbeat_s=0.1)
    job = client.submit(JobSpec(command=["train"], max_attempts=3))
    n.pump(lambda: job in n.started)
    first = n.started[job].lease_epoch
    jobs = b.broker.desk.state.jobs
    wait_for(lambda: jobs[job].state == "queued")  # no heartbeats: the broker expires the lease
    n.end(job)  # the attempt ends after all: too late
    n.pump(lambda: job in n.started)  # told to rejoin, then leased the job again
    assert n.rejoins >= 1
    again = n.started[job]
    assert again.lease_epoch > first and again.attempt == 2
    n.end(job)

    def kinds() -> list[str]:  # what the log holds (the desk's state is ahead of it briefly)
        return [type(e).__name__ for e in client.read_all(1) if getattr(e, "job_id", "") == job]

    n.pump(lambda: "JobCompleted" in kinds())
    events = kinds()
    assert events.count("JobCompleted") == 1 and "LeaseExpired" in events
    assert "ReportRejected" in events  # the stale final report is recorded, never applied


def test_a_cancel_reaches_the_running_attempt_and_a_queued_lease_is_reported_at_once(cluster):
    b, client, node = cluster
    n = node(slots=1, lease_ahead=2)
    n.core.durations.extend([0.01] * 4)  # short trials: it leases ahead
    first, second = client.submit(["a"]), client.submit(["b"])
    n.pump(lambda: first in n.started and second in n.core.queued)
    client.cancel(second)
    client.cancel(first)
    n.pump(lambda: [k.job_id for k in n.kills] == [first])
    assert second not in n.core.queued  # never started: reported cancelled by the core
    n.end(first, p.CancelledReport(reason="stopped by the node"))
    jobs = b.broker.desk.state.jobs
    n.pump(lambda: jobs[first].state == jobs[second].state == "cancelled")


def test_a_draining_node_finishes_what_runs_and_its_queued_leases_go_to_another(cluster):
    # a job of one attempt, leased ahead to a node that drains, still has its one attempt
    b, client, node = cluster
    n = node("a", slots=1, lease_ahead=2)
    n.core.durations.extend([0.01] * 4)
    first = client.submit(["a"])
    second = client.submit(JobSpec(command=["b"], max_attempts=1))
    n.pump(lambda: first in n.started and second in n.core.queued)
    n.stop(drain=True)
    assert n.core.queued == {}
    n.end(first)
    n.pump(lambda: n.core.left)
    n.close()
    other = node("b")
    other.pump(lambda: second in other.started)
    assert other.started[second].attempt == 2  # its second lease, and its first run
    other.end(second)
    jobs = b.broker.desk.state.jobs
    other.pump(lambda: jobs[second].state == "completed")
    assert jobs[first].state == "completed" and jobs[first].attempt == 1
