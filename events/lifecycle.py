"""A job's lifecycle, the one table of it: the broker's state folds by it, the projection's job
states are generated from it (``state_after``).

``TRANSITIONS[(state before, event type)] -> state after``; a missing pair is an illegal
transition. A JobFailed with ``final`` ends the job ``failed`` (attempts exhausted, or not
retryable); without it the job goes back to the queue.
"""

from __future__ import annotations

QUEUED, LEASED, RUNNING, COMPLETED, FAILED, CANCELLED, PRUNED = (
    "queued", "leased", "running", "completed", "failed", "cancelled", "pruned",
)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, PRUNED})
ACTIVE = frozenset({LEASED, RUNNING})

# (state before, event type) -> state after. A missing pair is an illegal transition.
TRANSITIONS: dict[tuple[str | None, str], str] = {
    (None, "JobSubmitted"): QUEUED,
    (QUEUED, "JobLeased"): LEASED,
    (LEASED, "JobStarted"): RUNNING,
    (LEASED, "Progress"): RUNNING,
    (RUNNING, "Progress"): RUNNING,
    (LEASED, "Checkpointed"): RUNNING,
    (RUNNING, "Checkpointed"): RUNNING,
    (LEASED, "JobCompleted"): COMPLETED,
    (RUNNING, "JobCompleted"): COMPLETED,
    # An attempt ends: back to the queue (a RetryScheduled follows), or failed for good when
    # the event says final (attempts exhausted, or the error is not retryable).
    (LEASED, "JobFailed"): QUEUED,
    (RUNNING, "JobFailed"): QUEUED,
    (QUEUED, "JobFailed"): QUEUED,  # only with final=True, see _job_failed
    (LEASED, "LeaseExpired"): QUEUED,
    (RUNNING, "LeaseExpired"): QUEUED,
    (QUEUED, "RetryScheduled"): QUEUED,
    (QUEUED, "CancelRequested"): QUEUED,
    (LEASED, "CancelRequested"): LEASED,
    (RUNNING, "CancelRequested"): RUNNING,
    (QUEUED, "JobCancelled"): CANCELLED,
    (QUEUED, "JobHeld"): QUEUED,  # a held job stays queued, and is not leased
    (QUEUED, "JobReleased"): QUEUED,
    (LEASED, "JobCancelled"): CANCELLED,
    (RUNNING, "JobCancelled"): CANCELLED,
    # A learning sweep's pruner stops a trial: asked while it runs, it ends pruned (stopped by
    # its node, or when its lease is lost on the way: it is not run again).
    (LEASED, "PruneRequested"): LEASED,
    (RUNNING, "PruneRequested"): RUNNING,
    (LEASED, "JobPruned"): PRUNED,
    (RUNNING, "JobPruned"): PRUNED,
}
for _s in (QUEUED, LEASED, RUNNING, COMPLETED, FAILED, CANCELLED, PRUNED):
    # A rejected report is a record of what did not happen: it never moves the job.
    TRANSITIONS[(_s, "ReportRejected")] = _s


def _state_after() -> dict[str, str | None]:
    """Event type -> the state it leaves a job in, whatever the state before; None for events
    that leave the state as it was (a cancel request, a rejected report, a hold)."""
    out: dict[str, str | None] = {}
    for kind in sorted({k for _, k in TRANSITIONS}):
        moves = {(before, after) for (before, k), after in TRANSITIONS.items() if k == kind}
        if all(before == after for before, after in moves):
            out[kind] = None
            continue
        targets = {after for _, after in moves}
        if len(targets) != 1:  # the projection folds by the last event alone: it must not
            raise AssertionError(f"{kind} leads to {sorted(targets)}: the state after an "
                                 "event must not depend on the state before it")
        out[kind] = targets.pop()
    return out


STATE_AFTER = _state_after()


def state_after(event: object) -> str | None:
    """The state a job is in after ``event`` (a legal one), or None when it keeps its state."""
    kind = type(event).__name__
    if kind == "JobFailed" and getattr(event, "final", False):
        return FAILED
    return STATE_AFTER.get(kind)
