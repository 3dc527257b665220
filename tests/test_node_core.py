"""The node's core without sockets, processes or clocks: literal events in, literal
instructions out, time passed in."""

from __future__ import annotations

from evo.broker import protocol as p
from evo.events.schema import JobSpec, Resources
from evo.nodes import core as c
from evo.nodes.core import (
    Answered, Beat, Disconnected, Ended, Joined, Kill, Leased, Leave, NodeCore, Note, Reported,
    SendHeartbeat, SendReady, SendReport, Start, Stop, Tick, Warn,
)


def grant(job: str, epoch: int, cpus: float = 1.0, mem_gb: float = 0.0) -> p.LeaseGrant:
    return p.LeaseGrant(job_id=job, lease_epoch=epoch, attempt=1,
                        spec=JobSpec(command=["x"], resources=Resources(cpus=cpus, mem_gb=mem_gb)))


def report(job: str, epoch: int, body: p.AnyReport) -> p.Report:
    return p.Report(node="n", job_id=job, lease_epoch=epoch, report=body)


def core(**kw) -> NodeCore:
    return NodeCore(**{"node": "n", "slots": 1, "cpus": 4.0, "mem_gb": 8.0, **kw})


def joined(n: NodeCore, now: float = 0.0) -> list:
    out = n.handle(Joined(), now)
    return out + n.handle(Tick(), now)


DONE = p.CompletedReport(metrics={"loss": 0.5}, duration_s=1.0)


def test_a_joined_node_says_how_it_is_and_asks_for_as_many_jobs_as_it_has_slots():
    n = core(slots=2)
    assert joined(n) == [SendHeartbeat(running=(), sample=True),
                         SendReady(max_leases=2, wait_s=1.0, ahead=0)]
    assert n.handle(Tick(), 0.5) == []  # one Ready outstanding, no heartbeat due yet
    assert n.handle(Tick(), 2.0) == [SendHeartbeat(running=(), sample=False)]
    assert n.handle(Tick(), 5.0) == [SendHeartbeat(running=(), sample=True)]
    assert n.handle(Leased(), 5.1) == []  # an empty answer: ask again at the next tick
    assert n.handle(Tick(), 5.1) == [SendReady(max_leases=2, wait_s=1.0, ahead=0)]
    assert n.handle(Disconnected(), 6.0) == []  # the Ready died with the connection
    assert n.handle(Tick(), 6.0) == [SendReady(max_leases=2, wait_s=1.0, ahead=0)]


def test_leases_start_while_they_fit_first_come_first_started_and_reports_are_owed_until_acked():
    n = core(slots=3, cpus=4.0)
    joined(n)
    a, b, d = grant("j1", 10, cpus=2), grant("j2", 11, cpus=3), grant("j3", 12, cpus=1)
    assert n.handle(Leased(leases=(a, b, d)), 0.25) == [Start(a)]  # j2 does not fit: j3 waits
    started = report("j1", 10, p.StartedReport(pid=7))
    assert n.handle(Reported(started), 0.2) == [SendReport(started)]
    assert n.handle(Tick(), 0.3) == []  # nothing fits yet; slots are all taken or promised
    assert n.held() == [("j1", 10), ("j2", 11), ("j3", 12)]
    done = report("j1", 10, DONE)
    assert n.handle(Ended(done), 3.3) == [SendReport(done)]
    assert list(n.durations) == [3.05]  # on the clock it was given
    assert n.handle(Tick(), 3.3) == [SendHeartbeat(running=(("j1", 10), ("j2", 11), ("j3", 12)),
                                                   sample=False),
                                     Start(b), Start(d),
                                     SendReady(max_leases=1, wait_s=0.0, ahead=0)]
    assert n.handle(Answered(done), 3.4) == []
    assert ("j1", 10) not in n.held()


def test_short_trials_lease_ahead_medium_ones_one_per_slot_and_long_ones_never():
    n = core(slots=2, lease_ahead=8)
    joined(n)
    now = 0.0
    for i in range(4):
        g = grant(f"j{i}", i + 1)
        n.handle(Leased(leases=(g,)), now)
        n.handle(Ended(report(g.job_id, g.lease_epoch, DONE)), now + 0.1)
        n.handle(Answered(report(g.job_id, g.lease_epoch, DONE)), now + 0.1)
        now += 0.1
    assert n.ahead() == 8
    assert n.handle(Tick(), now) == [SendReady(max_leases=10, wait_s=0.0, ahead=8)]
    n.durations.extend([2.0] * 16)
    assert n.ahead() == 2
    n.durations.extend([30.0] * 16)
    assert n.ahead() == 0


def test_cancel_reports_a_queued_job_and_stops_a_running_one_once():
    n = core(slots=1)
    joined(n)
    a, b = grant("j1", 10), grant("j2", 11)
    n.handle(Leased(leases=(a, b)), 0.1)
    cancelled = report("j2", 11, p.CancelledReport(reason="cancel requested"))
    assert n.handle(Beat(cancel=("j2", "j1")), 0.2) == [
        SendReport(cancelled), Kill("j1", c.CANCEL_GRACE_S, "cancel requested")]
    assert n.handle(Beat(cancel=("j1",)), 0.3) == []  # asked once is enough
    assert n.handle(Answered(cancelled), 0.4) == []
    assert n.held() == [("j1", 10)]


def test_a_stale_report_stops_the_attempt_and_a_refused_final_is_replaced_once():
    n = core()
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10),)), 0.1)
    prog = report("j1", 10, p.ProgressReport(step=1))
    n.handle(Reported(prog), 0.2)
    assert n.handle(Answered(prog, "stale", "lease 10 of j1 is not current"), 0.3) == [
        Warn("j1: lease 10 of j1 is not current; stopping the attempt"),
        Kill("j1", c.STALE_GRACE_S, "its lease is not current")]
    assert n.handle(Answered(prog, "rejected", "bad path"), 0.35) == [
        Warn("j1: bad path"), Note("j1", "bad path")]
    done = report("j1", 10, DONE)
    n.handle(Ended(done), 0.4)
    refused = report("j1", 10, c.REFUSED_FINAL)
    assert n.handle(Answered(done, "rejected", "too big"), 0.5) == [
        Warn("j1: too big"), SendReport(refused)]
    assert n.handle(Answered(refused, "rejected", "still"), 0.6) == [Warn("j1: still")]
    assert n.finishing == {}


def test_a_final_report_the_broker_cannot_write_is_sent_again_at_each_heartbeat():
    n = core()
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10),)), 0.1)
    done = report("j1", 10, DONE)
    n.handle(Ended(done), 0.5)
    assert n.handle(Answered(done, "unavailable", "disk full"), 0.6) == []
    assert n.held() == [("j1", 10)]  # still owed: the broker keeps the lease
    assert n.handle(Tick(), 2.0) == [SendHeartbeat(running=(("j1", 10),), sample=False),
                                     SendReport(done),
                                     SendReady(max_leases=1, wait_s=0.0, ahead=0)]
    assert n.handle(Answered(done), 2.1) == []
    assert n.handle(Answered(done), 2.2) == []  # a second answer to the same report
    assert n.held() == []


def test_after_a_reconnect_owed_reports_go_again_and_leases_no_longer_ours_are_dropped():
    n = core(slots=2)
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10), grant("j2", 11))), 0.1)
    d1, d2 = report("j1", 10, DONE), report("j2", 11, DONE)
    n.handle(Ended(d1), 1.0)
    n.handle(Ended(d2), 1.0)
    n.handle(Disconnected(), 1.5)
    assert n.held() == [("j1", 10), ("j2", 11)]  # what the Join carries
    assert n.handle(Joined(cancel=("j2",)), 3.0) == [SendReport(d1)]
    assert n.handle(Tick(), 3.0)[0] == SendHeartbeat(running=(("j1", 10),), sample=False)


def test_a_drain_takes_nothing_new_keeps_heartbeating_and_leaves_once_all_is_acknowledged():
    n = core(slots=2)
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10), grant("j2", 11, cpus=4))), 0.1)
    assert list(n.queued) == ["j2"]
    assert n.handle(Stop(drain=True), 1.0) == []
    assert n.queued == {}  # the broker takes it back when the node leaves
    assert n.handle(Leased(leases=(grant("j3", 12),)), 1.1) == []  # late answer: not taken
    assert n.handle(Tick(), 30.0) == [SendHeartbeat(running=(("j1", 10),), sample=True)]
    done = report("j1", 10, DONE)
    assert n.handle(Ended(done), 31.0) == [SendReport(done)]
    assert n.handle(Tick(), 31.0) == []  # its report is not acknowledged yet
    assert n.handle(Answered(done), 31.1) == []
    assert n.handle(Tick(), 31.2) == [Leave()]
    assert n.left and n.handle(Tick(), 40.0) == []


def test_at_the_drains_deadline_what_runs_is_stopped_and_the_node_leaves_soon_after():
    n = core()
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10),)), 0.1)
    n.handle(Stop(drain=True), 1.0)
    assert n.next_deadline() == 2.0  # the heartbeat comes first
    n.handle(Tick(), 2.0)
    assert n.next_deadline() == 4.0
    n.next_hb = 1e9  # look at the drain alone
    assert n.next_deadline() == 1.0 + c.DRAIN_S
    assert n.handle(Tick(), 1.0 + c.DRAIN_S) == [Kill("j1", c.STOP_GRACE_S, "the node is stopping")]
    assert n.next_deadline() == 1.0 + c.DRAIN_S + c.LEAVE_AFTER_S
    assert n.handle(Tick(), 1.0 + c.DRAIN_S + c.LEAVE_AFTER_S) == [Leave()]


def test_a_stop_without_drain_stops_what_runs_at_once():
    n = core()
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10),)), 0.1)
    assert n.handle(Stop(drain=False), 1.0) == [Kill("j1", c.STOP_GRACE_S, "the node is stopping")]
    cancelled = report("j1", 10, p.CancelledReport(reason="stopped by the node"))
    n.handle(Ended(cancelled), 1.5)
    n.handle(Answered(cancelled), 1.6)
    assert n.handle(Tick(), 1.7) == [Leave()]


def test_a_drain_that_is_asked_again_without_waiting_stops_at_once():
    n = core()
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10),)), 0.1)
    n.handle(Stop(drain=True), 1.0)
    assert n.handle(Stop(drain=False), 1.5) == [Kill("j1", c.STOP_GRACE_S, "the node is stopping")]


def test_a_job_leased_again_while_its_old_attempt_is_stopping_starts_once_that_ends():
    n = core(slots=2)
    joined(n)
    old = grant("j1", 10)
    n.handle(Leased(leases=(old,)), 0.1)
    assert n.handle(Joined(cancel=("j1",)), 1.0) == [
        Kill("j1", c.CANCEL_GRACE_S, "the broker no longer holds its lease")]
    again = p.LeaseGrant(job_id="j1", lease_epoch=28, attempt=2, spec=old.spec)
    assert n.handle(Leased(leases=(again,)), 1.1) == []  # waits for the old attempt
    assert n.held() == [("j1", 28)]
    stopped = report("j1", 10, p.CancelledReport(reason="stopped by the node"))
    n.handle(Ended(stopped), 1.5)
    assert n.held() == [("j1", 28)]  # the newest lease, not the stopped one's owed report
    assert Start(again) in n.handle(Tick(), 1.6)
    assert n.running["j1"].grant.lease_epoch == 28


def test_a_job_bigger_than_the_node_starts_alone():
    n = core(slots=2, cpus=2.0)
    joined(n)
    big, small = grant("j1", 10, cpus=8), grant("j2", 11, cpus=1)
    assert n.handle(Leased(leases=(big, small)), 0.1) == [Start(big)]
    assert n.problems() == []


def test_the_invariant_check_sees_a_broken_core():
    n = core(slots=2, cpus=2.0)
    joined(n)
    n.handle(Leased(leases=(grant("j1", 10, cpus=1), grant("j2", 11, cpus=1))), 0.1)
    assert n.problems() == []
    n.running["j3"] = c.Running(grant("j3", 12, cpus=1), 0.2)  # past the node's size
    n.queued["j1"] = grant("j1", 10)
    n.finishing["j2"] = (report("j2", 11, DONE), True)
    assert n.problems() == [
        "one lease queued and running at once: ['j1']",
        "a final report owed for leases still here: ['j2']",
        "admitted past the node's size: Free(slots=-1, cpus=-1.0, mem_gb=8.0, gpus={})"]
    del n.running["j3"], n.queued["j1"], n.finishing["j2"]  # as it was: the check after passes


def test_a_pilot_stops_what_runs_at_its_declared_end_and_leaves():
    n = core(heartbeat_s=2.0, ends_at=10.0)
    joined(n)
    assert n.next_deadline() == 2.0  # the heartbeat first, then the end
    g = grant("j1", 5)
    assert n.handle(Leased(leases=(g,)), 1.0) == [Start(g)]
    n.handle(Tick(), 8.0)
    assert n.next_deadline() == 10.0
    out = n.handle(Tick(), 10.0)
    assert Warn("the allocation's end is here: stopping what runs and leaving") in out
    assert Kill("j1", c.STOP_GRACE_S, "the node is stopping") in out
    assert n.handle(Leased(leases=(grant("j2", 6),)), 10.1) == []  # nothing new is taken
    stopped = report("j1", 5, p.FailedReport(error="SIGTERM", exit_code=-15))
    assert n.handle(Ended(stopped), 10.5) == [SendReport(stopped)]
    assert n.handle(Answered(stopped), 10.6) == []
    assert n.handle(Tick(), 10.7) == [Leave()]


def test_a_pilot_with_nothing_to_run_for_its_idle_time_drains_and_leaves():
    n = core(heartbeat_s=2.0, idle_exit_s=30.0)
    joined(n, 0.0)
    g = grant("j1", 5)
    n.handle(Leased(leases=(g,)), 1.0)
    done = report("j1", 5, DONE)
    n.handle(Ended(done), 20.0)
    n.handle(Answered(done), 20.1)
    assert Leave() not in n.handle(Tick(), 40.0)  # idle since 20.1 only
    out = n.handle(Tick(), 50.2)
    assert Warn("idle for 30s: leaving") in out and Leave() in out
