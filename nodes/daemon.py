"""The node daemon: join, ask for work, run it, report, heartbeat; reconnect when the broker
goes away and carry on with the jobs that still run.

One thread, driven by readiness: it waits on the broker socket and on the pipes of busy warm
workers at once, so a trial that ends is reported, and the next lease asked for, in the same
moment. Requests are pipelined: reports, output chunks, heartbeats and one outstanding Ready
(a long-poll the broker answers when work appears) travel without waiting for each other, and
each reply is matched to its request by number. A burst of reports therefore shares one group
commit at the broker instead of paying one fsync each.

While recent trials are short (under SHORT_TRIAL_S on average), the node also leases ahead
(and by one per slot while they take under MEDIUM_TRIAL_S):
it asks for up to ``lease_ahead`` more jobs than it has free slots and queues them locally,
starting each the moment a slot frees, so back-to-back short trials never wait for the broker.
The node is the final judge of its own concurrency: it starts a queued job only when its slots,
CPUs, memory and devices allow. Long jobs are never leased ahead, so a node does not sit on
work that another idle node could be running.

Every report names its lease epoch; a report the broker calls stale means the lease was taken
back (the node was silent too long), so the attempt is killed, never finished twice. A final
report (completed, failed, cancelled) stays owed until the broker acknowledges it; after a
reconnect the node carries such jobs in its Join and sends their final report again, and while
the broker cannot write its log it is sent again every heartbeat. A final report the broker
refuses (it would not fit the event schema) is replaced, once, by a failed attempt that says
why, so the job ends rather than waiting for a report that will never be taken.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from evo.broker import protocol as p
from evo.broker.scheduler import fits_on, free_for
from evo.client import BrokerUnavailable, Client, CommandRejected
from evo.events.schema import GpuInfo
from evo.home import NoBroker

from . import reports
from .environment import fingerprint
from .executor import LOOK_EVERY_S, Run
from .keeper import KeeperClient
from .pool import WorkerPool
from .probe import probe, sample

log = logging.getLogger("evo.node")

OUTPUT_CHUNK = 256 << 10
FINAL_SHIP_BYTES = 4 << 20  # of an ended attempt's output per turn, per stream
SHORT_TRIAL_S = 0.5
MEDIUM_TRIAL_S = 5.0


class _Reconnect(Exception):
    """The broker went away or forgot us: join again."""


class NodeDaemon:
    def __init__(self, broker: str | None, *, name: str | None = None, labels: Sequence[str] = (),
                 slots: int | None = None, cpus: float | None = None,
                 mem_gb: float | None = None, gpus: int | None = None,
                 vram_gb: float | None = None, work: Path | None = None,
                 heartbeat_s: float = 2.0, util_every_s: float = 5.0,
                 poll_s: float = 0.05, idle_wait_s: float = 1.0, ship_every_s: float = 0.5,
                 warm_workers: bool = True, lease_ahead: int | None = None) -> None:
        hw = probe()
        self.name = name or hw["hostname"]
        gpu_list: list[GpuInfo] = hw["gpus"]
        if gpus is not None:  # declared GPUs override the probe (tests, headroom)
            probed = {g.index: g for g in gpu_list}
            gpu_list = [GpuInfo(index=i, name=probed[i].name if i in probed else "declared",
                                vram_gb=vram_gb if vram_gb is not None else
                                (probed[i].vram_gb if i in probed else 0.0))
                        for i in range(gpus)]
        elif vram_gb is not None:
            gpu_list = [GpuInfo(index=g.index, name=g.name, vram_gb=vram_gb, uuid=g.uuid)
                        for g in gpu_list]
        self.join_cmd = p.Join(node=self.name, hostname=hw["hostname"],
                               cpus=cpus if cpus is not None else hw["cpus"],
                               mem_gb=mem_gb if mem_gb is not None else hw["mem_gb"],
                               gpus=gpu_list, labels=list(labels),
                               slots=slots or max(1, int(hw["cpus"])),
                               heartbeat_s=heartbeat_s)
        self.slots = self.join_cmd.slots
        self.broker = broker
        self.work = Path(work or Path(os.environ.get("EVO_HOME", ".evo")) / "nodes" / self.name).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s, self.util_every_s, self.poll_s = heartbeat_s, util_every_s, poll_s
        self.idle_wait_s, self.ship_every_s = idle_wait_s, ship_every_s
        self.pool = WorkerPool(self.work / "workers", keep_idle=self.slots) if warm_workers else None
        # Job processes are started by the keeper, which kills them when this node dies.
        self.keeper: KeeperClient | None = None
        self.use_keeper = sys.platform.startswith("linux")
        self.runs: dict[str, Run] = {}
        self.queued: dict[str, p.LeaseGrant] = {}  # leased ahead, waiting for a slot here
        self.lease_ahead = 4 * self.slots if lease_ahead is None else lease_ahead
        self.durations: deque[float] = deque(maxlen=16)
        self.finishing: dict[str, tuple[Run | None, p.Report]] = {}  # final, not yet acknowledged
        self.owed: list[tuple[Run | None, p.Report]] = []  # final reports to send again
        self.client: Client | None = None
        self.pending: dict[int, tuple[Callable[[p.Reply], None], float]] = {}
        self._ready_req: int | None = None
        self._stop = threading.Event()
        self._draining = False
        self._next_hb = 0.0
        self._next_util = 0.0
        self._next_ship = 0.0

    # --- connection ---------------------------------------------------------------------------

    def _running(self) -> list[tuple[str, int]]:
        held = {g.job_id: g.lease_epoch for g in
                [*(r.grant for r in self.runs.values()), *self.queued.values()]}
        for cmd_run, cmd in self.finishing.values():  # a final report owed (run may be None)
            held[cmd.job_id] = cmd.lease_epoch
        return list(held.items())

    def connect(self) -> None:
        """(Re)join, with backoff while the broker is away; keeps running jobs running."""
        delay = 0.2
        self.pending.clear()
        self._ready_req = None
        while not self._stop.is_set():
            if self.client is not None:
                self.client.close()
                self.client = None
            try:
                self.client = Client(self.broker, timeout_s=max(2.0, self.heartbeat_s))
                join = p.Join(**{**_fields(self.join_cmd), "running": self._running()})
                try:
                    reply = self.client.request(join)
                except CommandRejected as exc:
                    if exc.code != "unavailable":
                        raise
                    raise BrokerUnavailable(str(exc)) from None  # its disk is full: wait
                assert isinstance(reply, p.Leases)
                for job_id in reply.cancel:
                    self.finishing.pop(job_id, None)  # not ours any more: nothing to report
                    self.queued.pop(job_id, None)
                self._cancel(reply.cancel, "the broker no longer holds its lease")
                self.owed.clear()
                for run, report in list(self.finishing.values()):  # owed final reports
                    self._send_report(run, report)
                log.info("node %s joined %s (%d job(s) carried on)", self.name,
                         self.client.address, len(self.runs))
                self._next_hb = 0.0
                return
            except (BrokerUnavailable, NoBroker, OSError) as exc:
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                self._collect(report=False)  # keep reaping jobs while away

    def _send(self, cmd: p.Command, on_reply: Callable[[p.Reply], None],
              wait_s: float = 0.0) -> int:
        assert self.client is not None
        req = self.client.send(cmd)
        self.pending[req] = (on_reply, time.monotonic() + wait_s + self.client.timeout_s)
        return req

    def _drain(self) -> None:
        """Dispatch every reply that has arrived; raise _Reconnect when the broker is gone."""
        assert self.client is not None
        for reply in self.client.replies():
            entry = self.pending.pop(reply.req, None)
            if entry is None:
                continue  # the answer to a request given up on
            if isinstance(reply, p.Error) and reply.code == "rejoin":
                raise _Reconnect(reply.message)
            entry[0](reply)
        if self.pending:
            now = time.monotonic()
            if any(deadline < now for _, deadline in self.pending.values()):
                raise _Reconnect(f"no answer from the broker at {self.client.address}")

    # --- the loop -----------------------------------------------------------------------------

    def stop(self, drain: bool = True) -> None:
        self._draining = drain
        self._stop.set()

    def _keeper(self) -> KeeperClient | None:
        """The keeper, started again if it died (its jobs died with it)."""
        if not self.use_keeper:
            return None
        if self.keeper is None or self.keeper.gone:
            if self.keeper is not None:
                log.error("the keeper of job processes died; starting another")
            self.keeper = KeeperClient()
        return self.keeper

    def run(self) -> None:
        self._keeper()
        if self.pool is not None:
            self.pool.warm(self.slots)
        self.connect()
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                try:
                    self.turn(poller)
                except _Reconnect as exc:
                    log.warning("%s; joining again", exc)
                    self.connect()
        finally:
            self.shutdown()

    def turn(self, poller: zmq.Poller | None = None) -> bool:
        """One pass: collect, report, ask for work, then wait for something to happen."""
        assert self.client is not None
        did = self._collect(report=True)
        now = time.monotonic()
        if now >= self._next_hb:
            self._heartbeat(now)
        did = self._start_queued() or did
        ahead = self._ahead()
        want = self.slots + ahead - len(self.runs) - len(self.queued)
        if want > 0 and self._ready_req is None:
            wait = 0.0 if did else self.idle_wait_s
            self._ready_req = self._send(p.Ready(node=self.name, max_leases=want, wait_s=wait,
                                                 ahead=ahead), self._on_leases, wait)
        # Wait for the broker or a worker; commands (plain processes) are polled.
        timeout = max(0.0, self._next_hb - time.monotonic())
        if self.runs:
            # A warm task's end wakes us through its pipe, a kept process's through the
            # keeper's socket; only processes started here are polled. Progress files are
            # looked at every LOOK_EVERY_S either way.
            polled = any(r.fd is None and not r.kept for r in self.runs.values())
            timeout = min(timeout, self.poll_s if polled else LOOK_EVERY_S)
        if poller is None:
            poller = zmq.Poller()
        poller.register(self.client.sock, zmq.POLLIN)
        fds = [r.fd for r in self.runs.values() if r.fd is not None]
        if self.keeper is not None and not self.keeper.gone and any(r.kept for r in self.runs.values()):
            fds.append(self.keeper.fd)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        try:
            poller.poll(int(timeout * 1000) + (0 if did else 1))
        finally:
            for fd in fds:
                poller.unregister(fd)
            poller.unregister(self.client.sock)
        self._drain()
        return did

    def _ahead(self) -> int:
        """How many leases to queue here beyond the free slots: only while trials are short."""
        if self.lease_ahead <= 0 or len(self.durations) < 4 or self._stop.is_set():
            return 0
        mean = sum(self.durations) / len(self.durations)
        if mean < SHORT_TRIAL_S:
            return self.lease_ahead
        # Trials of a few seconds: one queued per slot hides the round trip between trials,
        # while holding back at most one trial's worth of work from other nodes.
        return min(self.lease_ahead, self.slots) if mean < MEDIUM_TRIAL_S else 0

    def _on_leases(self, reply: p.Reply) -> None:
        self._ready_req = None
        if isinstance(reply, p.Leases):
            self._cancel(reply.cancel, "cancel requested")
            for grant in reply.leases:
                self.queued[grant.job_id] = grant
            self._start_queued()

    def _fits(self, grant: p.LeaseGrant) -> bool:
        """Whether this node's own free slots, CPUs, memory and devices take the job now: the
        scheduler's rule, over what this node itself runs."""
        vram = {g.index: g.vram_gb for g in self.join_cmd.gpus}
        free = free_for(self.slots, self.join_cmd.cpus, self.join_cmd.mem_gb, vram,
                        [(x.grant.spec, x.grant.devices) for x in self.runs.values()])
        return fits_on(grant.spec, grant.devices, free, vram)

    def _start_queued(self) -> bool:
        started = False
        while self.queued:
            grant = next(iter(self.queued.values()))
            if self.runs and not self._fits(grant):
                break  # first come, first started: later jobs wait behind it
            del self.queued[grant.job_id]
            self._start(grant)
            started = True
        return started

    def _heartbeat(self, now: float) -> None:
        util: dict = {}
        gpus: list = []
        if now >= self._next_util:
            util, gpus = sample()
            self._next_util = now + self.util_every_s
        self._send(p.Heartbeat(node=self.name, running=self._running(), util=util, gpus=gpus),
                   self._on_heartbeat)
        self._next_hb = now + self.heartbeat_s
        owed, self.owed = self.owed, []
        for run, report in owed:  # refused while the broker could not write: try again
            if report.job_id in self.finishing:
                self._send_report(run, report)

    def _on_heartbeat(self, reply: p.Reply) -> None:
        if isinstance(reply, p.Leases):
            self._cancel(reply.cancel, "cancel requested")

    def _start(self, grant: p.LeaseGrant) -> None:
        needs_process = grant.spec.command is not None or grant.spec.isolate or self.pool is None
        keeper = self._keeper() if needs_process else None
        run = Run(grant, self.work, self.name, self.pool, keeper)
        if keeper is not None and keeper.gone and run.rc is not None:
            # the keeper had died while idle (nothing watched it): once more, with a new one
            run = Run(grant, self.work, self.name, self.pool, self._keeper())
        self.runs[grant.job_id] = run
        if run.rc is not None:
            return  # could not start: reported as failed by _collect
        self._report(run, p.StartedReport(pid=run.pid, env=fingerprint(grant.spec, run.dir)))

    def _cancel(self, job_ids: list[str], why: str) -> None:
        for job_id in job_ids:
            grant = self.queued.pop(job_id, None)
            if grant is not None:  # never started: nothing to stop
                cmd = p.Report(node=self.name, job_id=job_id, lease_epoch=grant.lease_epoch,
                               report=p.CancelledReport(reason=why))
                self.finishing[job_id] = (None, cmd)
                self._send_report(None, cmd)
                continue
            run = self.runs.get(job_id)
            if run is not None and not run.cancelled:
                log.info("stopping %s: %s", job_id, why)
                run.cancel()

    def _report(self, run: Run, body: p.AnyReport | p.Report) -> None:
        cmd = body if isinstance(body, p.Report) else self._prepared(run, body)
        if isinstance(cmd.report, p.FINAL_REPORTS):
            self.finishing[run.grant.job_id] = (run, cmd)
        self._send_report(run, cmd)

    def _prepared(self, run: Run, body: p.AnyReport) -> p.Report:
        """The report to send for ``body`` (what fits in an event), its notes written."""
        notes = reports.Notes()
        cmd = reports.fit(p.Report(node=self.name, job_id=run.grant.job_id,
                                   lease_epoch=run.grant.lease_epoch, report=body), notes)
        for text in notes:
            run.note(text)
        return cmd

    def _send_report(self, run: Run | None, cmd: p.Report) -> None:
        final = isinstance(cmd.report, p.FINAL_REPORTS)
        kind = p.report_kind(cmd.report)

        def on_reply(reply: p.Reply) -> None:
            if isinstance(reply, p.Error) and reply.code == "unavailable":
                if final:  # the broker cannot write now: still owed, sent again
                    self.owed.append((run, cmd))
                return
            if final:
                self.finishing.pop(cmd.job_id, None)
            if not isinstance(reply, p.Error):
                return
            if reply.code == "stale":
                log.warning("%s: %s; stopping the attempt", cmd.job_id, reply.message)
                if run is not None and cmd.job_id in self.runs:
                    run.cancel(grace_s=1.0)
            elif reply.code == "rejected":
                log.warning("%s: %s", cmd.job_id, reply.message)
                if run is not None:
                    run.note(reply.message)
                if final and run is not None and cmd.report != _REFUSED_FINAL:
                    # the job must end: with the one report that cannot be refused
                    self._report(run, _REFUSED_FINAL)
            else:
                log.error("report %s for %s refused: %s", kind, cmd.job_id, reply.message)

        self._send(cmd, on_reply)

    # --- output shipping ----------------------------------------------------------------------

    def _ship(self, run: Run, budget: int = OUTPUT_CHUNK) -> bool:
        """Send new stdout/stderr bytes to the broker, at most ``budget`` of them per stream
        (the loop goes on between sends, whatever a job printed); True when all is sent."""
        done = True
        for stream in ("stdout", "stderr"):
            path, base, size = run.span(stream)
            sent = run.shipped.get(stream, 0)
            if size <= sent:
                continue
            left = budget
            with open(path, "rb") as f:
                f.seek(base + sent)
                while sent < size and left > 0:
                    data = f.read(min(OUTPUT_CHUNK, size - sent, left))
                    if not data:
                        break
                    self._send(p.Output(node=self.name, job_id=run.grant.job_id,
                                        attempt=run.grant.attempt, stream=stream, offset=sent,
                                        data=data), _shipped(run, stream, sent + len(data)))
                    sent += len(data)
                    left -= len(data)
            run.shipped[stream] = sent
            done = done and sent >= size
        return done

    # --- collecting what runs did -------------------------------------------------------------

    def _collect(self, report: bool) -> bool:
        did = False
        ship = report and time.monotonic() >= self._next_ship
        if ship:
            self._next_ship = time.monotonic() + self.ship_every_s
        for job_id, run in list(self.runs.items()):
            updates = run.reports()
            rc = run.poll()
            if not report:
                continue
            for body in updates:
                self._report(run, body)
                did = True
            if rc is None:
                if ship:
                    self._ship(run)
                continue
            if run.final is None:  # it has just ended
                run.end_leftovers()  # nothing of it writes on while its output is shipped
                for body in run.reports(final=True):  # whatever it wrote last
                    self._report(run, body)
                run.final = self._prepared(run, self._final(run, rc))
                run.freeze()
            # Its output (notes included) lands before its final report, a few MiB a turn.
            did = True
            if not self._ship(run, FINAL_SHIP_BYTES):
                continue
            self._report(run, run.final)
            run.finish()
            self.durations.append(time.time() - run.started)
            del self.runs[job_id]
            did = True
        return did

    def _final(self, run: Run, rc: int) -> p.AnyReport:
        """The final report of an attempt that ended with ``rc`` (its notes written)."""
        notes = reports.Notes()
        if run.cancelled:
            final: p.AnyReport = p.CancelledReport(reason="stopped by the node")
        elif rc == 0:
            # What it returned or gave evo.result; else the last value it reported of each.
            metrics = run.result.get("metrics") or run.last_metrics
            final = reports.completed(metrics, run.result.get("artifacts", {}),
                                      time.time() - run.started, notes)
        else:
            error = (run.error or f"exit code {rc}")[-reports.MAX_TEXT:]
            tail = run.tail("stderr")
            final = p.FailedReport(error=f"{error}: {tail}" if tail else error,
                                   exit_code=max(-(2**31), min(rc, 2**31 - 1)),
                                   retryable=run.retryable)
        for text in notes:
            run.note(text)
        return final

    def shutdown(self) -> None:
        """Drain: let running attempts finish (up to a minute), report them, then leave."""
        deadline = time.monotonic() + (60.0 if self._draining else 0.0)
        self.queued.clear()  # never started: the broker re-queues them when we leave
        try:
            while self.runs and time.monotonic() < deadline and self.client is not None:
                self._collect(report=True)
                self._drain()
                time.sleep(0.02)
            for run in self.runs.values():
                run.cancel(grace_s=2.0)
            end = time.monotonic() + 3.0
            while self.client is not None and (self.runs or self.finishing) \
                    and time.monotonic() < end:
                self._collect(report=True)
                self._drain()
                time.sleep(0.02)
        except (_Reconnect, BrokerUnavailable, CommandRejected) as exc:
            log.warning("leaving without the broker: %s", exc)
        for run in self.runs.values():
            run.cancel(grace_s=0.0)
            run.poll()
            run.finish()
        if self.pool is not None:
            self.pool.close()
        if self.keeper is not None:
            self.keeper.close()
        if self.client is not None:
            try:
                self.client.request(p.Leave(node=self.name), timeout_s=2.0)
            except Exception:  # noqa: BLE001 - leaving a broker that is gone
                pass
            self.client.close()


# Sent in place of a final report the broker refused: short, plain, not retried.
_REFUSED_FINAL = p.FailedReport(error="evo could not record the job's final report (the reason "
                                "is on its stderr and in the node's log)", retryable=False)


def _shipped(run: Run, stream: str, end: int) -> Callable[[p.Reply], None]:
    def on_reply(reply: p.Reply) -> None:
        if isinstance(reply, p.Ok):
            size = int(reply.data.get("size", end))
            if size < end:  # the broker's copy is behind (it restarted): resend from there
                run.shipped[stream] = min(run.shipped.get(stream, 0), size)
    return on_reply


def _fields(s) -> dict:  # noqa: ANN001
    return {f: getattr(s, f) for f in s.__struct_fields__ if f != "req"}


def run_node(broker: str | None, **kw) -> None:
    node = NodeDaemon(broker, **kw)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop(drain=True))
    node.run()
