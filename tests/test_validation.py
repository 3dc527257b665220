"""Nothing invalid becomes durable: events are checked before they are folded, commands before
they reach the desk, and no frame from a peer can raise inside the broker's loop."""

from __future__ import annotations

import copy

import msgspec
import pytest

from evo.broker import protocol as p
from evo.broker.desk import Desk
from evo.broker.state import fold
from evo.events.codec import InvalidEvent, check, decode
from evo.events.log import SegmentLog
from evo.events.schema import (JobCompleted, JobFailed, JobSpec, JobStarted, JobSubmitted,
                               Progress, Resources, UtilizationSampled)
from tests.test_broker_faults import ask, raw_dealer


@pytest.mark.parametrize("event, where", [
    (Progress(seq=1, job_id="j", lease_epoch=1, step=0.5), "$.step"),  # type: ignore[arg-type]
    (Progress(seq=1, job_id="j", lease_epoch=1, step=True), "$.step"),  # type: ignore[arg-type]
    (Progress(seq=1, job_id="j", lease_epoch=1, metrics={"loss": float("nan")}), "$.metrics"),
    (Progress(seq=1, job_id="j", lease_epoch=1, metrics={"loss": float("inf")}), "$.metrics"),
    (JobStarted(seq=1, job_id="j", lease_epoch=1, env={1: "x"}), "$.env"),  # type: ignore[dict-item]
    (JobFailed(seq=1, job_id="j", exit_code="x"), "$.exit_code"),  # type: ignore[arg-type]
    (UtilizationSampled(seq=1, node="n", cpu=float("nan")), "$.cpu"),
    (JobSubmitted(seq=1, job_id="j", spec=JobSpec(command=["a"], priority=2**64 - 1)),
     "$.spec.priority"),
    (JobSubmitted(seq=1, job_id="j", spec=JobSpec(command=["a"], params={"a": {None: 1}})),
     "$.spec.params"),
    (JobSubmitted(seq=1, job_id="j", spec=JobSpec(
        command=["a"], params={"a": msgspec.msgpack.Ext(1, b"x")})), "$.spec.params"),
    (JobSubmitted(seq=1, job_id="j", spec=JobSpec(
        command=["a"], resources=Resources(cpus=float("inf")))), "$.spec.resources.cpus"),
    (Progress(seq=1, job_id="j", lease_epoch=1, step=10**23), "Progress"),
    (JobCompleted(seq=1, job_id="j", lease_epoch=1, artifacts={"a": "x" * (2 << 20)}), "bytes"),
])
def test_an_event_that_would_not_decode_or_project_is_refused_naming_the_field(event, where):
    with pytest.raises(InvalidEvent) as exc:
        check(event)
    assert where in str(exc.value)


def test_a_checked_event_is_its_log_bytes_and_decodes_back():
    ev = JobSubmitted(seq=3, time=1.5, job_id="j3",
                      spec=JobSpec(command=["python", "t.py"], params={"lr": 0.1, "n": [1, {"a": 2}]}))
    raw = check(ev)
    assert decode(raw) == ev


def _desk_with_a_running_job() -> tuple[Desk, p.LeaseGrant]:
    desk = Desk()
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8), 1.0)
    desk.handle(p.Submit(spec=JobSpec(command=["train"])), 1.0)
    (grant,) = desk.handle(p.Ready(node="n"), 1.0).reply.leases
    desk.handle(p.Report(node="n", job_id=grant.job_id, lease_epoch=grant.lease_epoch,
                         report=p.StartedReport(pid=1)), 1.0)
    return desk, grant


def test_a_report_with_a_name_that_escapes_is_recorded_as_rejected_and_not_applied():
    desk, g = _desk_with_a_running_job()
    for body in (p.CheckpointReport(path="../../etc"), p.CheckpointReport(path="/etc/passwd"),
                 p.CompletedReport(artifacts={"../x": "1"}), p.CheckpointReport(path="a\x00b")):
        before = copy.deepcopy(desk.state)
        out = desk.handle(p.Report(node="n", job_id=g.job_id, lease_epoch=g.lease_epoch,
                                   report=body), 2.0)
        assert isinstance(out.reply, p.Error) and out.reply.code == "rejected"
        (ev,) = out.events
        assert type(ev).__name__ == "ReportRejected" and "$." in ev.reason
        assert desk.state.jobs[g.job_id] == before.jobs[g.job_id]  # the job did not move


def test_a_refused_report_from_the_node_is_recorded_with_its_reason():
    desk, g = _desk_with_a_running_job()
    out = desk.handle(p.Report(node="n", job_id=g.job_id, lease_epoch=g.lease_epoch,
                               report=p.RefusedReport(report="progress", reason="$.step: float")),
                      2.0)
    assert isinstance(out.reply, p.Ok)
    (ev,) = out.events
    assert (ev.report, ev.reason) == ("progress", "$.step: float")
    assert desk.state.jobs[g.job_id].state == "running"


def test_a_submit_whose_numbers_or_names_are_bad_is_refused_and_appends_nothing():
    desk = Desk()
    for spec, where in [
        (JobSpec(command=["a\x00b"]), "$.spec.command[0]"),
        (JobSpec(command=["a"], name="x\x00"), "$.spec.name"),
        (JobSpec(command=["a"], key="k\x00"), "$.spec.key"),
        (JobSpec(command=["a"], tags={"t": "v\x00"}), "$.spec.tags"),
        (JobSpec(command=["a"], resources=Resources(cpus=float("nan"))), "$.spec.resources.cpus"),
        (JobSpec(command=["a"], resources=Resources(mem_gb=float("inf"))), "$.spec.resources.mem_gb"),
        (JobSpec(command=["a"], priority=2**40), "$.spec.priority"),
        (JobSpec(command=["a"], max_attempts=10**9), "$.spec.max_attempts"),
        (JobSpec(command=["a"], params={"x": float("nan")}), None),  # NaN is not JSON: refused
    ]:
        out = desk.handle(p.Submit(spec=spec), 1.0)
        assert isinstance(out.reply, p.Error) and out.reply.code == "invalid", spec
        if where:
            assert where in out.reply.message
        assert not out.events and desk.state.last_seq == 0


def test_shell_metacharacters_stay_literal_arguments():
    desk = Desk()
    argv = ["echo", "a; rm -rf /", "$(id)", "`id`", "line\nbreak", "*"]
    out = desk.handle(p.Submit(spec=JobSpec(command=argv)), 1.0)
    assert isinstance(out.reply, p.Submitted)
    assert out.events[0].spec.command == argv


# --- on the wire ------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


BAD_FRAMES = [
    ("a Ready that waits forever", {"cmd": "ready", "node": "n", "wait_s": float("inf")}),
    ("a Ready that waits NaN", {"cmd": "ready", "node": "n", "wait_s": float("nan")}),
    ("a Join with no heartbeat", {"cmd": "join", "node": "n", "heartbeat_s": 0}),
    ("a Join with NaN cores", {"cmd": "join", "node": "n", "cpus": float("nan")}),
    ("a report with a float step", {"cmd": "report", "node": "n", "job_id": "j1",
                                    "lease_epoch": 1, "report": {"kind": "progress", "step": 0.5}}),
    ("a report with a bool step", {"cmd": "report", "node": "n", "job_id": "j1",
                                   "lease_epoch": 1, "report": {"kind": "progress", "step": True}}),
    ("a failed report whose exit code is text", {
        "cmd": "report", "node": "n", "job_id": "j1", "lease_epoch": 1,
        "report": {"kind": "failed", "exit_code": "x"}}),
    ("a started report with integer env keys", {
        "cmd": "report", "node": "n", "job_id": "j1", "lease_epoch": 1,
        "report": {"kind": "started", "env": {1: 2}}}),
    ("a heartbeat with text utilization", {"cmd": "heartbeat", "node": "n", "util": {"cpu": "x"}}),
    ("a read of a huge seq", {"cmd": "read", "from_seq": 2**64 - 1}),
    ("output to a third stream", {"cmd": "output", "node": "n", "job_id": "j1", "attempt": 1,
                                  "stream": "../x", "offset": 0, "data": b"x"}),
]


def test_bad_commands_get_one_clear_error_and_the_broker_serves_on(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
    ctx, s = raw_dealer(b.address)
    try:
        for what, obj in BAD_FRAMES:
            r = ask(s, [msgspec.msgpack.encode({"req": 5, **obj})])
            assert isinstance(r, p.Error) and r.code == "protocol", what
            assert "$." in r.message or "Expected" in r.message, (what, r.message)
        for frame in (_nested(1000), _nested(100_000),
                      msgspec.msgpack.encode({"cmd": "submit", "spec": {
                          "command": ["a"], "params": {"x": msgspec.Raw(_nested(1000))}}})):
            r = ask(s, [frame])
            assert isinstance(r, p.Error) and "deeper than" in r.message
    finally:
        s.close(0)
        ctx.term()
    with b.client() as c:
        assert c.submit(["b"]) == "j2"
        assert c.status().last_seq == 2
    assert b.thread.is_alive()
    b.stop()
    with SegmentLog(b.home / "log", readonly=True) as lg:
        assert [e.job_id for e in lg.read_from(1)] == ["j1", "j2"]


def test_a_frame_within_the_depth_limit_is_decoded():
    obj = 1
    for _ in range(p.MAX_DEPTH - 4):
        obj = [obj]
    frame = msgspec.msgpack.encode({"cmd": "submit", "spec": {"command": ["a"], "params": {"x": obj}}})
    cmd = p.decode_command(frame)
    assert isinstance(cmd, p.Submit)
    with pytest.raises(p.BadFrame):
        p.decode_command(_nested(p.MAX_DEPTH + 1))
    with pytest.raises(p.BadFrame, match="not msgpack"):
        p.check_depth(b"\xdc\x00\x28" + b"\x91\x01" * 39 + b"\xc1")  # walked: 40 containers


def test_the_query_socket_answers_malformed_frames_and_keeps_the_projection(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
        endpoint = c.hello().query_endpoint
    ctx, s = raw_dealer(endpoint)
    try:
        for frames in ([b"a", b"b"], [b"\xa2\xff\xfe"], [_nested(5000)], [b"\xc1"],
                       [msgspec.msgpack.encode({"cmd": "query", "kind": "drop"})],
                       [p.command_encoder.encode(p.Status(req=3))]):
            r = ask(s, frames)
            assert isinstance(r, p.Error) and r.code == "protocol", frames
    finally:
        s.close(0)
        ctx.term()
    with b.client() as c:
        assert c.sql("SELECT count(*) AS n FROM jobs").to_pylist() == [{"n": 1}]


def test_a_command_that_fails_midway_leaves_the_state_as_it_was(tbroker):
    """An exception inside a handler, after it folded an event: the state is put back, nothing
    is appended, and the next command is served and appended in order."""
    b = tbroker()
    with b.client() as c:
        c.submit(["first"])
        desk = b.broker.desk
        before = copy.deepcopy(desk.state)

        def broken(self, cmd, now, cause):  # noqa: ANN001
            Desk.on_submit(self, cmd, now, cause)  # folds the JobSubmitted, then:
            raise RuntimeError("injected after the fold")

        desk._handlers = {**desk._handlers, p.Submit: broken}
        with pytest.raises(Exception, match="injected"):
            c.submit(["second"])
        assert b.broker.desk.state == before and b.broker.stats["restores"] == 1
        assert b.broker.desk.state.jobs == before.jobs and b.broker.desk.state.queue == before.queue
        b.broker.desk._handlers = Desk._handlers
        assert c.submit(["third"]) == "j2"
    b.stop()
    with SegmentLog(b.home / "log", readonly=True) as lg:
        events = list(lg.read_from(1))
    assert [e.spec.command for e in events] == [["first"], ["third"]]
    assert fold(events).jobs.keys() == {"j1", "j2"}


def test_a_sweep_with_one_bad_job_is_refused_whole_without_folding_anything(tbroker):
    b = tbroker()
    jobs = [JobSpec(command=["a"]), JobSpec(command=["b"], params={"x": float("nan")})]
    with b.client() as c:
        with pytest.raises(Exception, match=r"\$\.jobs\[1\].*params\.x: expected a finite"):
            c.submit_sweep("s", jobs)
        assert c.status().last_seq == 0
    assert b.broker.stats["restores"] == 0  # refused before any fold, not put back after


def test_a_failed_write_of_a_join_leaves_liveness_as_the_state_says(tbroker):
    from evo import failpoints
    from tests.conftest import wait_until

    b = tbroker()
    failpoints.arm("log.write", "ENOSPC")
    try:
        ctx, s = raw_dealer(b.address)
        try:
            r = ask(s, [p.command_encoder.encode(p.Join(req=1, node="ghost", cpus=2))])
        finally:
            s.close(0)
            ctx.term()
        assert isinstance(r, p.Error) and r.code == "unavailable"
    finally:
        failpoints.disarm()
    wait_until(lambda: not b.broker.write_error, what="the broker to record again")
    desk = b.broker.desk
    assert "ghost" not in desk.last_seen and "ghost" not in desk.state.nodes
    import time

    desk.tick(time.time(), time.monotonic() + 3600)  # the timer finds nothing it cannot fold
    with b.client() as c:
        assert c.submit(["after"]) == "j1"
