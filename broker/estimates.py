"""How long a job is expected to take: as declared, or learned from the jobs like it that
completed. Pure: a fold of JobCompleted durations (the broker state feeds it), no clock.

A job is like another when they share a *key*, most specific first: the sweep, the model
type, then what it runs (the trainer, the callable, or the command's program and script). Per
key the fold keeps the count, mean and spread (Welford's running variance) and the longest,
over all nodes and per node: memory grows with the keys, not the jobs. The estimate for a job
on a node is the first key with history on that node, else the first with history anywhere,
so a sweep's own trials speak for it as soon as one has completed.

``bound`` is what the scheduler checks against a pilot's time left: the mean plus two standard
deviations (a job like the ones before it ends by then about 19 times in 20), and never less
than the longest seen when fewer than five have run, so one outlier is not forgotten.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from evo.events.schema import JobSpec

FEW = 5  # below this many samples the bound is at least the longest seen


@dataclass(slots=True)
class Stats:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared differences from the mean (Welford)
    longest: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        self.longest = max(self.longest, x)

    @property
    def spread(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass(frozen=True, slots=True)
class Estimate:
    seconds: float  # the mean
    spread: float  # the standard deviation (0 with one sample, or declared)
    bound: float  # what must fit in a pilot's time left
    n: int  # samples (0: declared)
    basis: str  # what it comes from, in words: "declared", "sweep s3 on gpu-1 (12 runs)", ...


def keys(spec: JobSpec) -> list[str]:
    """The keys a job's duration is learned under, most specific first."""
    out = []
    if spec.sweep_id:
        out.append(f"sweep {spec.sweep_id}")
    if spec.model_type:
        out.append(f"model type {spec.model_type}")
    if spec.trainer:
        out.append(f"trainer {spec.trainer}")
    elif spec.callable:
        out.append(f"callable {spec.callable}")
    elif spec.command:
        # the program and its script: `python train.py --lr 3` is like `python train.py --lr 4`
        words = [os.path.basename(w) for w in spec.command[:2] if not w.startswith("-")]
        out.append("command " + " ".join(words))
    return out


@dataclass(slots=True)
class Durations:
    """The fold: per key, over all nodes and per (key, node)."""

    anywhere: dict[str, Stats] = field(default_factory=dict)
    per_node: dict[str, dict[str, Stats]] = field(default_factory=dict)  # node -> key -> stats

    def add(self, spec: JobSpec, node: str | None, seconds: float) -> None:
        if not (seconds >= 0) or math.isinf(seconds):
            return
        for key in keys(spec):
            self.anywhere.setdefault(key, Stats()).add(seconds)
            if node:
                self.per_node.setdefault(node, {}).setdefault(key, Stats()).add(seconds)

    def estimate(self, spec: JobSpec, node: str | None = None) -> Estimate | None:
        """The expected duration of an attempt of ``spec`` on ``node`` (None: nothing known)."""
        if spec.expected_s > 0:
            return Estimate(spec.expected_s, 0.0, spec.expected_s, 0, "declared")
        ks = keys(spec)
        for key in ks:
            s = self.per_node.get(node, {}).get(key) if node else None
            if s is not None:
                return _of(s, f"{key} on {node}")
        for key in ks:
            s = self.anywhere.get(key)
            if s is not None:
                return _of(s, key)
        return None


    def on_node(self, spec: JobSpec, node: str) -> Estimate | None:
        """What jobs like ``spec`` took on ``node`` itself (None: none ran there): a node's
        speed, which a declared duration does not tell."""
        for key in keys(spec):
            s = self.per_node.get(node, {}).get(key)
            if s is not None:
                return _of(s, f"{key} on {node}")
        return None


def _of(s: Stats, where: str) -> Estimate:
    bound = s.mean + 2 * s.spread
    if s.n < FEW:
        bound = max(bound, s.longest)
    runs = "1 run" if s.n == 1 else f"{s.n} runs"
    return Estimate(s.mean, s.spread, bound, s.n, f"{where} ({runs})")


def makespan(jobs: list[dict[str, float]], slots: dict[str, int]) -> tuple[float, dict[str, float]]:
    """When a batch of jobs would be done, each job (longest first) given to the slot that
    finishes it soonest; ``jobs``: per job, its expected seconds on each node it may run on.
    Returns (the makespan, each node's busy slot-seconds). Jobs with no node are left out."""
    import heapq

    free = {n: [0.0] * k for n, k in slots.items() if k > 0}
    for lanes in free.values():
        heapq.heapify(lanes)
    busy = {n: 0.0 for n in free}
    end = 0.0
    for per in sorted(jobs, key=lambda d: -min(d.values(), default=0.0)):
        options = [(free[n][0] + s, n) for n, s in per.items() if n in free]
        if not options:
            continue
        done, n = min(options)
        heapq.heapreplace(free[n], done)
        busy[n] += per[n]
        end = max(end, done)
    return end, busy
