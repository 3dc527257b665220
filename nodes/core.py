"""The node's core: leases, lease-ahead, admission, heartbeats, report bookkeeping, cancel and
drain, as a pure state machine. It reads no sockets, processes, files or clocks.

``NodeCore.handle(event, now)`` takes what happened (the broker's answer to a request, a
report an attempt wrote, an attempt's end, time passing) and returns what to do about it, as a
list of instructions (send this, start that, stop that). The daemon (daemon.py) owns the
sockets, the processes and the clock: it turns what it sees into events and carries the
instructions out. ``now`` is the daemon's monotonic clock; every duration and deadline here is
on it, so a wall-clock step changes nothing.

The rules:

  * **Admission.** A leased job starts when the node's own free slots, CPUs, memory and
    devices take it (the scheduler's ``free_for``/``fits_on``, the rule the broker counts by);
    first come, first started: a job that does not fit holds back the ones behind it. A job
    starts alone whatever it asks for (the broker leased it here knowing this machine).
  * **Lease-ahead.** While recent attempts are short (under SHORT_TRIAL_S on average), the
    node asks for ``lease_ahead`` more jobs than it has free slots and queues them, so
    back-to-back short trials never wait for the broker; while they take under
    MEDIUM_TRIAL_S, one per slot. Long jobs are never leased ahead, so a node does not sit on
    work another idle node could run. One Ready is outstanding at a time (a long poll the
    broker answers when work appears); it waits only when nothing happened since the last
    tick.
  * **Reports.** Every report names its lease epoch. A final report (completed, failed,
    cancelled) stays owed until the broker acknowledges it: it is in every Join and heartbeat,
    sent again after a reconnect, and sent again at each heartbeat while the broker cannot
    write. A report the broker calls stale means the lease was taken back: the attempt is
    stopped, never finished twice. A final report it refuses is replaced, once, by
    REFUSED_FINAL, so the job ends.
  * **Cancel.** A job the broker cancels that has not started is reported cancelled at once; a
    running one is stopped (and ends with its own final report). A trial its sweep's pruner
    stops is stopped the same way, as soon as the answer to its report says so.
  * **A pilot's end.** A node with an end (``ends_at``, a Slurm allocation less its grace)
    stops what runs at that time and leaves, as a stop without drain does; with
    ``idle_exit_s``, a node with nothing to run (and nothing owed) for that long drains and
    leaves.
  * **Drain.** Once asked to stop, the node takes nothing new (queued leases are dropped: the
    broker gives them back when the node leaves), keeps heartbeating, and leaves when its
    attempts have ended and their reports are acknowledged; attempts still running at the
    drain's deadline are stopped with a short grace, and the node leaves LEAVE_AFTER_S later
    whatever is still owed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from evo.broker import protocol as p
from evo.broker.scheduler import fits_on, free_for

SHORT_TRIAL_S = 0.5
MEDIUM_TRIAL_S = 5.0
DRAIN_S = 60.0  # how long a draining node lets its attempts run before it stops them
STOP_GRACE_S = 2.0  # SIGTERM to SIGKILL for attempts stopped because the node stops
LEAVE_AFTER_S = 3.0  # after stopping them: the node leaves, owed reports or not
CANCEL_GRACE_S = 5.0
STALE_GRACE_S = 1.0

# Sent in place of a final report the broker refused: short, plain, not retried.
REFUSED_FINAL = p.FailedReport(error="evo could not record the job's final report (the reason "
                               "is on its stderr and in the node's log)", retryable=False)


# --- events: what happened ------------------------------------------------------------------


class Event(msgspec.Struct, frozen=True):
    pass


class Tick(Event, frozen=True):
    """Time passed: heartbeats, queued starts, asking for work and the drain's deadlines."""


class Joined(Event, frozen=True):
    """The broker took our Join; ``cancel``: carried jobs that are no longer ours."""

    cancel: tuple[str, ...] = ()


class Disconnected(Event, frozen=True):
    """The connection is gone: no request is outstanding any more."""


class Leased(Event, frozen=True):
    """The answer to Ready (empty when it was an error)."""

    leases: tuple[p.LeaseGrant, ...] = ()
    cancel: tuple[str, ...] = ()


class Beat(Event, frozen=True):
    """The answer to a heartbeat: jobs the broker wants stopped."""

    cancel: tuple[str, ...] = ()


class Reported(Event, frozen=True):
    """A running attempt's report (started, progress, checkpoint, refused), ready to send."""

    cmd: p.Report


class Ended(Event, frozen=True):
    """An attempt ended and its output is shipped: ``cmd`` is its final report."""

    cmd: p.Report


class Answered(Event, frozen=True):
    """The broker's answer to the report ``cmd``: ``code`` is "" for Ok, else the error's."""

    cmd: p.Report
    code: str = ""
    message: str = ""
    stop: str = ""  # an Ok that asks for the attempt to stop (its sweep's pruner): why


class Stop(Event, frozen=True):
    """Stop: with ``drain``, let what runs finish (up to DRAIN_S) first."""

    drain: bool = True


# --- instructions: what to do ---------------------------------------------------------------


class Instruction(msgspec.Struct, frozen=True):
    pass


class SendReady(Instruction, frozen=True):
    max_leases: int
    wait_s: float
    ahead: int


class SendHeartbeat(Instruction, frozen=True):
    running: tuple[tuple[str, int], ...]
    sample: bool  # with a utilisation sample


class SendReport(Instruction, frozen=True):
    cmd: p.Report


class Start(Instruction, frozen=True):
    grant: p.LeaseGrant


class Kill(Instruction, frozen=True):
    """Stop a running attempt: SIGTERM now, SIGKILL after ``grace_s``."""

    job_id: str
    grace_s: float
    why: str


class Note(Instruction, frozen=True):
    """A line for a running job's stderr."""

    job_id: str
    text: str


class Warn(Instruction, frozen=True):
    """A line for the node's log."""

    text: str


class Leave(Instruction, frozen=True):
    """Everything is done (or the drain ran out): leave the broker."""


# --- the core -----------------------------------------------------------------------------------


@dataclass
class Running:
    grant: p.LeaseGrant
    started: float  # on the monotonic clock
    stopping: bool = False


@dataclass
class NodeCore:
    node: str
    slots: int
    cpus: float
    mem_gb: float
    vram: dict[int, float] = field(default_factory=dict)  # device index -> GiB
    lease_ahead: int = 0
    heartbeat_s: float = 2.0
    util_every_s: float = 5.0
    idle_wait_s: float = 1.0
    # A pilot (a Slurm allocation): at ``ends_at`` it stops what still runs and leaves, and
    # with nothing to run for ``idle_exit_s`` it drains and leaves.
    ends_at: float | None = None
    idle_exit_s: float = 0.0
    idle_since: float | None = None

    queued: dict[str, p.LeaseGrant] = field(default_factory=dict)  # leased, waiting for a slot
    running: dict[str, Running] = field(default_factory=dict)
    finishing: dict[str, tuple[p.Report, bool]] = field(default_factory=dict)  # owed; ran?
    owed: list[p.Report] = field(default_factory=list)  # refused while the broker could not write
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    ready_out: bool = False  # a Ready is outstanding
    busy: bool = False  # something happened since the last tick: ask for work without waiting
    next_hb: float = 0.0
    next_util: float = 0.0
    stop_at: float | None = None  # the drain's deadline, once asked to stop
    killed: bool = False  # what ran at the deadline has been told to stop
    leave_at: float = 0.0
    left: bool = False

    # --- queries ------------------------------------------------------------------------------

    def held(self) -> list[tuple[str, int]]:
        """The leases this node holds (for Join and heartbeats): what runs, waits here, or has
        a final report owed."""
        held = {cmd.job_id: cmd.lease_epoch for cmd, _ in self.finishing.values()}
        for g in [*(r.grant for r in self.running.values()), *self.queued.values()]:
            held[g.job_id] = g.lease_epoch  # a job leased again: its newest lease
        return list(held.items())

    def ahead(self) -> int:
        """How many leases to queue here beyond the free slots: only while trials are short."""
        if self.lease_ahead <= 0 or len(self.durations) < 4 or self.stop_at is not None:
            return 0
        mean = sum(self.durations) / len(self.durations)
        if mean < SHORT_TRIAL_S:
            return self.lease_ahead
        # Trials of a few seconds: one queued per slot hides the round trip between trials,
        # while holding back at most one trial's worth of work from other nodes.
        return min(self.lease_ahead, self.slots) if mean < MEDIUM_TRIAL_S else 0

    def next_deadline(self) -> float:
        """When the core next has something to do without a new event."""
        times = [self.next_hb]
        if self.ends_at is not None and self.stop_at is None:
            times.append(self.ends_at)
        if self.stop_at is not None and not self.left:
            times.append(self.leave_at if self.killed else self.stop_at)
        return min(times)

    def fits(self, grant: p.LeaseGrant) -> bool:
        """Whether this node's own free slots, CPUs, memory and devices take the job now: the
        scheduler's rule, over what this node itself runs."""
        free = free_for(self.slots, self.cpus, self.mem_gb, self.vram,
                        [(r.grant.spec, r.grant.devices) for r in self.running.values()])
        return fits_on(grant.spec, grant.devices, free, self.vram)

    def problems(self) -> list[str]:
        """What breaks the core's invariants (empty when none): checked after the tests."""
        out = []
        both = sorted(j for j, g in self.queued.items()
                      if j in self.running and self.running[j].grant.lease_epoch == g.lease_epoch)
        if both:
            out.append(f"one lease queued and running at once: {both}")
        owed_running = sorted(j for j, (cmd, _) in self.finishing.items()
                              if (j in self.running
                                  and self.running[j].grant.lease_epoch == cmd.lease_epoch)
                              or (j in self.queued
                                  and self.queued[j].lease_epoch == cmd.lease_epoch))
        if owed_running:
            out.append(f"a final report owed for leases still here: {owed_running}")
        if len(self.running) > 1:
            free = free_for(self.slots, self.cpus, self.mem_gb, self.vram,
                            [(r.grant.spec, r.grant.devices) for r in self.running.values()])
            if free.slots < 0 or free.cpus < -1e-9 or free.mem_gb < -1e-9 or \
                    any(v < -1e-9 for v in free.gpus.values()):
                out.append(f"admitted past the node's size: {free}")
        if self.stop_at is not None and self.queued:
            out.append(f"stopping with leases queued: {sorted(self.queued)}")
        for cmd in self.owed:
            if cmd.job_id not in self.finishing:
                out.append(f"report of {cmd.job_id} owed but not finishing")
        return out

    # --- events -------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Instruction]:
        out: list[Instruction] = []
        if self.left:
            return out
        kind = type(event)
        if kind is Tick:
            self._tick(out, now)
        elif isinstance(event, Reported):
            self._send(out, event.cmd, ran=True)
            self.busy = True
        elif isinstance(event, Ended):
            run = self.running.get(event.cmd.job_id)
            if run is not None and run.grant.lease_epoch == event.cmd.lease_epoch:
                del self.running[event.cmd.job_id]
                self.durations.append(max(0.0, now - run.started))
            self._send(out, event.cmd, ran=True)
            self.busy = True
        elif isinstance(event, Answered):
            self._answered(out, event)
        elif isinstance(event, Leased):
            self.ready_out = False
            self._cancel(out, event.cancel, "cancel requested")
            if self.stop_at is None:  # else the broker takes them back when we leave
                for grant in event.leases:  # (a job's old attempt may still be ending here)
                    self.queued[grant.job_id] = grant
                    self.busy = True
                self._start_queued(out, now)
        elif isinstance(event, Beat):
            self._cancel(out, event.cancel, "cancel requested")
        elif isinstance(event, Joined):
            self.ready_out = False
            for job_id in event.cancel:  # not ours any more: nothing to report
                self.finishing.pop(job_id, None)
                self.queued.pop(job_id, None)
            self._cancel(out, event.cancel, "the broker no longer holds its lease")
            self.owed.clear()
            for cmd, _ in self.finishing.values():  # owed final reports, again
                out.append(SendReport(cmd))
            self.next_hb = now  # say how we are at once
        elif kind is Disconnected:
            self.ready_out = False
        elif isinstance(event, Stop):
            self._stop(event.drain, now)
            self._tick(out, now)
        else:
            raise TypeError(f"not a node event: {event!r}")
        if self.idle_exit_s and (self.running or self.queued or self.finishing):
            self.idle_since = now  # busy until the last attempt's report is acknowledged
        return out

    def _stop(self, drain: bool, now: float) -> None:
        if self.stop_at is None:
            self.stop_at = now + (DRAIN_S if drain else 0.0)
            self.queued.clear()
        elif not drain:
            self.stop_at = min(self.stop_at, now)

    def _pilot(self, out: list[Instruction], now: float) -> None:
        """A pilot's end and its idle exit (see ``ends_at``)."""
        if self.ends_at is not None and now >= self.ends_at and (self.stop_at is None
                                                                 or self.stop_at > now):
            out.append(Warn("the allocation's end is here: stopping what runs and leaving"))
            self._stop(False, now)
        if self.running or self.queued or self.finishing or self.idle_since is None:
            self.idle_since = now
        elif self.idle_exit_s and self.stop_at is None \
                and now - self.idle_since >= self.idle_exit_s:
            out.append(Warn(f"idle for {now - self.idle_since:.0f}s: leaving"))
            self._stop(True, now)

    def _tick(self, out: list[Instruction], now: float) -> None:
        if self.ends_at is not None or self.idle_exit_s:
            self._pilot(out, now)
        if now >= self.next_hb:
            sample = now >= self.next_util
            if sample:
                self.next_util = now + self.util_every_s
            out.append(SendHeartbeat(running=tuple(self.held()), sample=sample))
            self.next_hb = now + self.heartbeat_s
            owed, self.owed = self.owed, []
            for cmd in owed:  # refused while the broker could not write: try again
                if cmd.job_id in self.finishing:
                    out.append(SendReport(cmd))
        if self.stop_at is not None:
            self._stopping(out, now)
            return
        started = self._start_queued(out, now)
        ahead = self.ahead()
        want = self.slots + ahead - len(self.running) - len(self.queued)
        if want > 0 and not self.ready_out:
            wait = 0.0 if (self.busy or started) else self.idle_wait_s
            out.append(SendReady(max_leases=want, wait_s=wait, ahead=ahead))
            self.ready_out = True
        self.busy = False

    def _stopping(self, out: list[Instruction], now: float) -> None:
        assert self.stop_at is not None
        if not self.killed and now >= self.stop_at:  # what runs is stopped; owed reports
            for job_id, run in self.running.items():  # get LEAVE_AFTER_S more
                out.append(Kill(job_id, STOP_GRACE_S, "the node is stopping"))
                run.stopping = True
            self.killed = True
            self.leave_at = now + LEAVE_AFTER_S
        if (not self.running and not self.finishing) or (self.killed and now >= self.leave_at):
            out.append(Leave())
            self.left = True

    def _start_queued(self, out: list[Instruction], now: float) -> bool:
        started = False
        while self.queued:
            grant = next(iter(self.queued.values()))
            if grant.job_id in self.running or (self.running and not self.fits(grant)):
                # first come, first started: later jobs wait behind it (and a job leased
                # again waits for its old attempt, being stopped, to end)
                break
            del self.queued[grant.job_id]
            self.running[grant.job_id] = Running(grant, now)
            out.append(Start(grant))
            started = True
        return started

    def _cancel(self, out: list[Instruction], job_ids: tuple[str, ...], why: str) -> None:
        for job_id in job_ids:
            grant = self.queued.pop(job_id, None)
            if grant is not None:  # never started: nothing to stop
                self._send(out, p.Report(node=self.node, job_id=job_id,
                                         lease_epoch=grant.lease_epoch,
                                         report=p.CancelledReport(reason=why)), ran=False)
                continue
            run = self.running.get(job_id)
            if run is not None and not run.stopping:
                run.stopping = True
                out.append(Kill(job_id, CANCEL_GRACE_S, why))

    def _send(self, out: list[Instruction], cmd: p.Report, ran: bool) -> None:
        if isinstance(cmd.report, p.FINAL_REPORTS):
            self.finishing[cmd.job_id] = (cmd, ran)
        out.append(SendReport(cmd))

    def _answered(self, out: list[Instruction], ev: Answered) -> None:
        cmd, job_id = ev.cmd, ev.cmd.job_id
        final = isinstance(cmd.report, p.FINAL_REPORTS)
        if final and self.finishing.get(job_id, (None,))[0] != cmd:
            return  # the answer to a report sent before: another is owed now (or none)
        if ev.code == "unavailable":
            if final:  # the broker cannot write now: still owed, sent again
                self.owed.append(cmd)
            return
        ran = self.finishing.pop(job_id)[1] if final else True
        if not ev.code:
            run = self.running.get(job_id)
            if ev.stop and run is not None and run.grant.lease_epoch == cmd.lease_epoch:
                self._cancel(out, (job_id,), ev.stop)  # at once, not at the next heartbeat
            return
        run = self.running.get(job_id)
        if run is not None and run.grant.lease_epoch != cmd.lease_epoch:
            run = None  # the answer is about an earlier attempt of a job leased here again
        if ev.code == "stale":
            out.append(Warn(f"{job_id}: {ev.message}; stopping the attempt"))
            if run is not None:
                run.stopping = True
                out.append(Kill(job_id, STALE_GRACE_S, "its lease is not current"))
        elif ev.code == "rejected":
            out.append(Warn(f"{job_id}: {ev.message}"))
            if run is not None:
                out.append(Note(job_id, ev.message))
            if final and ran and cmd.report != REFUSED_FINAL:
                # the job must end: with the one report that cannot be refused
                self._send(out, msgspec.structs.replace(cmd, report=REFUSED_FINAL), ran=True)
        else:
            out.append(Warn(f"report {p.report_kind(cmd.report)} for {job_id} refused: "
                            f"{ev.message}"))
