"""The broker's front desk: commands in, events and replies out. Pure.

``Desk.handle(cmd, now)`` validates a command against the current state and returns the
events it causes (seq and time stamped, already folded into the state, so the next command in
the same batch sees them) and the reply to send once the batch is durable. A rejected command
returns an ``Error`` reply and no events. Sockets, the log and the clock live in server.py.

Every event is checked (``codec.check``: the schema's types, finite numbers, 64-bit ints,
JSON-writable free-form values, a size bound) in ``_emit``, before it is folded: an event that
does not fit is never in the state, so it can never reach the log. A command refused that way
leaves the state as it was. Any other exception from a handler may leave events of that command
folded; ``handle`` lets it through, and the server puts the state back (see server.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from evo.direction import mode_in_sweep, sweep_metric
from evo.errors import BadInput
from evo.events.codec import InvalidEvent, check
from evo.events.schema import (
    CancelRequested, Checkpointed, Event, JobCancelled, JobCompleted, JobFailed, JobHeld,
    JobLeased, JobPruned, JobReleased, JobSpec, JobStarted, JobSubmitted, LeaseExpired,
    NodeDrained, NodeJoined, NodeLeft, NodeLost, NodeResumed, Progress, PruneRequested,
    ReportRejected, RetryScheduled, SweepCompleted, SweepSubmitted, UtilizationSampled,
)

from . import protocol as p
from .cluster import Cluster
from .liveness import compute_backoff, is_lost, lost_after
from .scheduler import (decide, explain, free_of, misfit, outlasts, pick_devices,
                        routing)
from .specs import InvalidSpec, fits_somewhere, unrouted, validate_spec
from .state import (ACTIVE, CANCELLED, COMPLETED, FAILED, LEASED, PRUNED, QUEUED,
                    SUMMARISED, TERMINAL, BrokerState, Job, Sweep, spec_digest)
from .status import status_of
from evo.sweeps.spec import check_recorded, learning, trial_spec
from evo.sweeps.study import ASKS


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)  # each event as the log will store it
    reply: p.Reply | None = None
    park: bool = False  # a Ready that found no work: the server holds it until something changes


class Desk:
    """Turns commands into events. Holds the state it folds into; owns no I/O."""

    _handlers: dict[type, Callable[..., Outcome]] = {}

    def __init__(self, state: BrokerState | None = None, cluster: Cluster | None = None, *,
                 mono: float = 0.0, lease_s: float = 6.0,
                 recall: Callable[[int], JobSpec] | None = None) -> None:
        self.state = state or BrokerState()
        self.cluster = cluster or Cluster()
        # The spec of the JobSubmitted at a seq, for the jobs whose state keeps a summary
        # (state.py): the server reads it from the log. A desk without one remembers the
        # specs it submits itself.
        self._own: dict[int, JobSpec] | None = None
        if recall is None:
            own: dict[int, JobSpec] = {}
            self._own = own
            recall = own.__getitem__
        self.recall = recall
        self.mono_now = mono
        # Liveness is not state: it lives on the broker's monotonic clock and starts afresh
        # (with a full grace period) for every node the log says was alive.
        self.last_seen: dict[str, float] = {n: mono for n, node in self.state.nodes.items()
                                            if node.alive}
        self.heartbeat_s: dict[str, float] = {n: lease_s / 3 for n in self.last_seen}

    def spec_of(self, job: Job) -> JobSpec:
        """``job``'s whole spec, also where its state keeps a summary."""
        return self.recall(job.submitted_seq) if job.state in SUMMARISED else job.spec

    def resync(self, mono: float) -> None:
        """Liveness to match a state folded again (see server.py): nodes the state says are
        gone are not watched, and live ones it has but liveness lacks get a fresh grace."""
        alive = {n for n, node in self.state.nodes.items() if node.alive}
        for n in list(self.last_seen):
            if n not in alive:
                del self.last_seen[n]
        for n in alive - self.last_seen.keys():
            self.last_seen[n] = mono
            self.heartbeat_s.setdefault(n, 2.0)

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        cls._handlers = _handlers_of(cls)

    def _emit(self, out: Outcome, cls: type[Event], now: float, cause: str, **fields) -> Event:
        """Stamp the next seq and the time on a new event, check it (InvalidEvent, with the
        state untouched) and fold it into the state."""
        event = cls(seq=self.state.last_seq + 1, time=now, cause=cause, **fields)
        raw = check(event)
        self._fold(event)
        out.events.append(event)
        out.encoded.append(raw)
        return event

    def _fold(self, event: Event) -> None:
        self.state.apply(event)
        if self._own is not None and type(event) is JobSubmitted:
            self._own[event.seq] = event.spec  # type: ignore[attr-defined]

    def _emit_all(self, out: Outcome, events: list[Event]) -> None:
        """Check every one of ``events`` (numbered already), then fold them all: a command
        that makes several events from a peer's values is refused whole or taken whole."""
        raws = []
        for ev in events:
            try:
                raws.append(check(ev))
            except InvalidEvent as exc:
                exc.event = ev  # type: ignore[attr-defined]
                raise
        for ev, raw in zip(events, raws):
            self._fold(ev)
            out.events.append(ev)
            out.encoded.append(raw)

    def handle(self, cmd: p.Command, now: float, *, cause: str = "", mono: float = 0.0) -> Outcome:
        method = self._handlers.get(type(cmd))
        if method is None:
            return Outcome(reply=p.Error(req=cmd.req, code="unknown",
                                         message=f"command {type(cmd).__name__} is not served"))
        before = self.state.last_seq
        self.mono_now = mono  # the command's monotonic time (heartbeat ages in a status)
        try:
            if type(cmd) in _NODE_COMMANDS:
                out = method(self, cmd, now, cause, mono)
            else:
                out = method(self, cmd, now, cause)
        except InvalidEvent as exc:
            if self.state.last_seq != before:
                raise  # events of this command are folded already: the server restores
            return Outcome(reply=p.Error(req=cmd.req, code="invalid", message=str(exc)))
        if self.state.closable:
            self._close_sweeps(out, now, cause)
        return out

    def _close_sweeps(self, out: Outcome, now: float, cause: str,
                      ids: list[str] | None = None, reason: str = "") -> None:
        """SweepCompleted for each sweep whose last job just ended (or for ``ids``), naming
        the best job."""
        for sweep_id in sorted(self.state.closable) if ids is None else ids:
            sweep = self.state.sweeps[sweep_id]
            jobs = [self.state.jobs[j] for j in sweep.job_ids if j in self.state.jobs]
            counts = {s: sum(j.state == s for j in jobs) for s in TERMINAL}
            metric = sweep_metric(sweep.spec)
            best = best_job(jobs, metric, mode_in_sweep(metric, sweep.spec))
            why = reason or (sweep.study.why_done(now) if sweep.study is not None else "")
            self._emit(out, SweepCompleted, now, cause, sweep_id=sweep_id,
                       completed=counts[COMPLETED], failed=counts["failed"],
                       cancelled=counts["cancelled"], best_job=best, pruned=counts[PRUNED],
                       reason=why)

    def on_submitsweep(self, cmd: p.SubmitSweep, now: float, cause: str) -> Outcome:
        if learning(cmd.spec) and not cmd.into:
            return self._submit_learning(cmd, now, cause)
        if not cmd.jobs:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"sweep {cmd.name!r}: no jobs to run"))
        for i, spec in enumerate(cmd.jobs):
            try:
                validate_spec(spec, self.state, self.cluster)
                if i == 0 or spec.resources != cmd.jobs[i - 1].resources:
                    fits_somewhere(spec, self.state, self.cluster)
            except InvalidSpec as exc:
                msg = str(exc).replace("$.spec", f"$.jobs[{i}]", 1)
                return Outcome(reply=p.Error(req=cmd.req, code="invalid", message=msg))
        out = Outcome()
        first = self.state.last_seq + 1
        events: list[Event] = []
        if cmd.into:  # more configurations for a sweep there is: its jobs join it
            if cmd.into not in self.state.sweeps:
                return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                             message=f"no sweep {cmd.into!r} to add jobs to"))
            refused = self._into_study(cmd, now)
            if refused is not None:
                return Outcome(reply=p.Error(req=cmd.req, code="invalid", message=refused))
            sweep_id, start = cmd.into, first
        else:
            sweep_id, start = f"s{self.state.sweep_number + 1}", first + 1
        n = self.state.job_number
        job_ids = [f"j{n + 1 + i}" for i in range(len(cmd.jobs))]
        if not cmd.into:
            events.append(SweepSubmitted(seq=first, time=now, cause=cause, sweep_id=sweep_id,
                                         spec=dict(cmd.spec), job_ids=job_ids, name=cmd.name))
        events += [JobSubmitted(seq=start + i, time=now, cause=cause, job_id=job_id,
                                spec=msgspec.structs.replace(spec, sweep_id=sweep_id))
                   for i, (job_id, spec) in enumerate(zip(job_ids, cmd.jobs))]
        try:
            self._emit_all(out, events)
        except InvalidEvent as exc:  # nothing folded: all are checked first
            jobs = [e for e in events if isinstance(e, JobSubmitted)]
            where = f"$.jobs[{jobs.index(exc.event)}]" if exc.event in jobs else "$"
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"sweep {cmd.name!r}: {where}: {exc}"))
        warning = "; ".join(sorted({w for s in cmd.jobs if (w := unrouted(s, self.cluster))}))
        out.reply = p.SweepAccepted(req=cmd.req, sweep_id=sweep_id, job_ids=job_ids,
                                    seq=self.state.last_seq, warning=warning)
        return out

    def _submit_learning(self, cmd: p.SubmitSweep, now: float, cause: str) -> Outcome:
        """A learning sweep: its one job spec is the template its trials are made from; none is
        submitted now (the desk asks for each when a slot can take it, see _ask)."""
        def refuse(message: str) -> Outcome:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"sweep {cmd.name!r}: {message}"))
        if len(cmd.jobs) != 1:
            return refuse(f"a learning sweep takes one job spec, its trials' template (got "
                          f"{len(cmd.jobs)})")
        try:
            check_recorded(cmd.spec)
            validate_spec(cmd.jobs[0], self.state, self.cluster)
            fits_somewhere(cmd.jobs[0], self.state, self.cluster)
        except BadInput as exc:
            return refuse(str(exc).replace("$.spec.", "$.jobs[0].", 1)
                          if isinstance(exc, InvalidSpec) else str(exc))
        out = Outcome()
        sweep_id = f"s{self.state.sweep_number + 1}"
        template = msgspec.structs.replace(cmd.jobs[0], sweep_id=sweep_id)
        try:
            self._emit(out, SweepSubmitted, now, cause, sweep_id=sweep_id, spec=dict(cmd.spec),
                       name=cmd.name, template=template)
        except InvalidEvent as exc:
            return refuse(str(exc))
        out.reply = p.SweepAccepted(req=cmd.req, sweep_id=sweep_id, job_ids=[],
                                    seq=self.state.last_seq, warning=unrouted(template,
                                                                                self.cluster))
        return out

    def _into_study(self, cmd: p.SubmitSweep, now: float) -> str | None:
        """Why trials may not join this sweep now (None: they may): only a client-driven
        study takes them, while it is open and within its samples."""
        sweep = self.state.sweeps[cmd.into]
        if sweep.study is None:
            return None  # a grid or random sweep: any configuration (`evo sweep --resume`)
        if sweep.spec.get("method") == ASKS:
            return f"sweep {cmd.into} asks its sampler for its trials; none can be added"
        if sweep.done or cmd.into not in self.state.learning:
            return f"sweep {cmd.into} is complete: it takes no more trials"
        why = sweep.study.why_done(now)
        if why:
            return f"sweep {cmd.into} takes no more trials: {why}"
        left = sweep.study.samples - len(sweep.study.trials)
        if len(cmd.jobs) > left:
            return (f"sweep {cmd.into} takes {sweep.study.samples} trials and has "
                    f"{len(sweep.study.trials)}: {len(cmd.jobs)} more is over by "
                    f"{len(cmd.jobs) - left}")
        return None

    def _ask(self, out: Outcome, node_name: str, now: float, cause: str, limit: int) -> None:
        """Ask the learning sweeps for trials this node can start now: one per free slot that
        fits a sweep's template, for a sweep with no trial waiting in the queue already. The
        trial's JobSubmitted is the suggestion; decide() then leases it here."""
        node = self.state.nodes.get(node_name)
        if node is None or not node.alive or node.drained or limit < 1:
            return
        free = None
        for sweep_id in list(self.state.learning):
            sweep = self.state.sweeps[sweep_id]
            study, template = sweep.study, sweep.template
            assert study is not None and template is not None
            waiting = any(self.state.jobs[j].state == QUEUED for j in sweep.job_ids[-node.slots:])
            if sweep.spec.get("method") != ASKS or study.why_done(now) or waiting:
                continue
            free = free or free_of(self.state, node)
            probe = Job(job_id="", spec=template, queued_at=now)
            while limit > 0 and not study.why_done(now) and free.slots >= 1 \
                    and misfit(template, free, node) is None \
                    and routing(probe, node, self.state, self.cluster, now)[0] \
                    and outlasts(probe, node, self.state, now) is None:
                devices = pick_devices(template, free, node)
                assert devices is not None
                try:
                    params = self._suggest(sweep)
                except Exception as exc:  # noqa: BLE001 - the sweep ends; the broker serves on
                    study.broken = f"its sampler failed: {type(exc).__name__}: {exc}"[:500]
                    self.state.may_close(sweep, now)
                    break
                self._emit(out, JobSubmitted, now, cause,
                           job_id=f"j{self.state.job_number + 1}",
                           spec=trial_spec(template, params))
                free.take(template, devices)
                limit -= 1

    def _suggest(self, sweep: Sweep) -> dict[str, Any]:
        from evo.sweeps.tpe import STARTUP_TRIALS, suggest

        assert sweep.study is not None
        startup = sweep.spec.get("startup_trials")
        return suggest(sweep.study, sweep.spec["space"],
                       STARTUP_TRIALS if startup is None else int(startup))

    def _prune(self, out: Outcome, now: float, cause: str) -> None:
        """PruneRequested for each trial the pruner has just ruled out."""
        for job_id, (resource, value, why) in list(self.state.to_prune.items()):
            self._emit(out, PruneRequested, now, cause, job_id=job_id, resource=resource,
                       value=value if value == value else None, reason=why)

    # --- clients ------------------------------------------------------------------------------

    def on_submit(self, cmd: p.Submit, now: float, cause: str) -> Outcome:
        spec = cmd.spec
        if spec.key is not None and spec.key in self.state.keys:
            job_id = self.state.keys[spec.key]
            job = self.state.jobs[job_id]
            # Equal digests: the same spec, known from memory. Else (rare: a changed
            # resubmit) the whole spec, from the log for a finished job, says what changed.
            whole = self.spec_of(job) if spec_digest(spec) != job.key_digest else spec
            differs = [f for f in JobSpec.__struct_fields__
                       if getattr(spec, f) != getattr(whole, f)]
            if differs:  # a changed resubmit must not pass for the job that has the key
                return Outcome(reply=p.Error(
                    req=cmd.req, code="conflict",
                    message=f"key {spec.key!r} belongs to job {job_id} ({job.state}), whose "
                            f"spec differs in {', '.join(differs)}: use another key, or "
                            f"`evo retry {job_id}` to run it again"))
            return Outcome(reply=p.Submitted(req=cmd.req, job_id=job_id, seq=job.submitted_seq,
                                             duplicate=True))
        try:
            validate_spec(spec, self.state, self.cluster)
            fits_somewhere(spec, self.state, self.cluster)
        except InvalidSpec as exc:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid", message=str(exc)))
        out = Outcome()
        seq = self.state.last_seq + 1
        job_id = f"j{self.state.job_number + 1}"
        self._emit(out, JobSubmitted, now, cause, job_id=job_id, spec=spec)
        out.reply = p.Submitted(req=cmd.req, job_id=job_id, seq=seq,
                                warning=unrouted(spec, self.cluster))
        return out

    def on_retry(self, cmd: p.Retry, now: float, cause: str) -> Outcome:
        if (unknown := self._unknown_target(cmd)) is not None:
            return unknown
        sweep = self.state.sweeps.get(cmd.target)
        if sweep is not None:
            olds = [j for j in sweep.job_ids if self.state.jobs[j].state in (FAILED, CANCELLED)]
            if not olds:
                return Outcome(reply=p.Error(req=cmd.req, code="conflict", message=(
                    f"sweep {cmd.target} has no failed or cancelled job to run again")))
        else:  # a job (_unknown_target said it is one of the two)
            job = self.state.jobs[cmd.target]
            if job.state not in TERMINAL:
                return Outcome(reply=p.Error(req=cmd.req, code="conflict", message=(
                    f"job {cmd.target} is {job.state}: only a finished job runs again "
                    f"(cancel it first)")))
            olds = [cmd.target]
        out = Outcome()
        first = self.state.last_seq + 1
        events: list[Event] = []
        for i, old in enumerate(olds):  # the same spec, without the key the old job holds
            spec = msgspec.structs.replace(self.spec_of(self.state.jobs[old]), key=None,
                                           retry_of=old)
            events.append(JobSubmitted(seq=first + i, time=now, cause=cause,
                                       job_id=f"j{self.state.job_number + 1 + i}", spec=spec))
        self._emit_all(out, events)
        out.reply = p.Retried(req=cmd.req, job_ids=[e.job_id for e in events  # type: ignore[attr-defined]
                                                    ], of=olds,
                              seq=self.state.last_seq)
        return out

    def on_drain(self, cmd: p.Drain, now: float, cause: str) -> Outcome:
        node = self.state.nodes.get(cmd.node)
        if node is None:
            known = ", ".join(sorted(self.state.nodes)) or "none has joined"
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"no node {cmd.node!r} (known: {known})"))
        out = Outcome()
        if node.drained == cmd.resume:  # it changes
            self._emit(out, NodeResumed if cmd.resume else NodeDrained, now, cause, node=cmd.node)
        out.reply = p.Changed(req=cmd.req, ids=[cmd.node] if out.events else [],
                              seq=self.state.last_seq)
        return out

    def on_hold(self, cmd: p.Hold, now: float, cause: str) -> Outcome:
        if (unknown := self._unknown_target(cmd)) is not None:
            return unknown
        sweep = self.state.sweeps.get(cmd.target)
        if sweep is not None:
            targets = [j for j in sweep.job_ids if self.state.jobs[j].state == QUEUED]
        else:  # a job (_unknown_target said it is one of the two)
            job = self.state.jobs[cmd.target]
            if job.state != QUEUED:
                return Outcome(reply=p.Error(req=cmd.req, code="conflict", message=(
                    f"job {cmd.target} is {job.state}: only a queued job can be "
                    f"{'released' if cmd.release else 'held'}")))
            targets = [cmd.target]
        out = Outcome()
        kind = JobReleased if cmd.release else JobHeld
        for job_id in targets:
            if self.state.jobs[job_id].held != cmd.release:
                continue  # so already
            self._emit(out, kind, now, cause, job_id=job_id)
        out.reply = p.Changed(req=cmd.req, ids=[e.job_id for e in out.events],  # type: ignore[attr-defined]
                              seq=self.state.last_seq)
        return out

    def _unknown_target(self, cmd: p.Cancel | p.Retry | p.Hold) -> Outcome | None:
        """The answer to a command naming neither a job nor a sweep, else None."""
        if cmd.target in self.state.sweeps or cmd.target in self.state.jobs:
            return None
        return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                     message=f"no job or sweep {cmd.target!r}"))

    def on_cancel(self, cmd: p.Cancel, now: float, cause: str) -> Outcome:
        if (unknown := self._unknown_target(cmd)) is not None:
            return unknown
        sweep = self.state.sweeps.get(cmd.target)
        if sweep is not None:
            targets = [j for j in sweep.job_ids if self.state.jobs[j].state not in TERMINAL]
        else:  # a job (_unknown_target said it is one of the two)
            job = self.state.jobs[cmd.target]
            if job.state in TERMINAL:
                return Outcome(reply=p.Error(req=cmd.req, code="conflict",
                                             message=f"job {cmd.target} is already {job.state}"))
            targets = [cmd.target]
        out = Outcome()
        for job_id in targets:
            job = self.state.jobs[job_id]
            if not job.cancel_requested:
                self._emit(out, CancelRequested, now, cause, job_id=job_id, reason=cmd.reason)
            if job.state == QUEUED:  # nothing runs yet: cancelled at once
                self._emit(out, JobCancelled, now, cause, job_id=job_id, reason=cmd.reason)
            # leased or running: the node stops it and reports (see the node commands)
        if sweep is not None and sweep.study is not None and not sweep.done:
            # a study asks no more trials: it is complete now, its last trials being stopped
            self._close_sweeps(out, now, cause, [sweep.sweep_id], "cancelled")
        out.reply = p.Cancelled(req=cmd.req, job_ids=targets, seq=self.state.last_seq)
        return out

    # --- nodes --------------------------------------------------------------------------------

    def on_join(self, cmd: p.Join, now: float, cause: str, mono: float = 0.0) -> Outcome:
        out = Outcome()
        joined: dict[str, Any] = dict(node=cmd.node, hostname=cmd.hostname, cpus=cmd.cpus, mem_gb=cmd.mem_gb,
                      gpus=cmd.gpus, labels=cmd.labels, slots=cmd.slots,
                      capabilities=cmd.capabilities,
                      ends_at=round(now + cmd.ends_in_s, 3) if cmd.ends_in_s else 0.0)
        check(NodeJoined(seq=self.state.last_seq + 1, time=now, **joined))  # before any fold
        old = self.state.nodes.get(cmd.node)
        if old is not None:  # a node that restarted: what it does not carry on is not running
            listed = {job_id for job_id, _ in cmd.running}
            for job_id in sorted(old.running - listed):
                self._attempt_failed(out, self.state.jobs[job_id], now, cause,
                                     error=f"node {cmd.node} joined again without it",
                                     expired_on=cmd.node)
        self._emit(out, NodeJoined, now, cause, **joined)
        self.last_seen[cmd.node] = mono
        self.heartbeat_s[cmd.node] = cmd.heartbeat_s
        # A node that reconnects carries on with the leases that are still its own.
        out.reply = p.Leases(req=cmd.req, cancel=self._not_ours(cmd.node, cmd.running),
                             seq=self.state.last_seq)
        return out

    def _not_ours(self, node: str, running: list[tuple[str, int]]) -> list[str]:
        stale = []
        for job_id, epoch in running:
            job = self.state.jobs.get(job_id)
            if (job is None or job.lease_epoch != epoch or job.node != node
                    or job.state not in ACTIVE or job.cancel_requested):
                stale.append(job_id)
        return stale

    def _to_cancel(self, node: str) -> list[str]:
        n = self.state.nodes.get(node)
        if n is None:
            return []
        return [j for j in n.running
                if self.state.jobs[j].cancel_requested or self.state.jobs[j].prune]

    def _seen(self, cmd: p.Command, node: str, mono: float) -> Outcome | None:
        """Note that a joined node is alive; an error telling it to rejoin if it is not joined."""
        n = self.state.nodes.get(node)
        if n is None or not n.alive:
            return Outcome(reply=p.Error(req=cmd.req, code="rejoin",
                                         message=f"node {node!r} is not joined; send join"))
        self.last_seen[node] = mono
        return None

    def on_heartbeat(self, cmd: p.Heartbeat, now: float, cause: str, mono: float = 0.0) -> Outcome:
        err = self._seen(cmd, cmd.node, mono)
        if err is not None:
            return err
        out = Outcome()
        if cmd.util:
            self._emit(out, UtilizationSampled, now, cause, node=cmd.node,
                       cpu=cmd.util.get("cpu", 0.0), mem=cmd.util.get("mem", 0.0),
                       gpus=cmd.gpus, running=len(cmd.running))
        cancel = self._to_cancel(cmd.node) + self._not_ours(cmd.node, cmd.running)
        out.reply = p.Leases(req=cmd.req, cancel=sorted(set(cancel)), seq=self.state.last_seq)
        return out

    def on_ready(self, cmd: p.Ready, now: float, cause: str, mono: float = 0.0) -> Outcome:
        err = self._seen(cmd, cmd.node, mono)
        if err is not None:
            return err
        out = Outcome()
        grants = []
        if self.state.learning:
            free_slots = (cmd.max_leases or 1_000_000) - cmd.ahead
            self._ask(out, cmd.node, now, cause, free_slots)
        for g in decide(self.state, cmd.node, now, self.cluster, cmd.max_leases or None,
                        cmd.ahead):
            job = self.state.jobs[g.job_id]
            ev = self._emit(out, JobLeased, now, cause, job_id=g.job_id, attempt=job.attempt + 1,
                            node=g.node, devices=list(g.devices),
                            deadline=mono + 3 * self.heartbeat_s.get(cmd.node, 2.0),
                            fallback=g.fallback, ahead=g.ahead)
            grants.append(p.LeaseGrant(job_id=g.job_id, lease_epoch=ev.seq, attempt=job.attempt,
                                       spec=job.spec, devices=list(g.devices),
                                       resume=job.checkpoint, resume_step=job.checkpoint_step))
        out.reply = p.Leases(req=cmd.req, leases=grants, cancel=self._to_cancel(cmd.node),
                             seq=self.state.last_seq)
        out.park = not grants and not out.reply.cancel and cmd.wait_s > 0
        return out

    def on_report(self, cmd: p.Report, now: float, cause: str, mono: float = 0.0) -> Outcome:
        out = Outcome()
        job = self.state.jobs.get(cmd.job_id)
        if job is None:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"no job {cmd.job_id!r}"))
        if cmd.node in self.last_seen:
            self.last_seen[cmd.node] = mono
        body = cmd.report
        kind = p.report_kind(body)
        current = (job.lease_epoch == cmd.lease_epoch and job.node == cmd.node
                   and job.state in ACTIVE)
        if not current:
            why = (f"lease {cmd.lease_epoch} of {cmd.job_id} is not current "
                   f"(job is {job.state}, lease {job.lease_epoch or 'none'} on {job.node or '-'})")
            self._reject(out, cmd, kind, why, now, cause)
            out.reply = p.Error(req=cmd.req, code="stale", message=why)
            return out
        if isinstance(body, p.RefusedReport):  # the node could not read what the job wrote
            self._reject(out, cmd, body.report or "report", body.reason, now, cause)
            out.reply = p.Ok(req=cmd.req, seq=self.state.last_seq)
            return out
        bad = p.report_error(body)
        try:
            if bad is None:
                self._apply_report(out, job, cmd, body, now, cause)
        except InvalidEvent as exc:
            if out.events:
                raise  # part of it is folded already: the server restores the state
            bad = str(exc)
        if bad is not None:  # recorded, never applied: the attempt goes on
            self._reject(out, cmd, kind, bad, now, cause)
            out.reply = p.Error(req=cmd.req, code="rejected", message=f"{kind} report of "
                                f"{cmd.job_id} refused: {bad}")
            return out
        if self.state.to_prune:
            self._prune(out, now, cause)
        stop = job.prune if any(type(e) is PruneRequested for e in out.events) else ""
        out.reply = p.Ok(req=cmd.req, seq=self.state.last_seq,  # the node stops it at once
                         data={"stop": f"pruned: {stop}"} if stop else {})
        return out

    def _reject(self, out: Outcome, cmd: p.Report, kind: str, why: str, now: float,
                cause: str) -> None:
        self._emit(out, ReportRejected, now, cause, job_id=cmd.job_id,
                   lease_epoch=cmd.lease_epoch, node=cmd.node, report=kind, reason=why)

    def _apply_report(self, out: Outcome, job: Job, cmd: p.Report, body: p.ReportBody,
                      now: float, cause: str) -> None:
        ids = {"job_id": cmd.job_id, "lease_epoch": cmd.lease_epoch}
        if isinstance(body, p.ProgressReport):
            self._emit(out, Progress, now, cause, step=body.step, epoch=body.epoch,
                       metrics=body.metrics, eta_s=body.eta_s, **ids)
        elif isinstance(body, p.StartedReport):
            self._emit(out, JobStarted, now, cause, pid=body.pid, env=body.env, **ids)
        elif isinstance(body, p.CheckpointReport):
            self._emit(out, Checkpointed, now, cause, path=body.path, step=body.step,
                       metrics=body.metrics, digest=body.digest, size=body.size, **ids)
        elif isinstance(body, p.CompletedReport):
            self._emit(out, JobCompleted, now, cause, metrics=body.metrics,
                       artifacts=body.artifacts, duration_s=body.duration_s,
                       outputs=body.outputs, **ids)
        elif isinstance(body, (p.CancelledReport, p.FailedReport)) and job.prune:
            self._emit(out, JobPruned, now, cause, job_id=cmd.job_id, reason=job.prune,
                       lease_epoch=cmd.lease_epoch)
        elif isinstance(body, p.CancelledReport) and job.cancel_requested:
            self._emit(out, JobCancelled, now, cause, job_id=cmd.job_id,
                       reason=body.reason or "cancelled")
        elif isinstance(body, p.CancelledReport):
            self._attempt_failed(out, job, now, cause, error=body.reason or "cancelled")
        else:
            assert isinstance(body, p.FailedReport)
            self._attempt_failed(out, job, now, cause, error=body.error or "failed",
                                 exit_code=body.exit_code, retryable=body.retryable)

    def _attempt_failed(self, out: Outcome, job: Job, now: float, cause: str, *, error: str,
                        exit_code: int | None = None, retryable: bool = True,
                        expired_on: str | None = None) -> None:
        if job.prune:  # stopped by its pruner, however it ends: pruned, not run again
            self._emit(out, JobPruned, now, cause, job_id=job.job_id, reason=job.prune,
                       lease_epoch=job.lease_epoch)
            return
        if expired_on is not None and job.state == LEASED:
            # never started (leased ahead, or the node stopped before it started it): given
            # back, not an attempt that counts (max_attempts counts runs): no backoff
            self._emit(out, LeaseExpired, now, cause, job_id=job.job_id,
                       lease_epoch=job.lease_epoch, node=expired_on)
            return
        # a failed report means the attempt ran, JobStarted or not (the fold counts it too)
        runs = job.runs + (expired_on is None and job.started_epoch != job.lease_epoch)
        final = not retryable or runs >= job.spec.max_attempts
        if expired_on is not None:
            self._emit(out, LeaseExpired, now, cause, job_id=job.job_id,
                       lease_epoch=job.lease_epoch, node=expired_on)
            if final:
                self._emit(out, JobFailed, now, cause, job_id=job.job_id, error=error,
                           retryable=False, final=True)
                return
        else:
            self._emit(out, JobFailed, now, cause, job_id=job.job_id, lease_epoch=job.lease_epoch,
                       error=error, exit_code=exit_code, retryable=retryable, final=final)
        if not final:
            delay = compute_backoff(job.attempt)
            self._emit(out, RetryScheduled, now, cause, job_id=job.job_id,
                       attempt=job.attempt + 1, not_before=now + delay, delay_s=delay)

    def on_leave(self, cmd: p.Leave, now: float, cause: str, mono: float = 0.0) -> Outcome:
        err = self._seen(cmd, cmd.node, mono)
        if err is not None:
            return err
        out = Outcome()
        for job_id in sorted(self.state.nodes[cmd.node].running):
            self._attempt_failed(out, self.state.jobs[job_id], now, cause,
                                 error=f"node {cmd.node} left", expired_on=cmd.node)
        self._emit(out, NodeLeft, now, cause, node=cmd.node)
        self.last_seen.pop(cmd.node, None)
        out.reply = p.Ok(req=cmd.req, seq=self.state.last_seq)
        return out

    # --- timers -------------------------------------------------------------------------------

    def next_lost(self) -> float | None:
        """The monotonic time at which the first silent node would count as lost (None: no
        node), so the server's timer can wait for it instead of looking every moment."""
        return min((lost_after(seen, self.heartbeat_s.get(node, 2.0))
                    for node, seen in self.last_seen.items()), default=None)

    def tick(self, now: float, mono: float) -> Outcome:
        """Expire the leases of nodes that went silent; fail jobs whose dependency failed."""
        out = Outcome()
        for node, seen in list(self.last_seen.items()):
            if is_lost(seen, mono, self.heartbeat_s.get(node, 2.0)):
                n = self.state.nodes[node]
                for job_id in sorted(n.running):
                    self._attempt_failed(out, self.state.jobs[job_id], now, "tick",
                                         error=f"lease on {node} expired", expired_on=node)
                missed = (mono - seen) / self.heartbeat_s.get(node, 2.0)
                self._emit(out, NodeLost, now, "tick", node=node,
                           reason=f"{missed:.1f} heartbeats missed")
                del self.last_seen[node]
        for job_id in list(self.state.waiting):
            job = self.state.jobs[job_id]
            for dep in job.spec.after:
                d = self.state.jobs.get(dep)
                if d is not None and d.state in TERMINAL and d.state != COMPLETED:
                    self._emit(out, JobFailed, now, "tick", job_id=job_id, retryable=False,
                               final=True, error=f"dependency {dep} {d.state}")
                    break
        for sweep_id in list(self.state.learning):  # a time budget ends with no event
            self.state.may_close(self.state.sweeps[sweep_id], now)
        if self.state.closable:
            self._close_sweeps(out, now, "tick")
        return out

    def on_hello(self, cmd: p.Hello, now: float, cause: str) -> Outcome:
        # The server fills in the endpoint; the desk only knows the state.
        return Outcome(reply=p.Welcome(req=cmd.req, events_endpoint="",
                                       last_seq=self.state.last_seq))

    def on_why(self, cmd: p.Why, now: float, cause: str) -> Outcome:
        if cmd.job_id not in self.state.jobs:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"no job {cmd.job_id!r}"))
        return Outcome(reply=p.Explanation(req=cmd.req,
                                           text=explain(self.state, cmd.job_id, now, self.cluster)))

    def on_estimate(self, cmd: p.Estimate, now: float, cause: str) -> Outcome:
        nodes = [n for n in self.state.nodes.values() if n.alive and not n.drained]
        rows = []
        for spec in cmd.specs:
            row: dict[str, list | None] = {}
            for n in nodes:
                est = self.state.durations.estimate(spec, n.node)
                row[n.node] = [round(est.seconds, 3), est.basis] if est is not None else None
            rows.append(row)
        return Outcome(reply=p.Estimates(req=cmd.req, jobs=rows, nodes=[
            {"node": n.node, "slots": n.slots, "labels": n.labels} for n in nodes]))

    def on_status(self, cmd: p.Status, now: float, cause: str) -> Outcome:
        heard = {n: round(max(self.mono_now - t, 0.0), 1) for n, t in self.last_seen.items()}
        return Outcome(reply=status_of(self.state, cmd.req, now=now, cluster=self.cluster,
                                       within_s=cmd.within_s, heard=heard, order=cmd.order))


def _handlers_of(cls: type) -> dict[type, Callable[..., Outcome]]:
    """Command type -> ``on_<command>`` method, for every command the class serves."""
    out = {}
    for cmd in p.AnyCommand.__args__:  # type: ignore[attr-defined]
        method = getattr(cls, "on_" + cmd.__name__.lower(), None)
        if method is not None:
            out[cmd] = method
    return out


Desk._handlers = _handlers_of(Desk)
_NODE_COMMANDS = {p.Join, p.Heartbeat, p.Ready, p.Report, p.Leave}


def best_job(jobs: list[Job], metric: str, mode: str) -> str | None:
    """The completed job with the best value of ``metric`` (ties: the earliest submitted)."""
    sign = -1.0 if mode == "max" else 1.0
    scored = [(sign * j.metrics[metric], j.submitted_seq, j.job_id) for j in jobs
              if j.state == COMPLETED and metric in j.metrics and j.metrics[metric] == j.metrics[metric]]
    return min(scored)[2] if scored else None
