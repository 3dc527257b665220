"""A learning sweep's study, folded from the sweep's events. Pure: no clock, no I/O, no optuna.

A sweep with ``method: tpe`` has no jobs when it is submitted; the broker asks for a trial each
time a slot can take one (``wants``), and the suggestion is the trial's JobSubmitted. What the
sampler and the pruner know is this fold of the sweep's events in log order:

  * JobSubmitted of a trial: it is in flight with its parameters (the sampler's constant liar
    counts it as running);
  * Progress: one more intermediate value of the sweep's metric. A trial's *resource* is how
    many values it has reported (the built-in trainers report once per walk-forward season, so
    seasons are the rungs; a script that reports once per epoch has epochs as rungs);
  * PruneRequested: the recorded decision to stop it (replay uses the recorded decision);
  * its end: completed (its final metric), pruned (its last intermediate value), failed for
    good or cancelled (told as failed: the sampler learns nothing from it). A lease lost
    on the way is not an end: the job runs again with the same parameters.

The pruners follow Optuna's rules so that a study here and one in Optuna decide alike:
``asha`` is Optuna's SuccessiveHalvingPruner (the asynchronous one: a trial that reaches a rung
is compared with every value recorded at that rung so far, itself included, and goes on when it
is in the top 1/reduction_factor, or the best while fewer than reduction_factor have reached
it); ``median`` is Optuna's MedianPruner (after ``startup_trials`` completed trials, a trial
whose best value so far is worse than the median of the completed trials' values at the same
resource stops). ``prune_decision`` is called by the broker on each Progress it folds and by
``evo audit`` on each Progress it replays: the one rule for both.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from evo.direction import sweep_metric

RUNNING, COMPLETE, PRUNED, FAIL = "running", "complete", "pruned", "fail"
# The methods whose trials are asked for one at a time: by the broker's sampler (tpe), or by
# the user's own through evo.Client.study (client). Both have a study; only tpe asks by itself.
LEARNING = frozenset({"tpe", "client"})
ASKS = "tpe"


@dataclass(slots=True)
class Trial:
    number: int  # 0, 1, ...: the order it was asked in
    job_id: str
    params: dict[str, Any]
    state: str = RUNNING
    value: float | None = None  # final (complete), or the last intermediate value (pruned)
    values: list[float] = field(default_factory=list)  # intermediate values, by resource - 1
    rung: int = 0  # ASHA: the next rung it has to pass
    prune: str = ""  # why it was told to stop (a recorded PruneRequested)
    pruned_at: int = 0  # the resource it was told to stop at


@dataclass(slots=True)
class Pruning:
    kind: str = ""  # "asha", "median" or "" (none)
    min_resource: int = 1
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    startup_trials: int = 5  # median: completed trials before it prunes
    warmup: int = 0  # median: values a trial reports before it can be pruned


@dataclass(slots=True)
class Study:
    metric: str
    mode: str  # "max" or "min"
    samples: int
    seed: int = 0
    started_at: float = 0.0  # the SweepSubmitted's time
    time_budget_s: float | None = None
    target: float | None = None
    pruning: Pruning = field(default_factory=Pruning)
    trials: dict[str, Trial] = field(default_factory=dict)  # by job id, in asking order
    rungs: dict[int, list[float]] = field(default_factory=dict)  # ASHA: values at each rung
    reached: str = ""  # the job whose final value reached the target
    broken: str = ""  # why its sampler could not suggest (not folded: found again on asking)

    @classmethod
    def of(cls, spec: dict[str, Any], metric_mode: str, started_at: float) -> Study:
        """The study of a sweep recorded as ``spec`` (SweepSubmitted.spec)."""
        pruner = spec.get("pruner")
        if isinstance(pruner, str):
            pruner = {"type": pruner}
        pruning = Pruning()
        if pruner:
            pruning = Pruning(kind=str(pruner.get("type") or ""), **{
                k: int(v) for k, v in pruner.items() if k != "type" and v is not None})
        budget, target = spec.get("time_budget_s"), spec.get("target")
        return cls(metric=sweep_metric(spec), mode=metric_mode,
                   samples=int(spec.get("samples") or 0), seed=int(spec.get("seed") or 0),
                   started_at=started_at, pruning=pruning,
                   time_budget_s=float(budget) if budget is not None else None,
                   target=float(target) if target is not None else None)

    # --- the fold -----------------------------------------------------------------------------

    def asked(self, job_id: str, params: dict[str, Any]) -> None:
        self.trials[job_id] = Trial(number=len(self.trials), job_id=job_id, params=dict(params))

    def progress(self, job_id: str, metrics: dict[str, float]) -> str:
        """Fold one Progress; returns why the trial should stop now ("" to go on)."""
        trial = self.trials.get(job_id)
        value = metrics.get(self.metric)
        if trial is None or value is None or trial.state != RUNNING or trial.prune:
            return ""
        trial.values.append(float(value))
        return prune_decision(self, trial)

    def told_to_stop(self, job_id: str, reason: str) -> None:
        trial = self.trials.get(job_id)
        if trial is not None:
            trial.prune, trial.pruned_at = reason, len(trial.values)

    def ended(self, job_id: str, state: str, metrics: dict[str, float] | None = None) -> None:
        """The trial's job ended: ``state`` is COMPLETE, PRUNED or FAIL."""
        trial = self.trials.get(job_id)
        if trial is None:
            return
        trial.state = state
        if state == COMPLETE:
            v = (metrics or {}).get(self.metric)
            if v is None or math.isnan(v):
                trial.state = FAIL  # no value to learn from
            else:
                trial.value = float(v)
                if not self.reached and self.target is not None and self.better(v, self.target,
                                                                                 ties=True):
                    self.reached = job_id
        elif state == PRUNED:
            trial.value = trial.values[-1] if trial.values else None

    # --- what the broker asks -----------------------------------------------------------------

    def better(self, a: float, b: float, ties: bool = False) -> bool:
        if ties and a == b:
            return True
        return a > b if self.mode == "max" else a < b

    def why_done(self, now: float) -> str:
        """Why no more trials are asked for ("" while they are)."""
        if self.broken:
            return self.broken
        if len(self.trials) >= self.samples:
            return f"all {self.samples} trials asked"
        if self.reached:
            return f"{self.reached} reached the target {self.metric}={self.target}"
        if self.time_budget_s is not None and now - self.started_at >= self.time_budget_s:
            return f"the time budget of {self.time_budget_s:g} s is spent"
        return ""


# --- the pruners ------------------------------------------------------------------------------


def prune_decision(study: Study, trial: Trial) -> str:
    """Whether ``trial``, which has just reported its latest value, stops: the reason, or ""."""
    kind = study.pruning.kind
    if kind == "asha":
        return _asha(study, trial)
    if kind == "median":
        return _median(study, trial)
    return ""


def _asha(study: Study, trial: Trial) -> str:
    p = study.pruning
    resource, value = len(trial.values), trial.values[-1]
    while True:
        promotion = p.min_resource * p.reduction_factor ** (p.min_early_stopping_rate + trial.rung)
        if resource < promotion:
            return ""
        if math.isnan(value):
            return f"its {study.metric} is NaN at rung {trial.rung}"
        competing = study.rungs.setdefault(trial.rung, [])
        competing.append(value)  # it competes at the rung it reached (Optuna does the same)
        if not _promotable(value, competing, p.reduction_factor, study.mode):
            keep = max(len(competing) // p.reduction_factor, 1)
            return (f"rung {trial.rung} (resource {promotion}): {study.metric}={value:.6g} is not "
                    f"in the top {keep} of {len(competing)}")
        trial.rung += 1


def _promotable(value: float, competing: list[float], eta: int, mode: str) -> bool:
    idx = len(competing) // eta - 1
    if idx == -1:  # fewer than eta at the rung: only the best goes on
        idx = 0
    ranked = sorted(competing)
    if mode == "max":
        return value >= ranked[-(idx + 1)]
    return value <= ranked[idx]


def _median(study: Study, trial: Trial) -> str:
    p = study.pruning
    resource = len(trial.values)
    completed = [t for t in study.trials.values() if t.state == COMPLETE]
    if len(completed) < p.startup_trials or resource <= p.warmup:
        return ""
    at = [t.values[resource - 1] for t in completed if len(t.values) >= resource
          and not math.isnan(t.values[resource - 1])]
    if not at:
        return ""
    ours = [v for v in trial.values if not math.isnan(v)]
    if not ours:
        return f"its {study.metric} is NaN"
    best = max(ours) if study.mode == "max" else min(ours)
    median = statistics.median(at)
    if study.better(median, best):
        return (f"resource {resource}: best {study.metric}={best:.6g} is worse than the median "
                f"{median:.6g} of {len(at)} completed trials")
    return ""
