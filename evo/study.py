"""Ask/tell with the user's own sampler: ``evo.Client.study`` opens a sweep whose trials the
user's code asks for, one at a time, and whose results it is told, while evo queues, leases,
runs, records and projects every trial as it does for its own sweeps (and, given a
``pruner``, stops poor ones early by the same rules as ``method: tpe``).

    with evo.Client() as c:
        study = c.study("my-search", callable="objective:train", samples=50, metric="loss")
        for _ in range(2):  # one per slot in flight
            study.submit(my_sampler.ask())
        for trial in study.results():  # each trial as it ends, in the log's order
            my_sampler.tell(trial.params, trial.value, trial.state)
            if study.asked < study.samples:
                study.submit(my_sampler.ask())

The sweep is recorded with ``method: client`` and completes when its ``samples`` trials have
ended (or, with ``target`` or ``time_budget_s``, when those say so); `evo cancel SWEEP` ends it
early. Results are read from the log, so a study object made again with ``Client.study(...,
sweep_id=...)`` after the user's process died goes on where it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from evo.direction import mode_in_sweep, sweep_metric
from evo.errors import EvoError
from evo.events.schema import (JobCancelled, JobCompleted, JobFailed, JobPruned, JobSpec,
                               JobSubmitted, Progress, SweepCompleted, SweepSubmitted)

if TYPE_CHECKING:
    from evo.client import Client



@dataclass
class TrialResult:
    job_id: str
    params: dict[str, Any]
    state: str  # completed, pruned, failed or cancelled
    value: float | None  # the sweep's metric: final, or the last reported for a pruned trial
    metrics: dict[str, float] = field(default_factory=dict)


class Study:
    def __init__(self, client: Client, sweep_id: str, template: JobSpec, spec: dict[str, Any],
                 from_seq: int) -> None:
        self.client, self.sweep_id, self.template, self.spec = client, sweep_id, template, spec
        self.metric = sweep_metric(spec)
        self.mode = mode_in_sweep(self.metric, spec)
        self.samples = int(spec["samples"])
        self._from = from_seq
        self._asked: list[str] = []
        self._params: dict[str, dict[str, Any]] = {}
        self._last: dict[str, float] = {}  # a trial's last reported value of the metric
        self._told: set[str] = set()
        self.done = False

    @property
    def asked(self) -> int:
        return len(self._asked)

    def submit(self, params: dict[str, Any]) -> str:
        """Run one trial with these parameters (in the template's command placeholders too);
        its job id. Refused (CommandRejected) past ``samples`` or once the study is done."""
        from evo.sweeps.spec import trial_spec

        spec = trial_spec(self.template, dict(params))
        reply = self.client.submit_sweep(self.sweep_id, [spec], self.spec, into=self.sweep_id,
                                         files=False)  # the template's files are sent
        (job_id,) = reply.job_ids
        self._asked.append(job_id)
        self._params[job_id] = dict(params)
        return job_id

    def results(self, timeout_s: float | None = None) -> Iterator[TrialResult]:
        """Each trial's result as it ends (each once, in the log's order), until the study is
        complete, or for at most ``timeout_s``; a later call goes on from there."""
        until = None if timeout_s is None else time.monotonic() + timeout_s
        for ev in self.client.follow(self._from, until=until):
            self._from = ev.seq + 1
            if isinstance(ev, SweepCompleted) and ev.sweep_id == self.sweep_id:
                self.done = True
                return
            if isinstance(ev, JobSubmitted) and ev.spec.sweep_id == self.sweep_id:
                self._params.setdefault(ev.job_id, {k: v for k, v in ev.spec.params.items()
                                                    if k not in self.template.params})
                continue
            job = getattr(ev, "job_id", None)
            if job is None or job not in self._params or job in self._told:
                continue
            if isinstance(ev, Progress) and self.metric in ev.metrics:
                self._last[job] = ev.metrics[self.metric]
            if isinstance(ev, JobCompleted):
                state, metrics = "completed", dict(ev.metrics)
            elif isinstance(ev, JobPruned):
                state, metrics = "pruned", {}
            elif isinstance(ev, JobCancelled) or (isinstance(ev, JobFailed) and ev.final):
                state, metrics = ("cancelled" if isinstance(ev, JobCancelled) else "failed"), {}
            else:
                continue
            self._told.add(job)
            value = metrics.get(self.metric) if state == "completed" else \
                self._last.get(job) if state == "pruned" else None
            yield TrialResult(job, self._params[job], state, value, metrics)

    def best(self) -> TrialResult | None:
        """The best completed trial so far, by the sweep's metric and mode (from the
        projection: ties go to the earliest submitted)."""
        rows = self.client.sql(
            "SELECT job_id, value, params FROM leaderboard WHERE sweep_id = ? AND metric = ? "
            "AND rank = 1 LIMIT 1", [self.sweep_id, self.metric]).to_pylist()
        if not rows:
            return None
        import json

        r = rows[0]
        params = json.loads(r["params"]) if isinstance(r["params"], str) else r["params"]
        return TrialResult(r["job_id"], params, "completed", r["value"])


def open_study(client: Client, name: str, template: JobSpec, *, samples: int,
               metric: str = "auc", mode: str | None = None, pruner: Any = None,
               target: float | None = None, time_budget_s: float | None = None,
               sweep_id: str | None = None) -> Study:
    """See ``Client.study``."""
    if sweep_id is not None:
        return _reopen(client, sweep_id)
    spec: dict[str, Any] = {"name": name, "method": "client", "samples": samples,
                            "metric": metric, "mode": mode, "target": target,
                            "time_budget_s": time_budget_s,
                            "pruner": msgspec.to_builtins(pruner) if pruner is not None else None,
                            "space": {}}
    spec = {k: v for k, v in spec.items() if v is not None}
    (template,) = client.with_files([template])
    reply = client.submit_sweep(name, [template], spec, files=False)
    return Study(client, reply.sweep_id, template, spec, reply.seq)


def _reopen(client: Client, sweep_id: str) -> Study:
    for ev in client.read_all(1):
        if isinstance(ev, SweepSubmitted) and ev.sweep_id == sweep_id:
            if ev.template is None or ev.spec.get("method") != "client":
                raise EvoError(f"sweep {sweep_id} is not a client study (method "
                               f"{ev.spec.get('method', 'grid')})")
            study = Study(client, sweep_id, ev.template, dict(ev.spec), ev.seq)
            for e in client.read_all(ev.seq):
                if isinstance(e, JobSubmitted) and e.spec.sweep_id == sweep_id:
                    study._asked.append(e.job_id)
            return study
    raise EvoError(f"no sweep {sweep_id!r}")
