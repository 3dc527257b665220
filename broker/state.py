"""Broker state as a pure fold of events: ``state = fold(apply, events)``.

Rule 1: everything that changes broker state lives in this file.
Rule 2: this file imports no sockets, no clock, no filesystem. Time arrives inside events.

Legal job transitions are a table, ``TRANSITIONS[(state, event type)] -> new state``; an
event that is not in the table for the job's current state raises IllegalTransition naming
the job, its state and the event, and leaves the state untouched. The broker validates every
command against this state before it appends anything, so an illegal transition in a log that
is being replayed means the log and the code disagree: it is loud on purpose.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import msgspec

from evo.events.schema import (
    Checkpointed,
    CancelRequested,
    Event,
    GpuInfo,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobHeld,
    JobLeased,
    JobPruned,
    JobReleased,
    JobSpec,
    JobStarted,
    JobSubmitted,
    LeaseExpired,
    NodeDrained,
    NodeJoined,
    NodeLeft,
    NodeLost,
    NodeResumed,
    Progress,
    PruneRequested,
    ReportRejected,
    RetryScheduled,
    SweepCompleted,
    SweepSubmitted,
    UtilizationSampled,
)

from evo.events.lifecycle import (  # noqa: F401 - the rules, re-exported for the broker
    ACTIVE,
    CANCELLED,
    COMPLETED,
    FAILED,
    LEASED,
    PRUNED,
    QUEUED,
    RUNNING,
    TERMINAL,
    TRANSITIONS,
)
from evo.direction import mode_in_sweep, sweep_metric
from evo.broker.estimates import Durations
from evo.sweeps.study import COMPLETE, FAIL, LEARNING, Study
from evo.sweeps.study import PRUNED as TRIAL_PRUNED


class IllegalTransition(Exception):
    """Raised when an event does not apply to the job's current state."""

    def __init__(self, job_id: str, state: str | None, event: Event) -> None:
        self.job_id, self.state, self.event = job_id, state, event
        super().__init__(
            f"can't apply {type(event).__name__} (seq {event.seq}) to job {job_id} "
            f"in state {state or 'unknown'}"
        )


# A job's spec stays in memory for as long as the job: the parts that repeat from job to job
# are shared (nothing changes a spec once submitted: it is frozen, and no code mutates its
# lists or dicts), so a sweep's thousand trials hold one copy of their callable, model type,
# sweep id, folder, code record and resources, and no empty containers of their own.
_EMPTY_LIST: list = []
_EMPTY_DICT: dict = {}
_SHARED: dict = {}
_STRINGS = ("callable", "trainer", "model_type", "sweep_id", "workdir", "tree", "name")


def compact(spec: JobSpec) -> JobSpec:
    """``spec`` with what it shares with other jobs' specs shared (equal, not the same)."""
    changes: dict[str, Any] = {}
    for f in ("after", "outputs"):
        if not getattr(spec, f):
            changes[f] = _EMPTY_LIST
    for f in ("params", "data", "tags"):
        if not getattr(spec, f):
            changes[f] = _EMPTY_DICT
    if spec.code:
        key = ("code", msgspec.json.encode(spec.code, order="deterministic"))
        changes["code"] = _SHARED.setdefault(key, spec.code)
    else:
        changes["code"] = _EMPTY_DICT
    for f in _STRINGS:
        v = getattr(spec, f)
        if v:
            changes[f] = sys.intern(v)
    changes["resources"] = _SHARED.setdefault(spec.resources, spec.resources)
    if len(_SHARED) > 100_000:  # bounded: what was shared stays shared
        _SHARED.clear()
    return msgspec.structs.replace(spec, **changes)

# A job that ended well (completed, or pruned by its sweep) is read again only for its state,
# times, metrics and sweep, so it keeps a summary of its spec, shared by the jobs of its sweep
# and model type; its whole spec is its JobSubmitted in the log, at ``submitted_seq`` (what the
# desk's ``spec_of`` reads for a retry or a keyed resubmit). Failed and cancelled jobs keep
# theirs whole: `evo status` names them and `evo retry SWEEP` runs them again.
SUMMARISED = frozenset({COMPLETED, PRUNED})


def summary(spec: JobSpec) -> JobSpec:
    """What a job in SUMMARISED keeps of ``spec``."""
    key = ("summary", spec.sweep_id, spec.model_type, spec.trainer, spec.callable)
    kept = _SHARED.get(key)
    if kept is None:
        kept = _SHARED[key] = JobSpec(sweep_id=spec.sweep_id, model_type=spec.model_type,
                                      trainer=spec.trainer, callable=spec.callable)
    return kept


_STATES = {s: s for s in (QUEUED, LEASED, RUNNING, *TERMINAL)}


_canonical = msgspec.msgpack.Encoder(order="deterministic")


def spec_digest(spec: JobSpec) -> bytes:
    """What a keyed job's spec is compared by when it is submitted again: equal specs, equal
    digests (its canonical encoding's), so a duplicate is known without its whole spec."""
    return hashlib.blake2b(_canonical.encode(spec), digest_size=16).digest()


def kept_job(job: Job) -> Job:
    """A job decoded afresh (a snapshot's) holding what the fold's jobs share: the summary
    or the shared parts of its spec, the state's name, its node's, no list of its own."""
    job.spec = summary(job.spec) if job.state in SUMMARISED else compact(job.spec)
    job.state = _STATES[job.state]
    if job.node is not None:
        job.node = sys.intern(job.node)
    if not job.devices:
        job.devices = _EMPTY_LIST
    return job


FAILED_KEPT = 50  # failed jobs `evo status` can list, newest first

@dataclass(slots=True)
class Job:
    job_id: str
    spec: JobSpec
    state: str = QUEUED
    submitted_seq: int = 0
    submitted_at: float = 0.0
    attempt: int = 0  # leases so far (the current one while leased/running)
    runs: int = 0  # attempts that started: what max_attempts counts (a lease given back
    started_epoch: int = 0  # unstarted is not one); the lease the last one started under
    lease_epoch: int = 0  # seq of the current JobLeased, 0 when none
    node: str | None = None
    devices: list[int] = field(default_factory=list)
    leased_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    not_before: float = 0.0
    cancel_requested: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    last_progress_seq: int = 0
    queued_at: float = 0.0  # when it (re)entered the queue: the fallback wait counts from here
    ahead: bool = False  # leased ahead and not started: holds none of the node's resources yet
    held: bool = False  # kept queued until released (`evo hold`)
    checkpoint: str = ""  # the latest stored checkpoint's manifest: a retry starts from it
    checkpoint_step: int | None = None
    prune: str = ""  # why its sweep's pruner stopped it (a PruneRequested), while it runs
    fallback: str = ""  # why its lease went to a node its routing rule does not prefer
    key_digest: bytes = b""  # a keyed job's spec_digest


@dataclass(slots=True)
class Node:
    node: str
    hostname: str = ""
    cpus: float = 0.0
    mem_gb: float = 0.0
    gpus: list[GpuInfo] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    slots: int = 1
    capabilities: list[str] = field(default_factory=list)
    alive: bool = True
    joined_at: float = 0.0
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    last_util: UtilizationSampled | None = None
    drained: bool = False  # takes nothing new (`evo node drain`)
    drained_at: float = 0.0  # since when, while drained
    gone: str = ""  # "lost" (missed its heartbeats) or "left", while not alive
    gone_at: float = 0.0  # since when
    ends_at: float = 0.0  # when its allocation ends (a Slurm pilot), 0: never


@dataclass(slots=True)
class Sweep:
    sweep_id: str
    name: str
    spec: dict[str, Any]
    job_ids: list[str]
    done: bool = False
    open: int = 0  # jobs not yet completed, failed for good or cancelled
    members: set[str] = field(default_factory=set)  # job_ids, for a lookup
    template: JobSpec | None = None  # a learning sweep's: its trials are made from it
    study: Study | None = None  # a learning sweep's trials, as its sampler and pruner see them


@dataclass(slots=True)
class BrokerState:
    last_seq: int = 0
    jobs: dict[str, Job] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    sweeps: dict[str, Sweep] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    queue: dict[str, None] = field(default_factory=dict)  # queued job ids, in submit order
    # the queued jobs that wait for others (``after``): what the desk's tick looks at, not the
    # whole queue
    waiting: dict[str, None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # jobs per state
    job_number: int = 0  # the highest n of the job ids jN so far: new ids count on from it
    sweep_number: int = 0  # and of the sweep ids sN
    # The scheduler's index of the queue in its order: derived from ``queue``, never folded.
    order_index: object = field(default=None, repr=False, compare=False)
    # Sweeps whose every job has ended and which await their SweepCompleted (the desk adds it).
    closable: set[str] = field(default_factory=set, repr=False, compare=False)
    # Open learning sweeps (a study each): the desk asks the tpe ones for trials when a slot
    # is free, and closes any once it asks no more.
    learning: dict[str, None] = field(default_factory=dict, repr=False, compare=False)
    # Trials the pruner says stop, each awaiting its PruneRequested: job id -> (resource,
    # value, reason). The desk records the decision; a replay uses the recorded one.
    to_prune: dict[str, tuple[int, float, str]] = field(default_factory=dict, repr=False,
                                                        compare=False)
    # How long jobs like each took (estimates.py): what a pilot's time left is checked against.
    durations: Durations = field(default_factory=Durations)
    # The newest jobs that failed for good (`evo status` lists them without a scan of all jobs)
    failed_recent: list[str] = field(default_factory=list)

    def apply(self, event: Event) -> None:
        """Fold one event into the state. Raises before mutating if the event is illegal."""
        if event.seq and event.seq != self.last_seq + 1:
            raise ValueError(f"event seq {event.seq} does not follow {self.last_seq}")
        kind = type(event)
        if kind is JobSubmitted:  # the hot path: one per job
            self._submitted(event)  # type: ignore[arg-type]
        elif kind in _JOB_HANDLERS:
            self._apply_job(event)
        else:
            handler = _NODE_HANDLERS.get(kind)
            if handler is not None:
                handler(self, event)
        self.last_seq = event.seq or self.last_seq + 1

    def problems(self) -> list[str]:
        """What breaks the state's invariants (empty when none): the indexes agree with the
        jobs, every lease is held by the node it names, sweeps count their open jobs. The
        tests check it after every test that uses the cores."""
        out = []
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        kept = {k: v for k, v in sorted(self.counts.items()) if v}
        if kept != counts:
            out.append(f"counts {kept} are not the jobs' {dict(sorted(counts.items()))}")
        queued = {j for j, job in self.jobs.items() if job.state == QUEUED}
        if set(self.queue) != queued:
            out.append(f"queue index differs from the queued jobs by "
                       f"{sorted(set(self.queue) ^ queued)}")
        waiting = {j for j in queued if self.jobs[j].spec.after}
        if set(self.waiting) != waiting:
            out.append(f"waiting index differs by {sorted(set(self.waiting) ^ waiting)}")
        for j, job in self.jobs.items():
            if job.state in ACTIVE:
                node = self.nodes.get(job.node or "")
                if job.lease_epoch <= 0 or node is None or j not in node.running:
                    out.append(f"{j} is {job.state} without a lease its node holds "
                               f"(epoch {job.lease_epoch}, node {job.node})")
            elif job.lease_epoch or job.devices:
                out.append(f"{j} is {job.state} and still holds lease {job.lease_epoch}")
        for name, node in self.nodes.items():
            for j in node.running:
                held = self.jobs.get(j)
                if held is None or held.state not in ACTIVE or held.node != name:
                    out.append(f"node {name} holds {j}, which is not an active job of it")
        for sid, sweep in self.sweeps.items():
            open_ = sum(1 for j in sweep.job_ids  # a job not submitted yet is open
                        if j not in self.jobs or self.jobs[j].state not in TERMINAL)
            if open_ != sweep.open and not (open_ == 0 and sweep.open <= 0):
                out.append(f"sweep {sid} counts {sweep.open} open jobs, has {open_}")
        return out

    # --- jobs ---------------------------------------------------------------------------------

    def _submitted(self, ev: JobSubmitted) -> None:
        if ev.job_id in self.jobs:
            raise IllegalTransition(ev.job_id, self.jobs[ev.job_id].state, ev)
        self.jobs[ev.job_id] = Job(job_id=ev.job_id, spec=compact(ev.spec), submitted_seq=ev.seq,
                                   submitted_at=ev.time, queued_at=ev.time)
        self.job_number = max(self.job_number, _number(ev.job_id))
        self.queue[ev.job_id] = None
        if ev.spec.after:
            self.waiting[ev.job_id] = None
        if ev.spec.key is not None:
            self.keys[ev.spec.key] = ev.job_id
            self.jobs[ev.job_id].key_digest = spec_digest(ev.spec)
        self.counts[QUEUED] = self.counts.get(QUEUED, 0) + 1
        sweep = self.sweeps.get(ev.spec.sweep_id) if ev.spec.sweep_id else None
        if sweep is not None and ev.job_id not in sweep.members:  # a retry, a resume, a trial
            sweep.job_ids.append(ev.job_id)
            sweep.members.add(ev.job_id)
            sweep.open += 1
            sweep.done = False
            if sweep.study is not None and ev.spec.retry_of is None:
                sweep.study.asked(ev.job_id, ev.spec.params)

    def _apply_job(self, event: Event) -> None:
        job_id = event.job_id  # type: ignore[attr-defined]
        job = self.jobs.get(job_id)
        before = job.state if job is not None else None
        after = _TABLE.get((before, type(event)))
        if after is None or job is None:
            raise IllegalTransition(job_id, before, event)
        if isinstance(event, JobFailed):
            if event.final:
                after = FAILED
            elif before == QUEUED:
                raise IllegalTransition(job_id, before, event)
        _JOB_HANDLERS[type(event)](self, job, event)
        job.state = after
        if before != after:
            self.counts[before] -= 1  # type: ignore[index] # a job exists: before is a state
            self.counts[after] = self.counts.get(after, 0) + 1
            if after == FAILED:
                self.failed_recent.append(job_id)
                if len(self.failed_recent) > 2 * FAILED_KEPT:
                    del self.failed_recent[:-FAILED_KEPT]
            if before == QUEUED:
                self.queue.pop(job_id, None)
                self.waiting.pop(job_id, None)
            elif after == QUEUED:
                self.queue[job_id] = None
                if job.spec.after:
                    self.waiting[job_id] = None
                job.queued_at = event.time
            if after in TERMINAL and job.spec.sweep_id is not None:
                sweep = self.sweeps.get(job.spec.sweep_id)
                if sweep is not None:
                    sweep.open -= 1
                    if sweep.study is not None:
                        sweep.study.ended(job_id, _TRIAL_END[after], job.metrics)
                    self.may_close(sweep, event.time)
            if after in SUMMARISED:
                job.spec = summary(job.spec)

    def may_close(self, sweep: Sweep, now: float) -> None:
        """A sweep closes once its jobs have ended, and a learning sweep once it also asks
        for no more trials (its samples asked, its target reached or its time spent)."""
        if sweep.open > 0 or sweep.done:
            return
        if sweep.study is not None:
            if not sweep.study.why_done(now):
                return
            self.learning.pop(sweep.sweep_id, None)
        self.closable.add(sweep.sweep_id)

    def _release(self, job: Job) -> None:
        if job.node is not None and job.node in self.nodes:
            self.nodes[job.node].running.discard(job.job_id)
        job.lease_epoch = 0
        job.devices = _EMPTY_LIST  # never changed in place: a new list for each lease
        job.ahead = False

    def _leased(self, job: Job, ev: JobLeased) -> None:
        job.attempt = ev.attempt
        job.lease_epoch = ev.seq
        job.node = sys.intern(ev.node)  # one string per node, not one per job
        job.devices = list(ev.devices) if ev.devices else _EMPTY_LIST
        job.leased_at = ev.time
        job.not_before = 0.0
        job.ahead = ev.ahead
        job.fallback = ev.fallback
        if ev.node in self.nodes:
            self.nodes[ev.node].running.add(job.job_id)

    def _started(self, job: Job, ev: JobStarted) -> None:
        job.started_at = ev.time
        self._ran(job)

    def _ran(self, job: Job) -> None:
        job.ahead = False
        if job.started_epoch != job.lease_epoch:
            job.started_epoch = job.lease_epoch
            job.runs += 1

    def _progress(self, job: Job, ev: Progress | Checkpointed) -> None:
        if not job.started_at:
            job.started_at = ev.time
        self._ran(job)
        job.metrics.update(ev.metrics)
        job.last_progress_seq = ev.seq
        if isinstance(ev, Checkpointed) and ev.digest:
            job.checkpoint, job.checkpoint_step = ev.digest, ev.step
        elif type(ev) is Progress and job.spec.sweep_id in self.learning:
            study = self.sweeps[job.spec.sweep_id].study
            assert study is not None
            why = study.progress(job.job_id, ev.metrics)
            if why:
                trial = study.trials[job.job_id]
                self.to_prune[job.job_id] = (len(trial.values), trial.values[-1], why)

    def _prune_requested(self, job: Job, ev: PruneRequested) -> None:
        job.prune = ev.reason or "pruned"
        self.to_prune.pop(job.job_id, None)
        sweep = self.sweeps.get(job.spec.sweep_id or "")
        if sweep is not None and sweep.study is not None:
            sweep.study.told_to_stop(job.job_id, job.prune)

    def _pruned(self, job: Job, ev: JobPruned) -> None:
        job.finished_at = ev.time
        job.error = ""
        self._release(job)

    def _completed(self, job: Job, ev: JobCompleted) -> None:
        job.metrics.update(ev.metrics)
        job.finished_at = ev.time
        job.error = ""  # an earlier attempt's, no longer the job's
        if ev.duration_s > 0 and (job.runs <= 1 or not job.checkpoint):  # not a resumed part
            self.durations.add(job.spec, job.node, ev.duration_s)
        self._release(job)

    def _failed(self, job: Job, ev: JobFailed) -> None:
        if ev.lease_epoch and ev.lease_epoch == job.lease_epoch:  # reported: it ran
            self._ran(job)
        job.error = ev.error
        if ev.final:
            job.finished_at = ev.time
        self._release(job)

    def _expired(self, job: Job, ev: LeaseExpired) -> None:
        job.error = f"lease {ev.lease_epoch} on {ev.node} expired"
        self._release(job)

    def _retry(self, job: Job, ev: RetryScheduled) -> None:
        job.not_before = ev.not_before

    def _cancel_requested(self, job: Job, ev: CancelRequested) -> None:
        job.cancel_requested = True

    def _cancelled(self, job: Job, ev: JobCancelled) -> None:
        job.finished_at = ev.time
        self._release(job)

    def _rejected(self, job: Job, ev: ReportRejected) -> None:
        pass

    def _held(self, job: Job, ev: JobHeld | JobReleased) -> None:
        job.held = type(ev) is JobHeld

    # --- nodes and sweeps ---------------------------------------------------------------------

    def _node_joined(self, ev: NodeJoined) -> None:
        old = self.nodes.get(ev.node)
        node = Node(node=ev.node, hostname=ev.hostname, cpus=ev.cpus, mem_gb=ev.mem_gb,
                    gpus=list(ev.gpus), labels=list(ev.labels), slots=ev.slots,
                    capabilities=list(ev.capabilities), joined_at=ev.time, last_seen=ev.time,
                    ends_at=ev.ends_at)
        if old is not None:  # a node that reconnects keeps the jobs it still runs
            node.running = old.running
            node.drained = old.drained  # and a drain: it was asked for the machine, not a run
            node.drained_at = old.drained_at
        self.nodes[ev.node] = node

    def _node_gone(self, ev: NodeLost | NodeLeft) -> None:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.alive = False
            node.gone, node.gone_at = ("lost" if type(ev) is NodeLost else "left"), ev.time

    def _drained(self, ev: NodeDrained | NodeResumed) -> None:
        node = self.nodes.get(ev.node)
        if node is not None:
            if node.drained != (type(ev) is NodeDrained):  # a second drain keeps its start
                node.drained_at = ev.time if type(ev) is NodeDrained else 0.0
            node.drained = type(ev) is NodeDrained

    def _utilization(self, ev: UtilizationSampled) -> None:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.last_util = ev
            node.last_seen = ev.time

    def _sweep_submitted(self, ev: SweepSubmitted) -> None:
        self.sweep_number = max(self.sweep_number, _number(ev.sweep_id))
        sweep = Sweep(ev.sweep_id, ev.name, dict(ev.spec), list(ev.job_ids),
                      open=len(ev.job_ids), members=set(ev.job_ids), template=ev.template)
        if ev.template is not None and ev.spec.get("method") in LEARNING:
            metric = sweep_metric(ev.spec)
            sweep.study = Study.of(ev.spec, mode_in_sweep(metric, ev.spec), ev.time)
            self.learning[ev.sweep_id] = None
        self.sweeps[ev.sweep_id] = sweep

    def _sweep_completed(self, ev: SweepCompleted) -> None:
        sweep = self.sweeps.get(ev.sweep_id)
        if sweep is not None:
            sweep.done = True
        self.closable.discard(ev.sweep_id)
        self.learning.pop(ev.sweep_id, None)


def _number(ident: str) -> int:
    """n of an id "jn" or "sn" (older logs numbered them by seq: they keep those), else 0."""
    tail = ident[1:]
    return int(tail) if tail.isdigit() else 0


_JOB_HANDLERS: dict[type, Callable[[BrokerState, Job, Any], None]] = {
    JobLeased: BrokerState._leased,
    JobStarted: BrokerState._started,
    Progress: BrokerState._progress,
    Checkpointed: BrokerState._progress,
    JobCompleted: BrokerState._completed,
    JobFailed: BrokerState._failed,
    LeaseExpired: BrokerState._expired,
    RetryScheduled: BrokerState._retry,
    CancelRequested: BrokerState._cancel_requested,
    JobCancelled: BrokerState._cancelled,
    ReportRejected: BrokerState._rejected,
    JobHeld: BrokerState._held,
    JobReleased: BrokerState._held,
    PruneRequested: BrokerState._prune_requested,
    JobPruned: BrokerState._pruned,
}

# How a trial's job ended, as its study tells the sampler.
_TRIAL_END = {COMPLETED: COMPLETE, PRUNED: TRIAL_PRUNED, FAILED: FAIL, CANCELLED: FAIL}

_NODE_HANDLERS: dict[type, Callable[[BrokerState, Any], None]] = {
    NodeJoined: BrokerState._node_joined,
    NodeLost: BrokerState._node_gone,
    NodeLeft: BrokerState._node_gone,
    UtilizationSampled: BrokerState._utilization,
    SweepSubmitted: BrokerState._sweep_submitted,
    SweepCompleted: BrokerState._sweep_completed,
    NodeDrained: BrokerState._drained,
    NodeResumed: BrokerState._drained,
}


_EVENT_CLASSES = {cls.__name__: cls for cls in (JobSubmitted, *_JOB_HANDLERS)}
# The transition table keyed by event class, for the fold's hot path.
_TABLE = {(before, _EVENT_CLASSES[name]): after for (before, name), after in TRANSITIONS.items()}


def fold(events, state: BrokerState | None = None) -> BrokerState:  # noqa: ANN001
    """Rebuild state from an iterable of events."""
    state = state or BrokerState()
    for ev in events:
        state.apply(ev)
    return state
