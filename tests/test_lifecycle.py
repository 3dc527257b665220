"""One lifecycle, two folds: every (state, event) pair of the table walked through the broker's
state and through the projection, which must agree with each other and with the table."""

from __future__ import annotations

import pytest

from evo.broker.state import fold
from evo.events.codec import encode
from evo.events.lifecycle import FAILED, STATE_AFTER, TRANSITIONS
from evo.events.schema import (
    CancelRequested, Checkpointed, JobCancelled, JobCompleted, JobFailed, JobHeld, JobLeased,
    JobPruned, JobReleased, JobSpec, JobStarted, JobSubmitted, LeaseExpired, NodeJoined,
    Progress, PruneRequested, ReportRejected, RetryScheduled,
)
from evo.projections.store import Projection

LEASE = 3  # the seq of the JobLeased below: the lease's epoch
EVENTS = {
    "JobSubmitted": lambda: (JobSubmitted, dict(spec=JobSpec(command=["true"]))),
    "JobLeased": lambda: (JobLeased, dict(attempt=2, node="n1")),
    "JobStarted": lambda: (JobStarted, dict(lease_epoch=LEASE, pid=7)),
    "Progress": lambda: (Progress, dict(lease_epoch=LEASE, step=1, metrics={"loss": 0.5})),
    "Checkpointed": lambda: (Checkpointed, dict(lease_epoch=LEASE, path="ckpt/1")),
    "JobCompleted": lambda: (JobCompleted, dict(lease_epoch=LEASE, metrics={"auc": 0.6})),
    "JobFailed": lambda: (JobFailed, dict(lease_epoch=LEASE, error="boom")),
    "LeaseExpired": lambda: (LeaseExpired, dict(lease_epoch=LEASE, node="n1")),
    "RetryScheduled": lambda: (RetryScheduled, dict(attempt=2, not_before=0.0)),
    "CancelRequested": lambda: (CancelRequested, dict()),
    "JobCancelled": lambda: (JobCancelled, dict()),
    "JobHeld": lambda: (JobHeld, dict()),
    "JobReleased": lambda: (JobReleased, dict()),
    "PruneRequested": lambda: (PruneRequested, dict(resource=1, value=0.5, reason="rung 0")),
    "JobPruned": lambda: (JobPruned, dict(lease_epoch=LEASE, reason="rung 0")),
    "ReportRejected": lambda: (ReportRejected, dict(lease_epoch=LEASE, node="n1",
                                                    report="progress", reason="stale")),
}
# How a job gets to each state (after NodeJoined and JobSubmitted; JobLeased is seq 3).
TO = {
    None: [], "queued": [], "leased": ["JobLeased"], "running": ["JobLeased", "JobStarted"],
    "completed": ["JobLeased", "JobStarted", "JobCompleted"],
    "failed": ["JobLeased", ("JobFailed", {"final": True, "retryable": False})],
    "cancelled": ["JobCancelled"],
    "pruned": ["JobLeased", "JobStarted", "PruneRequested", "JobPruned"],
}


def _history(before, kind, extra):  # noqa: ANN001, ANN202
    steps = ([] if before is None else ["JobSubmitted", *TO[before]]) + [(kind, extra)]
    out = [NodeJoined(seq=1, time=1.0, node="n1", cpus=4, slots=2)]
    for step in steps:
        name, more = step if isinstance(step, tuple) else (step, {})
        cls, fields = EVENTS[name]()
        seq = len(out) + 1
        out.append(cls(seq=seq, time=float(seq), job_id="j1", **{**fields, **more}))
    return out


def _cases():
    for (before, kind), after in sorted(TRANSITIONS.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if kind == "JobFailed":  # final or not: the table's state, or failed for good
            if before != "queued":  # a queued job fails only for good (attempts exhausted)
                yield before, kind, {}, after
            yield before, kind, {"final": True}, FAILED
        else:
            yield before, kind, {}, after


@pytest.mark.parametrize("before, kind, extra, after", list(_cases()))
def test_each_pair_moves_both_folds_alike(before, kind, extra, after):
    events = _history(before, kind, extra)
    broker = fold(events).jobs["j1"].state
    raws = [encode(e) for e in events]
    for batches in ([raws], [raws[:-1], raws[-1:]]):  # the event in its history's batch, or alone
        proj = Projection()
        for batch in batches:
            proj.apply(batch)
        row = proj.query("SELECT state, started_at FROM jobs WHERE job_id = 'j1'").to_pylist()[0]
        proj.close()
        projected = row["state"]
        assert broker == after and projected == after, (before, kind, extra, broker, projected)
        if after == "running":  # started by its JobStarted, or by its first report: both folds
            assert row["started_at"] == fold(events).jobs["j1"].started_at > 0, row


def test_every_event_type_has_one_state_after_it_or_keeps_the_state():
    kinds = {k for _, k in TRANSITIONS}
    assert set(STATE_AFTER) == kinds
    for kind, after in STATE_AFTER.items():
        moves = [(b, a) for (b, k), a in TRANSITIONS.items() if k == kind]
        if after is None:
            assert all(b == a for b, a in moves), kind
        else:
            assert {a for _, a in moves} == {after}, kind
