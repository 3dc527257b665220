"""The desk without processes or sockets: commands in, events and replies out, time passed in."""

from __future__ import annotations

from evo.broker import protocol as p
from evo.broker.desk import Desk
from evo.events.schema import JobSpec


def test_a_job_whose_dependency_failed_fails_at_the_next_tick_and_only_waiters_are_looked_at():
    desk = Desk()
    now, mono = 1000.0, 0.0
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1), now, mono=mono)
    first = desk.handle(p.Submit(spec=JobSpec(command=["a"], max_attempts=1)), now).reply.job_id
    later = desk.handle(p.Submit(spec=JobSpec(command=["b"], after=[first])), now).reply.job_id
    for i in range(50):  # a queue of jobs that wait for nothing
        desk.handle(p.Submit(spec=JobSpec(command=["c", str(i)])), now)
    assert list(desk.state.waiting) == [later]  # what the tick looks at: not the whole queue
    (grant,) = desk.handle(p.Ready(node="n", max_leases=1), now, mono=mono).reply.leases
    assert grant.job_id == first
    desk.handle(p.Report(node="n", job_id=first, lease_epoch=grant.lease_epoch,
                         report=p.FailedReport(error="boom", exit_code=1)), now, mono=mono)
    assert desk.state.jobs[first].state == "failed"
    out = desk.tick(now + 1, mono)
    (failed,) = [e for e in out.events if type(e).__name__ == "JobFailed"]
    assert failed.job_id == later and failed.final and f"dependency {first} failed" in failed.error
    assert desk.state.jobs[later].state == "failed" and not desk.state.waiting
