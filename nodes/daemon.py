"""The node daemon: the sockets, processes and clock around the node's core (core.py).

The core decides (what to start, what to ask for, what to send, what to stop); the daemon
joins, carries the core's instructions out, and tells it what happened. One thread, driven by
readiness: it waits on the broker socket and on the pipes of busy warm workers at once, so a
trial that ends is reported, and the next lease asked for, in the same moment. Requests are
pipelined: reports, output chunks, heartbeats and one outstanding Ready travel without waiting
for each other, and each reply is matched to its request by number. A burst of reports
therefore shares one group commit at the broker instead of paying one fsync each.

What an attempt wrote becomes reports here (reports.py: what fits in an event), and its output
is shipped to the broker before its final report. After a reconnect the node carries its jobs
in its Join; the core says which final reports are still owed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import zmq

from evo.broker import protocol as p
from evo.client import BrokerUnavailable, Client, CommandRejected
from evo.events.schema import GpuInfo
from evo.errors import BadInput
from evo.home import NoBroker, mark_home
from evo.keys import LOCAL, find_key

from . import core as c
from . import reports
from .cache import Cache
from .environment import fingerprint
from .executor import LOOK_EVERY_S, Run
from .keeper import KeeperClient
from .link import KeyRefused, Link, Reconnect
from .pool import WorkerPool
from .probe import device_env, probe, sample
from .staging import Placement, Stager, needs_staging
from .uploads import Sent, Upload, Uploader, output_uploads

log = logging.getLogger("evo.node")

OUTPUT_CHUNK = 256 << 10
FINAL_SHIP_BYTES = 4 << 20  # of an ended attempt's output per turn, per stream
UPLOAD_WAIT_S = 600.0  # an ended attempt's checkpoints and outputs are waited for this long


class NodeDaemon:
    def __init__(self, broker: str | None, *, name: str | None = None, labels: Sequence[str] = (),
                 slots: int | None = None, cpus: float | None = None,
                 mem_gb: float | None = None, gpus: int | None = None,
                 vram_gb: float | None = None, work: Path | None = None,
                 heartbeat_s: float = 2.0, util_every_s: float = 5.0,
                 poll_s: float = 0.05, idle_wait_s: float = 1.0, ship_every_s: float = 0.5,
                 warm_workers: bool = True, lease_ahead: int | None = None,
                 cache_gb: float = 20.0, until: float = 0.0, grace_s: float = 30.0,
                 idle_exit_s: float = 0.0) -> None:
        hw = probe()
        key = find_key(None, Path(os.environ.get("EVO_HOME", ".evo")).absolute())
        # a node's name is its key's (the broker machine's own key runs any)
        self.name = name or (key.name if key is not None and key.name != LOCAL else hw["hostname"])
        gpu_list: list[GpuInfo] = hw["gpus"]
        if gpus is not None:  # declared GPUs override the probe (tests, headroom)
            probed = {g.index: g for g in gpu_list}
            gpu_list = [GpuInfo(index=i, name=probed[i].name if i in probed else "declared",
                                vram_gb=vram_gb if vram_gb is not None else
                                (probed[i].vram_gb if i in probed else 0.0),
                                uuid=probed[i].uuid if i in probed else "",
                                parent=probed[i].parent if i in probed else "")
                        for i in range(gpus)]
        elif vram_gb is not None:
            gpu_list = [msgspec.structs.replace(g, vram_gb=vram_gb) for g in gpu_list]
        self.join_cmd = p.Join(node=self.name, hostname=hw["hostname"],
                               cpus=cpus if cpus is not None else hw["cpus"],
                               mem_gb=mem_gb if mem_gb is not None else hw["mem_gb"],
                               gpus=gpu_list, labels=list(labels),
                               slots=slots or max(1, int(hw["cpus"])),
                               heartbeat_s=heartbeat_s)
        self.slots = self.join_cmd.slots
        self.core = c.NodeCore(
            node=self.name, slots=self.slots, cpus=self.join_cmd.cpus,
            mem_gb=self.join_cmd.mem_gb, vram={g.index: g.vram_gb for g in gpu_list},
            lease_ahead=4 * self.slots if lease_ahead is None else lease_ahead,
            heartbeat_s=heartbeat_s, util_every_s=util_every_s, idle_wait_s=idle_wait_s,
            # a pilot's allocation (``until``, wall clock) on the monotonic clock, ``grace_s``
            # early: the broker leases it only jobs expected to end by then (Join.ends_in_s),
            # and then the core stops what still runs (SIGTERM first: a job can checkpoint)
            ends_at=time.monotonic() + (until - grace_s - time.time()) if until else None,
            idle_exit_s=idle_exit_s)
        self.broker = broker
        self.work = Path(work or Path(os.environ.get("EVO_HOME", ".evo")) / "nodes" / self.name).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s, self.poll_s, self.ship_every_s = heartbeat_s, poll_s, ship_every_s
        self.gpus = {g.index: g for g in gpu_list}  # what jobs' device numbers are
        self.pool = WorkerPool(self.work / "workers", keep_idle=self.slots,
                               visible=lambda d: device_env(d, self.gpus)) if warm_workers else None
        # Job processes are started by the keeper, which kills them when this node dies.
        self.keeper: KeeperClient | None = None
        self.use_keeper = sys.platform.startswith("linux")
        self.runs: dict[str, Run] = {}
        # jobs' files, by digest, for every node of this machine's home
        home = Path(os.environ.get("EVO_HOME", ".evo")).absolute()
        mark_home(home)
        cache = Cache(home / "cache", int(cache_gb * (1 << 30)))
        self.stager = Stager(cache, lambda: Client(self.broker, timeout_s=30.0), self.work / "jobs")
        self.uploader = Uploader(cache, lambda: Client(self.broker, timeout_s=60.0))
        self.client: Client | None = None
        self.link: Link | None = None  # while joined
        self._stop = threading.Event()
        self._drain_on_stop = False
        self._stop_told = False
        self.refused = ""  # why the broker refused this node's key, once it has
        self._next_ship = 0.0

    # --- the core's instructions, carried out -------------------------------------------------

    def _do(self, event: c.Event) -> None:
        """Tell the core what happened and carry out what it says."""
        for ins in self.core.handle(event, time.monotonic()):
            if self.link is not None and self.link.carry(ins):
                continue
            if isinstance(ins, c.Start):
                self._start(ins.grant)
            elif isinstance(ins, c.Kill):
                run = self.runs.get(ins.job_id)
                if ins.job_id in self.stager.pending:
                    self.stager.cancel(ins.job_id)  # it ends, cancelled, once staged
                elif run is not None:
                    log.info("stopping %s: %s", ins.job_id, ins.why)
                    run.cancel(grace_s=ins.grace_s)
            elif isinstance(ins, c.Note):
                run = self.runs.get(ins.job_id)
                if run is not None:
                    run.note(ins.text)
            elif isinstance(ins, c.Warn):
                log.warning("%s", ins.text)
            # Leave: the loop sees core.left; a Send* without a link: the Join carries it

    # --- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)join, with backoff while the broker is away; keeps running jobs running."""
        delay = 0.2
        self.link = None
        self._do(c.Disconnected())
        while not self._stop.is_set():
            if self.client is not None:
                self.client.close()
                self.client = None
            try:
                self.client = Client(self.broker, timeout_s=max(2.0, self.heartbeat_s))
                link = Link(self.client, self.name, sample)
                join = p.Join(**{**_fields(self.join_cmd), "running": self.core.held(),
                                 "ends_in_s": self._ends_in()})
                try:
                    joined = link.join(join)
                except CommandRejected as exc:
                    if exc.code == "unauthorized":
                        self.refused = str(exc)
                        raise KeyRefused(str(exc)) from None
                    if exc.code != "unavailable":
                        raise
                    raise BrokerUnavailable(str(exc)) from None  # its disk is full: wait
                self.link = link
                self._do(joined)
                log.info("node %s joined %s (%d job(s) carried on)", self.name,
                         self.client.address, len(self.runs))
                return
            except (BrokerUnavailable, NoBroker, OSError) as exc:
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                for run in self.runs.values():  # keep reaping jobs while away
                    run.poll()
        if self.client is not None:  # stopped while away: there is no broker to leave
            self.client.close()
            self.client = None

    # --- the loop -----------------------------------------------------------------------------

    def _ends_in(self) -> float:
        """Seconds until this node's declared end (0: it has none)."""
        end = self.core.ends_at
        return max(end - time.monotonic(), 0.001) if end is not None else 0.0

    def stop(self, drain: bool = True) -> None:
        """Ask the loop to stop (from a signal handler too: the loop tells the core)."""
        self._drain_on_stop = drain
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
        poller = zmq.Poller()
        try:
            self.connect()
            while self.client is not None and not self.core.left:
                try:
                    self.turn(poller)
                except KeyRefused as exc:
                    log.error("the broker refuses this node's key: %s; stopping", exc)
                    self.refused = str(exc)
                    break
                except Reconnect as exc:
                    if self._stop.is_set():
                        log.warning("leaving without the broker: %s", exc)
                        break
                    log.warning("%s; joining again", exc)
                    self.connect()
        finally:
            self.shutdown()

    def turn(self, poller: zmq.Poller | None = None) -> bool:
        """One pass: collect, report, ask for work, then wait for something to happen."""
        assert self.client is not None and self.link is not None
        if self._stop.is_set() and not self._stop_told:
            self._stop_told = True
            self._do(c.Stop(drain=self._drain_on_stop))
        elif self._stop.is_set() and not self._drain_on_stop and self.core.stop_at is not None \
                and self.core.stop_at > time.monotonic():
            self._do(c.Stop(drain=False))  # asked again, not to wait: stop now
        did = self._collect()
        starts = len(self.runs)
        self._do(c.Tick())
        did = did or len(self.runs) > starts
        if self.core.left:
            return did
        # Wait for the broker or a worker; commands (plain processes) are polled.
        timeout = max(0.0, self.core.next_deadline() - time.monotonic())
        if self.runs:
            # A warm task's end wakes us through its pipe, a kept process's through the
            # keeper's socket; only processes started here are polled. A warm task's
            # evo.report wakes us too (its pipe), so its progress files are looked at then
            # and with its output's shipping; other runs' when their next look is due.
            polled = any(r.fd is None and not r.kept for r in self.runs.values())
            # Output is shipped every ship_every_s; an ended run's rest goes a chunk a turn.
            due = min([r.next_look for r in self.runs.values() if r.fd is None],
                      default=self._next_ship)
            due = min(due, self._next_ship)
            if any(r.ending_at is not None for r in self.runs.values()):
                due = min(due, time.monotonic() + LOOK_EVERY_S)
            timeout = min(timeout, self.poll_s if polled else max(0.0, due - time.monotonic()))
        if poller is None:
            poller = zmq.Poller()
        poller.register(self.client.sock, zmq.POLLIN)
        fds = [r.fd for r in self.runs.values() if r.fd is not None]
        if self.stager.pending:
            fds.append(self.stager.fd)
        if self.uploader.pending:
            fds.append(self.uploader.fd)
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
        for event in self.link.events():
            self._do(event)
        for grant, placement in self.stager.ready():
            self._start(grant, placement)
        for sent in self.uploader.ready():
            self._sent(sent)
        return did

    def _start(self, grant: p.LeaseGrant, placement: Placement | None = None) -> None:
        if placement is None and needs_staging(grant):
            self.stager.submit(grant)  # started once its files are here (staging.py)
            return
        needs_process = grant.spec.command is not None or grant.spec.isolate or self.pool is None
        keeper = self._keeper() if needs_process else None
        run = Run(grant, self.work, self.name, self.pool, keeper, placement, self.gpus)
        if keeper is not None and keeper.gone and run.rc is not None:
            # the keeper had died while idle (nothing watched it): once more, with a new one
            run = Run(grant, self.work, self.name, self.pool, self._keeper(), placement, self.gpus)
        self.runs[grant.job_id] = run
        if run.rc is not None:
            return  # could not start: reported as failed by _collect
        env = fingerprint(grant.spec, run.dir)
        if grant.devices:  # which physical devices this attempt had
            env["gpus"] = [{"device": d, "uuid": g.uuid, "name": g.name, "parent": g.parent}
                           for d in grant.devices for g in [self.gpus.get(d, GpuInfo(index=d))]]
        self._do(c.Reported(self._prepared(run, p.StartedReport(pid=run.pid, env=env))))

    def _prepared(self, run: Run, body: p.AnyReport) -> p.Report:
        """The report to send for ``body`` (what fits in an event), its notes written."""
        notes = reports.Notes()
        cmd = reports.fit(p.Report(node=self.name, job_id=run.grant.job_id,
                                   lease_epoch=run.grant.lease_epoch, report=body), notes)
        for text in notes:
            run.note(text)
        return cmd

# --- output shipping ----------------------------------------------------------------------

    def _ship(self, run: Run, budget: int = OUTPUT_CHUNK) -> bool:
        """Send new stdout/stderr bytes to the broker, at most ``budget`` of them per stream
        (the loop goes on between sends, whatever a job printed); True when all is sent."""
        assert self.link is not None
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
                    self.link.send(p.Output(node=self.name, job_id=run.grant.job_id,
                                            attempt=run.grant.attempt, stream=stream,
                                            offset=sent, data=data),
                                   _shipped(run, stream, sent + len(data)))
                    sent += len(data)
                    left -= len(data)
            run.shipped[stream] = sent
            done = done and sent >= size
        return done

    # --- collecting what runs did -------------------------------------------------------------

    def _collect(self) -> bool:
        did = False
        ship = time.monotonic() >= self._next_ship
        if ship:
            self._next_ship = time.monotonic() + self.ship_every_s
        for job_id, run in list(self.runs.items()):
            rc = run.poll()  # first: a warm task's word that it reported makes its look due
            updates = run.reports()
            for body in updates:
                self._report(run, body)
                did = True
            if rc is None:
                if ship:
                    self._ship(run)
                continue
            if run.ending_at is None:  # it has just ended
                run.ending_at = time.monotonic()
                run.end_leftovers()  # nothing of it writes on while its output is shipped
                for body in run.reports(final=True):  # whatever it wrote last
                    self._report(run, body)
                if rc == 0 and not run.cancelled:
                    try:
                        uploads, notes = output_uploads(job_id, run.grant.lease_epoch, run.workdir,
                                                        run.declared, run.grant.spec.outputs)
                    except (OSError, ValueError, NotImplementedError, RuntimeError) as exc:
                        uploads, notes = [], [f"its outputs could not be listed: {exc}"]
                    for text in notes:
                        run.note(text)
                    for upload in uploads:
                        self.uploader.send(upload)
            if run.final is None:
                if self.uploader.pending.get(job_id):
                    if time.monotonic() < run.ending_at + UPLOAD_WAIT_S:
                        continue  # its checkpoints and outputs go home before its final report
                    run.note(f"what it made was still being sent after {UPLOAD_WAIT_S:g}s: "
                             "it ends without it")
                run.final = self._prepared(run, self._final(run, rc))
                run.freeze()
            # Its output (notes included) lands before its final report, a few MiB a turn.
            did = True
            if not self._ship(run, FINAL_SHIP_BYTES):
                continue
            run.finish()
            del self.runs[job_id]
            if run.placement is not None:
                self.stager.release(run.placement)
            self._do(c.Ended(run.final))
        return did

    def _report(self, run: Run, body: p.AnyReport) -> None:
        """Send a report of ``run``'s; a checkpoint goes home first (uploads.py)."""
        if isinstance(body, p.CheckpointReport) and not body.digest:
            self.uploader.send(Upload(run.grant.job_id, run.grant.lease_epoch, "checkpoint",
                                      body.path, run.ckpt, (body.path,), extra=body))
            return
        self._do(c.Reported(self._prepared(run, body)))

    def _sent(self, sent: Sent) -> None:
        """An upload is done (or failed): its report goes, or a note says what is missing."""
        up = sent.upload
        run = self.runs.get(up.job_id)
        if run is None or run.grant.lease_epoch != up.epoch:
            log.warning("%s: %s %s was sent after its attempt ended", up.job_id, up.kind, up.key)
            return
        if up.kind == "checkpoint":
            body = up.extra
            if sent.digest:
                body = msgspec.structs.replace(body, digest=sent.digest, size=sent.size)
            else:
                run.note(f"checkpoint {up.key} not sent home ({sent.error}): a retry on another "
                         "node starts without it")
            self._do(c.Reported(self._prepared(run, body)))
        elif sent.digest:
            run.outputs[up.key] = sent.digest
        else:
            run.note(f"output {up.key} not sent home: {sent.error}")

    def _final(self, run: Run, rc: int) -> p.AnyReport:
        """The final report of an attempt that ended with ``rc`` (its notes written)."""
        notes = reports.Notes()
        if run.cancelled:
            final: p.AnyReport = p.CancelledReport(reason="stopped by the node")
        elif rc == 0:
            # What it returned or gave evo.result; else the last value it reported of each.
            metrics = run.result.get("metrics") or run.last_metrics
            final = reports.completed(metrics, run.result.get("artifacts", {}),
                                      time.monotonic() - run.started, notes, run.outputs)
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
        """After the core has left (or the broker is gone while stopping): what still runs is
        killed, the workers and the keeper stop, and the node says it leaves."""
        for run in self.runs.values():
            run.cancel(grace_s=0.0)
            run.poll()
            run.finish()
        self.stager.close()
        self.uploader.close()
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


def _shipped(run: Run, stream: str, end: int) -> Callable[[p.Reply], None]:
    def on_reply(reply: p.Reply) -> None:  # no event for the core: output is the daemon's
        if isinstance(reply, p.Ok):
            size = int(reply.data.get("size", end))
            if size < end:  # the broker's copy is behind (it restarted): resend from there
                run.shipped[stream] = min(run.shipped.get(stream, 0), size)
    return on_reply


def _fields(s) -> dict:  # noqa: ANN001
    return {f: getattr(s, f) for f in s.__struct_fields__ if f != "req"}


def run_node(broker: str | None, **kw) -> None:
    node = NodeDaemon(broker, **kw)
    # the first Ctrl-C (or SIGTERM) drains; a second one stops what runs at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop(drain=not node._stop.is_set()))
    if node.core.ends_at is not None:
        # A pilot: Slurm's SIGTERM (scancel, preemption, the time limit) leaves it seconds
        # (KillWait) before SIGKILL: stop what runs now, so their reports reach the broker and
        # they are retried elsewhere. SIGUSR1 (sbatch --signal) is the warning that the end
        # is near: take nothing new, let what runs finish until the declared end.
        signal.signal(signal.SIGTERM, lambda *_: node.stop(drain=False))
        signal.signal(signal.SIGUSR1, lambda *_: node.stop(drain=True))
    try:
        node.run()
    except KeyRefused:
        pass
    if node.refused:
        raise BadInput(f"node {node.name}: the broker refuses its key: {node.refused}")
