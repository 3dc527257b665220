"""The desk without processes or sockets: commands in, events and replies out, time passed in."""

from __future__ import annotations

import msgspec

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


def _types(out) -> list[str]:  # noqa: ANN001
    return [type(e).__name__ for e in out.events]


def test_a_silent_node_loses_its_lease_at_the_tick_its_late_report_is_stale_and_the_retry_waits():
    desk = Desk()
    now = 1000.0
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1, heartbeat_s=2.0), now, mono=0.0)
    job = desk.handle(p.Submit(spec=JobSpec(command=["a"], max_attempts=2)), now).reply.job_id
    (grant,) = desk.handle(p.Ready(node="n", max_leases=1), now, mono=0.0).reply.leases
    assert grant.attempt == 1
    desk.handle(p.Report(node="n", job_id=job, lease_epoch=grant.lease_epoch,
                         report=p.StartedReport(pid=7)), now, mono=0.0)
    assert _types(desk.tick(now + 5, 5.9)) == []  # under three heartbeats missed
    out = desk.tick(now + 7, 6.1)
    assert _types(out) == ["LeaseExpired", "RetryScheduled", "NodeLost"]
    assert desk.state.jobs[job].state == "queued" and desk.state.jobs[job].not_before == now + 8
    late = desk.handle(p.Report(node="n", job_id=job, lease_epoch=grant.lease_epoch,
                                report=p.CompletedReport()), now + 7.5, mono=7.5)
    assert late.reply.code == "stale" and _types(late) == ["ReportRejected"]
    assert desk.handle(p.Heartbeat(node="n"), now + 7.5, mono=7.5).reply.code == "rejoin"
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1), now + 7.6, mono=7.6)
    assert desk.handle(p.Ready(node="n", max_leases=1), now + 7.7, mono=7.7).reply.leases == []
    (again,) = desk.handle(p.Ready(node="n", max_leases=1), now + 8.1, mono=8.1).reply.leases
    assert again.attempt == 2 and again.lease_epoch > grant.lease_epoch
    old = desk.handle(p.Report(node="n", job_id=job, lease_epoch=grant.lease_epoch,
                               report=p.ProgressReport(step=1)), now + 8.2, mono=8.2)
    assert old.reply.code == "stale"  # the first epoch stays stale while the second runs
    done = desk.handle(p.Report(node="n", job_id=job, lease_epoch=again.lease_epoch,
                                report=p.CompletedReport()), now + 9, mono=9.0)
    assert _types(done) == ["JobCompleted"] and desk.state.jobs[job].state == "completed"


def test_a_lease_given_back_unstarted_is_not_an_attempt():
    desk = Desk()
    now = 1000.0
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1), now, mono=0.0)
    first = desk.handle(p.Submit(spec=JobSpec(command=["a"])), now).reply.job_id
    ahead = desk.handle(p.Submit(spec=JobSpec(command=["b"], max_attempts=1)), now).reply.job_id
    leases = desk.handle(p.Ready(node="n", max_leases=2, ahead=1), now, mono=0.0).reply.leases
    assert [g.job_id for g in leases] == [first, ahead]
    assert desk.state.jobs[ahead].ahead
    desk.handle(p.Report(node="n", job_id=first, lease_epoch=leases[0].lease_epoch,
                         report=p.StartedReport(pid=7)), now, mono=0.0)
    out = desk.handle(p.Leave(node="n"), now + 1, mono=1.0)
    # the one that ran lost an attempt; the one never started did not
    assert _types(out) == ["LeaseExpired", "RetryScheduled", "LeaseExpired", "NodeLeft"]
    assert desk.state.jobs[first].runs == 1
    job = desk.state.jobs[ahead]
    assert job.state == "queued" and job.runs == 0 and job.not_before == 0.0


def _complete(desk: Desk, spec: JobSpec, now: float = 1000.0) -> str:
    """Submit ``spec`` and run it to completion on node n (joined already)."""
    job = desk.handle(p.Submit(spec=spec), now).reply.job_id
    (grant,) = desk.handle(p.Ready(node="n", max_leases=1), now, mono=0.0).reply.leases
    assert grant.job_id == job
    desk.handle(p.Report(node="n", job_id=job, lease_epoch=grant.lease_epoch,
                         report=p.CompletedReport(metrics={"loss": 0.5})), now, mono=0.0)
    assert desk.state.jobs[job].state == "completed"
    return job


def test_a_completed_job_keeps_a_shared_summary_and_a_retry_or_keyed_resubmit_sees_it_whole():
    desk = Desk()
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1), 1000.0, mono=0.0)
    whole = [JobSpec(command=["train", f"--lr={i}"], params={"lr": i}, key=f"k{i}",
                     model_type="glm", tags={"why": "test"}) for i in range(2)]
    jobs = [_complete(desk, s) for s in whole]
    kept = [desk.state.jobs[j].spec for j in jobs]
    assert kept[0] is kept[1]  # one summary for both: nothing of either's own is held
    assert kept[0].model_type == "glm" and kept[0].command is None and not kept[0].params
    assert [desk.spec_of(desk.state.jobs[j]) for j in jobs] == whole
    recalled, recall = [], desk.recall
    desk.recall = lambda seq: recalled.append(seq) or recall(seq)
    again = desk.handle(p.Submit(spec=whole[1]), 1001.0).reply
    assert again.duplicate and again.job_id == jobs[1]
    assert recalled == []  # known to be the same from memory: no read of the log
    changed = msgspec.structs.replace(whole[1], params={"lr": 7})
    err = desk.handle(p.Submit(spec=changed), 1001.0).reply
    assert err.code == "conflict" and "differs in params" in err.message
    assert recalled == [desk.state.jobs[jobs[1]].submitted_seq]  # what changed, from the log
    out = desk.handle(p.Retry(target=jobs[0]), 1002.0)
    (sub,) = [e for e in out.events if type(e).__name__ == "JobSubmitted"]
    assert sub.spec == msgspec.structs.replace(whole[0], key=None, retry_of=jobs[0])
