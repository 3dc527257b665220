"""The broker's front desk: commands in, events and replies out. Pure.

``Desk.handle(cmd, now)`` validates a command against the current state and returns the
events it causes (seq and time stamped, already folded into the state, so the next command in
the same batch sees them) and the reply to send once the batch is durable. A rejected command
returns an ``Error`` reply and no events. Sockets, the log and the clock live in server.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evo.errors import BadInput
from evo.events.schema import CancelRequested, Event, JobCancelled, JobSpec, JobSubmitted

from . import protocol as p
from .state import ACTIVE, QUEUED, TERMINAL, BrokerState


class InvalidSpec(BadInput):
    """Raised when a job spec is invalid in itself; the message names the field path."""


def validate_spec(spec: JobSpec, state: BrokerState | None = None) -> None:
    """Check what a spec says about itself (and which jobs it depends on)."""
    if (spec.command is None) == (spec.callable is None):
        got = "both" if spec.command is not None else "neither"
        raise InvalidSpec(f"$.spec: expected exactly one of `command` or `callable` (got {got})")
    if spec.command is not None and (not spec.command or not all(spec.command)):
        raise InvalidSpec("$.spec.command: expected a non-empty argv list of non-empty strings")
    if spec.callable is not None and (":" not in spec.callable
                                      or not all(spec.callable.split(":", 1))):
        raise InvalidSpec(f"$.spec.callable: expected `module:function`, got {spec.callable!r}")
    r = spec.resources
    if r.cpus < 0 or r.mem_gb < 0 or r.gpus < 0 or r.vram_gb < 0:
        for name in ("cpus", "mem_gb", "gpus", "vram_gb"):
            value = getattr(r, name)
            if value < 0:
                raise InvalidSpec(f"$.spec.resources.{name}: expected >= 0, got {value}")
    if r.vram_gb > 0 and r.gpus == 0:
        raise InvalidSpec("$.spec.resources.vram_gb: VRAM was asked for without a GPU (gpus=0)")
    if spec.max_attempts < 1:
        raise InvalidSpec(f"$.spec.max_attempts: expected >= 1, got {spec.max_attempts}")
    if state is not None and spec.after:
        for i, dep in enumerate(spec.after):
            if dep not in state.jobs:
                raise InvalidSpec(f"$.spec.after[{i}]: unknown job {dep!r}")


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    reply: p.Reply | None = None


class Desk:
    """Turns commands into events. Holds the state it folds into; owns no I/O."""

    _handlers: dict[type, object] = {}

    def __init__(self, state: BrokerState | None = None) -> None:
        self.state = state or BrokerState()

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        cls._handlers = _handlers_of(cls)

    def _emit(self, out: Outcome, cls: type[Event], now: float, cause: str, **fields) -> Event:
        """Stamp the next seq and the time on a new event and fold it into the state."""
        event = cls(seq=self.state.last_seq + 1, time=now, cause=cause, **fields)
        self.state.apply(event)
        out.events.append(event)
        return event

    def handle(self, cmd: p.Command, now: float, *, cause: str = "") -> Outcome:
        method = self._handlers.get(type(cmd))
        if method is None:
            return Outcome(reply=p.Error(req=cmd.req, code="unknown",
                                         message=f"command {type(cmd).__name__} is not served"))
        return method(self, cmd, now, cause)

    # --- clients ------------------------------------------------------------------------------

    def on_submit(self, cmd: p.Submit, now: float, cause: str) -> Outcome:
        spec = cmd.spec
        if spec.key is not None and spec.key in self.state.keys:
            job_id = self.state.keys[spec.key]
            job = self.state.jobs[job_id]
            return Outcome(reply=p.Submitted(req=cmd.req, job_id=job_id, seq=job.submitted_seq,
                                             duplicate=True))
        try:
            validate_spec(spec, self.state)
        except InvalidSpec as exc:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid", message=str(exc)))
        seq = self.state.last_seq + 1
        job_id = f"j{seq}"
        event = JobSubmitted(seq=seq, time=now, cause=cause, job_id=job_id, spec=spec)
        self.state.apply(event)
        return Outcome([event], p.Submitted(req=cmd.req, job_id=job_id, seq=seq))

    def on_cancel(self, cmd: p.Cancel, now: float, cause: str) -> Outcome:
        sweep = self.state.sweeps.get(cmd.target)
        if sweep is not None:
            targets = [j for j in sweep.job_ids if self.state.jobs[j].state not in TERMINAL]
        elif cmd.target in self.state.jobs:
            job = self.state.jobs[cmd.target]
            if job.state in TERMINAL:
                return Outcome(reply=p.Error(req=cmd.req, code="conflict",
                                             message=f"job {cmd.target} is already {job.state}"))
            targets = [cmd.target]
        else:
            return Outcome(reply=p.Error(req=cmd.req, code="invalid",
                                         message=f"no job or sweep {cmd.target!r}"))
        out = Outcome()
        for job_id in targets:
            job = self.state.jobs[job_id]
            if not job.cancel_requested:
                self._emit(out, CancelRequested, now, cause, job_id=job_id, reason=cmd.reason)
            if job.state == QUEUED:  # nothing runs yet: cancelled at once
                self._emit(out, JobCancelled, now, cause, job_id=job_id, reason=cmd.reason)
            # leased or running: the node stops it and reports (see the node commands)
        out.reply = p.Cancelled(req=cmd.req, job_ids=targets, seq=self.state.last_seq)
        return out

    def on_hello(self, cmd: p.Hello, now: float, cause: str) -> Outcome:
        # The server fills in the endpoint; the desk only knows the state.
        return Outcome(reply=p.Welcome(req=cmd.req, events_endpoint="",
                                       last_seq=self.state.last_seq))

    def on_status(self, cmd: p.Status, now: float, cause: str) -> Outcome:
        return Outcome(reply=status_of(self.state, cmd.req))


def _handlers_of(cls: type) -> dict[type, object]:
    """Command type -> ``on_<command>`` method, for every command the class serves."""
    out = {}
    for cmd in p.AnyCommand.__args__:  # type: ignore[attr-defined]
        method = getattr(cls, "on_" + cmd.__name__.lower(), None)
        if method is not None:
            out[cmd] = method
    return out


Desk._handlers = _handlers_of(Desk)


def status_of(state: BrokerState, req: int = 0, *, limit: int = 50) -> p.StatusReply:
    nodes = [
        {"node": n.node, "alive": n.alive, "labels": n.labels, "slots": n.slots,
         "cpus": n.cpus, "mem_gb": n.mem_gb, "gpus": len(n.gpus), "running": len(n.running)}
        for n in state.nodes.values()
    ]
    running, queued = [], []
    for job in state.jobs.values():
        if job.state in ACTIVE and len(running) < limit:
            running.append({"job_id": job.job_id, "state": job.state, "node": job.node,
                            "attempt": job.attempt, "name": _name(job.spec)})
        elif job.state == QUEUED and len(queued) < limit:
            queued.append({"job_id": job.job_id, "priority": job.spec.priority,
                           "attempt": job.attempt, "name": _name(job.spec)})
    counts = {k: v for k, v in state.counts.items() if v}
    return p.StatusReply(req=req, last_seq=state.last_seq, jobs=counts, nodes=nodes,
                         running=running, queued=queued)


def _name(spec: JobSpec) -> str:
    if spec.name:
        return spec.name
    if spec.trainer:
        return spec.trainer
    if spec.command:
        return " ".join(spec.command)[:60]
    return spec.callable or ""
