"""`evo audit SWEEP`: derive a learning sweep's every decision again from the log, in order.

The log is folded from its first event through the broker's own state (the fold the broker
itself rebuilds from at start). Just before each trial's JobSubmitted, the sampler is asked
again with what the fold holds at that point, and its suggestion must be the recorded
parameters, bit for bit; after each of the sweep's Progress events, the pruner's decision must
be the recorded one (a PruneRequested for that trial, at that resource, before its next
report). A result changed in the log changes what the sampler would have suggested after it,
or what the pruner would have decided, and the first such difference is named.
"""

from __future__ import annotations

from collections.abc import Iterable

from evo.events.schema import Event, JobSubmitted, Progress, PruneRequested, SweepSubmitted

from .state import BrokerState

MAX_LINES = 20  # differences listed; the count says how many there were


def audit_sweep(events: Iterable[Event], sweep_id: str) -> tuple[bool, list[str]]:
    """(every decision derived again as recorded, lines that say what was checked and what
    differed)."""
    from evo.sweeps.tpe import STARTUP_TRIALS, suggest

    state = BrokerState()
    differences: list[str] = []
    asked = pruned = 0
    derived: dict[str, tuple[int, str]] = {}  # trial -> (resource, reason) the pruner gives
    found = False
    for ev in events:
        sweep = state.sweeps.get(sweep_id)
        if type(ev) is JobSubmitted and sweep is not None and sweep.study is not None \
                and ev.spec.sweep_id == sweep_id and ev.spec.retry_of is None:
            startup = sweep.spec.get("startup_trials")
            again = suggest(sweep.study, sweep.spec["space"],
                            STARTUP_TRIALS if startup is None else int(startup))
            recorded = {k: ev.spec.params.get(k) for k in again}
            asked += 1
            if again != recorded:
                differences.append(f"trial {len(sweep.study.trials)} ({ev.job_id}, seq {ev.seq}): "
                                   f"recorded {recorded}, derived {again}")
        elif type(ev) is PruneRequested and ev.job_id in (sweep.members if sweep else ()):
            pruned += 1
            want = derived.pop(ev.job_id, None)
            if want is None:
                differences.append(f"{ev.job_id} (seq {ev.seq}): pruned at resource "
                                   f"{ev.resource}, which the pruner does not decide")
            elif want[0] != ev.resource:
                differences.append(f"{ev.job_id} (seq {ev.seq}): pruned at resource "
                                   f"{ev.resource}, the pruner decides at {want[0]}")
        elif type(ev) is Progress and ev.job_id in derived:
            resource, _ = derived.pop(ev.job_id)
            differences.append(f"{ev.job_id}: the pruner stops it at resource {resource}; "
                               f"the log has no PruneRequested (it reported on, seq {ev.seq})")
        state.apply(ev)
        if type(ev) is SweepSubmitted and ev.sweep_id == sweep_id:
            found = True
            if ev.template is None or state.sweeps[sweep_id].study is None:
                return False, [f"{sweep_id} is not a learning sweep (method "
                               f"{ev.spec.get('method', 'grid')}): its jobs were all submitted "
                               "with it, and it has no suggestions to derive; "
                               "`evo audit JOB` re-runs one of them"]
        if type(ev) is Progress and ev.job_id in state.to_prune:
            resource, _, why = state.to_prune[ev.job_id]
            derived[ev.job_id] = (resource, why)
    if not found:
        return False, [f"no sweep {sweep_id!r} in the log"]
    for job_id, (resource, why) in derived.items():
        differences.append(f"{job_id}: the pruner stops it at resource {resource} ({why}); "
                           "the log has no PruneRequested")
    sweep = state.sweeps[sweep_id]
    lines = [f"sweep {sweep_id} ({sweep.name}): {asked} suggestions and {pruned} pruning "
             f"decisions derived again from the recorded results, in recorded order"]
    if differences:
        lines.append(f"{len(differences)} difference(s):")
        lines += [f"  {d}" for d in differences[:MAX_LINES]]
        if len(differences) > MAX_LINES:
            lines.append(f"  ... and {len(differences) - MAX_LINES} more")
        return False, lines
    lines.append("every suggestion and pruning decision matches the log")
    return True, lines
