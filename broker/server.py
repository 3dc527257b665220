"""The broker's imperative shell: sockets, the log, the clock.

One thread, one loop:
  1. wait for commands on the ROUTER;
  2. drain what has arrived (up to ``max_batch``) and hand each command to the Desk, which
     validates it and returns events (already folded into state) and a reply;
  3. append all the batch's events to the log with one fdatasync (group commit);
  4. only then send the replies, and publish the batch on the relay with its seqs;
  5. serve Reads, which only ever see committed events.
A crash anywhere before 4 loses no acknowledged event: nothing was acknowledged.

Two things put the state back to what is durable, because the desk folds events as it makes
them: a command whose handler raises midway (the log plus the batch's events before it are
folded again), and a batch the log could not write (a full disk, an I/O error: the log cuts the
batch off, every command of the batch gets an error, and the state is folded from the log
again). After a failed write the broker is *degraded*: it serves reads, status and queries,
answers writes with the reason, keeps nodes' liveness without recording it, and tries the disk
again (a small probe file) at most once a second; when the probe writes, it carries on.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import zmq

from evo import failpoints
from evo.events.codec import EventDecodeError, decode, pack_batch
from evo.events.schema import JobSpec, JobSubmitted
from evo.events.log import CorruptLog, LogWriteError, SegmentLog
from evo.errors import BadInput, EvoError
from evo.home import is_loopback, mark_home, read_broker_file, write_broker_file
from evo.keys import has_keys

from .auth import Gate

from . import protocol as p
from .cluster import Cluster, load_cluster
from .desk import Desk
from .notify import Notifier
from .outputs import OutputStore
from .store import ContentStore, StoreError
from evo.broker.follower import Follower
from . import snapshot
from .state import BrokerState, IllegalTransition, fold

log = logging.getLogger("evo.broker")

READ_BYTES = 4 << 20  # cap on the events one Read reply carries
PROBE_EVERY_S = 1.0  # how often a degraded broker tries the disk again
# Commands that record something: refused while the log cannot be written.
_WRITES = (p.Submit, p.SubmitSweep, p.Cancel, p.Retry, p.Drain, p.Hold, p.Join, p.Report,
           p.Leave)
# Plain ints: combining pyzmq's enum flags per message costs more than the send itself.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


# A snapshot of the state after this many new events (and at a clean stop): a restart then
# folds at most this many events of the log (broker/snapshot.py).
SNAPSHOT_EVERY = 50_000

class BrokerError(EvoError):
    """Raised when the broker cannot start (home locked, bad bind address)."""


class Broker:
    def __init__(
        self,
        home: str | os.PathLike[str],
        bind: str = "tcp://127.0.0.1:*",
        *,
        sync: bool = True,
        segment_bytes: int | None = None,
        max_batch: int = 4096,
        allow_remote: bool = False,
        cluster: Cluster | None = None,
        cluster_path: str | os.PathLike[str] | None = None,
        tick_s: float = 1.0,
        projections: bool = True,
        notify: list[str] | None = None,
        snapshots: bool = True,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        self.home = Path(home).absolute()
        self.notifier = Notifier(notify) if notify else None  # `--notify CMD`
        self.home.mkdir(parents=True, exist_ok=True)
        mark_home(self.home)
        if not is_loopback(bind) and not allow_remote and not has_keys(self.home):
            raise BadInput(
                f"refusing to bind {bind}: a non-loopback bind needs keys, and {self.home} has "
                "none: run `evo keys init`, then `evo keys issue NAME` for each machine (or "
                "bind 127.0.0.1, the default)"
            )
        self._lock_fd = self._lock()
        kw: dict[str, Any] = {"sync": sync}
        if segment_bytes:
            kw["segment_bytes"] = segment_bytes
        try:
            self.log = SegmentLog(self.home / "log", **kw)
            state = self._restore_state(snapshots)
        except (CorruptLog, EventDecodeError, IllegalTransition, ValueError) as exc:
            os.close(self._lock_fd)
            raise BrokerError(
                f"the event log in {self.home / 'log'} is damaged, so the broker does not start: "
                f"{exc}. `evo log check` lists every problem; `evo log salvage --to DIR` writes "
                "the valid prefix as a new log to go on from") from None
        self.snapshots = snapshot.Writer(self.home, self.log) if snapshots else None
        self.snapshot_every = snapshot_every
        self._snapshot_seq = state.last_seq if self.restored_from else 0
        self.outputs = OutputStore(self.home / "logs")
        self.store = ContentStore(self.home / "store")
        for msg in self.log.recovered:
            log.warning(msg)
        self.desk = Desk(state, cluster or load_cluster(cluster_path, self.home),
                         mono=time.monotonic(), recall=self._recall)
        self.tick_s = tick_s
        self._next_tick = 0.0
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the loop through it
        os.set_blocking(self._wake_w, False)
        self._parked: list[tuple[bytes, p.Ready, float]] = []  # (ident, command, give up at)
        self._parked_seq = -1
        self.max_batch = max_batch
        self.ctx = zmq.Context()
        # With keys, the authenticator runs before anything binds (broker/auth.py).
        self.gate = Gate(self.ctx, self.home) if has_keys(self.home) else None
        self.router = self.ctx.socket(zmq.ROUTER)
        if self.gate is not None:
            self.gate.serve(self.router)
        self.router.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.bind(bind)
        self.address = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        host = self.address.rsplit(":", 1)[0]
        self.pub = self._relay(f"{host}:*")
        self.events_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self.stats = {"batches": 0, "events": 0, "commands": 0, "errors": 0, "restores": 0}
        self.write_error = ""  # why the log cannot be written now ("" when it can)
        self._probe_at = 0.0
        self.follower: Follower | None = None
        self.query_endpoint = ""
        if projections:
            self.follower = Follower(self.home, self.ctx, self.log.last_seq, host, self.gate)
            self.follower.start_and_wait()
            self.query_endpoint = self.follower.endpoint
        try:
            write_broker_file(self.home, {"address": self.address, "events": self.events_endpoint,
                                          "queries": self.query_endpoint,
                                          "pid": os.getpid(), "hostname": socket.gethostname(),
                                          "keys": self.gate is not None,
                                          "started": time.time()})
        except OSError as exc:  # a full disk: serve anyway, for reads, queries and --broker
            log.error("cannot write %s (%s): commands need --broker %s until the broker "
                      "restarts with space", self.home / "broker.json", exc.strerror or exc,
                      self.address)

    def _relay(self, endpoint: str) -> zmq.Socket:
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        if self.gate is not None:
            self.gate.serve(pub)
        try:
            pub.bind(endpoint)
        except zmq.ZMQError:
            pub.close(0)
            raise
        return pub

    def _rebind_relay(self) -> None:
        """A PUB socket cannot refuse one subscriber: unbinding ends every connection to the
        relay, and each subscriber shakes hands again (a revoked key is refused then). A
        follower reads what it missed meanwhile (the relay's seqs show the gap)."""
        self.pub.unbind(self.events_endpoint)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.pub.bind(self.events_endpoint)
                return
            except zmq.ZMQError as exc:  # the port is freed by ZeroMQ's own thread, soon
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    log.error("the event relay cannot bind %s again (%s): followers read "
                              "from the broker instead", self.events_endpoint, exc)
                    return
                time.sleep(0.01)

    def _lock(self) -> int:
        path = self.home / "broker.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_broker_file(self.home) or {}
            raise BrokerError(
                f"another broker holds {path} (pid {info.get('pid', '?')}, "
                f"{info.get('address', 'address unknown')})"
            ) from None
        return fd

    def _restore_state(self, snapshots: bool) -> BrokerState:
        """The state at the log's end: from the newest good snapshot and the events after it,
        else by folding the whole log. A snapshot that does not fold on with this log is
        set aside (with a warning) for the full fold."""
        self.restored_from = 0
        found = snapshot.load(self.home, self.log.last_seq) if snapshots else None
        if found is not None:
            state, event = found
            at = state.last_seq
            try:
                state = snapshot.fold_tail(state, self.log, event)
                self.restored_from = at
                log.info("state from the snapshot at seq %d and the %d events after it", at,
                         state.last_seq - at)
                return state
            except (snapshot.Mismatch, IllegalTransition, ValueError) as exc:
                log.warning("snapshot at seq %d not used: %s; folding the whole log", at, exc)
        return fold(self.log.read_from(1))

    def maybe_snapshot(self, force: bool = False) -> None:
        """Snapshot the state when ``snapshot_every`` events came since the last one (the
        loop calls it when a batch had nothing to do), or at a clean stop."""
        if self.snapshots is None or self.write_error:
            return
        seq = self.desk.state.last_seq
        if seq <= self._snapshot_seq or (not force and seq - self._snapshot_seq
                                         < self.snapshot_every):
            return
        if force:
            self.snapshots.join()
            snapshot.write(self.home, self.desk.state, self.log)
            self._snapshot_seq = seq
        elif self.snapshots.submit(self.desk.state):
            self._snapshot_seq = seq

    # --- the loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the loop's poll (a signal handler's too: the poll would resume after it)
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake is pending anyway) or closed (stopped already)
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def serve_forever(self, poll_ms: int = 1000) -> None:
        """Serve until stopped. Between commands the loop sleeps until the next thing that is
        due: the timer's tick, a node's heartbeat deadline, a parked Ready's deadline (an idle
        broker wakes about once a second)."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                lost = self.desk.next_lost()
                if lost is not None and not self.write_error:  # a node's deadline comes first
                    self._next_tick = min(self._next_tick, lost)
                due = min([self._next_tick, *(d for _, _, d in self._parked)])
                wait = min(poll_ms, max(0, int((due - time.monotonic()) * 1000)) + 1)
                if not poller.poll(wait):  # nothing to do: a moment for a snapshot
                    self.maybe_snapshot()
                self.run_batch()
            try:
                self.maybe_snapshot(force=True)  # a clean stop: the next start folds nothing
            except OSError as exc:
                log.warning("no snapshot at the stop: %s", exc)
        finally:
            if self.snapshots is not None:
                self.snapshots.join(30)
            self.close()

    def run_batch(self) -> None:
        now, mono = time.time(), time.monotonic()
        if self.write_error and mono >= self._probe_at:
            self._probe(mono)
        events: list = []
        encoded: list[bytes] = []
        replies: list[tuple[bytes, p.Reply]] = []
        reads: list[tuple[bytes, p.Read]] = []
        recv = self.router.recv
        for _ in range(self.max_batch):
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            frames = [frame.bytes]
            while frame.more:  # the rest of a multipart message has arrived with it
                frame = recv(0, copy=False)
                frames.append(frame.bytes)
            ident = frames[0]
            cmd = self._decode(ident, frames, replies)
            if cmd is None:
                continue
            if self.gate is not None:
                why = self.gate.refusal(str(frame.get("User-Id") or ""), cmd)
                if why is not None:
                    replies.append((ident, p.Error(req=cmd.req, code="unauthorized",
                                                   message=why)))
                    continue
            if type(cmd) is p.Read:
                reads.append((ident, cmd))
                continue
            if type(cmd) is p.Output or type(cmd) is p.Logs:
                replies.append((ident, self._output(cmd)))
                continue
            if type(cmd) is p.Have or type(cmd) is p.PutBlob or type(cmd) is p.GetBlob:
                replies.append((ident, self._blob(cmd)))
                continue
            if type(cmd) is p.Report and type(cmd.report) is p.CheckpointReport \
                    and cmd.report.digest:  # a retry restores it: it must be whole here
                why = self.store.absent(cmd.report.digest, {})
                if why:
                    replies.append((ident, p.Error(req=cmd.req, code="invalid", message=why)))
                    continue
            if type(cmd) is p.Submit or type(cmd) is p.SubmitSweep:
                why = self._unstored(cmd)
                if why:  # checked before anything of it becomes durable
                    replies.append((ident, p.Error(req=cmd.req, code="invalid", message=why)))
                    continue
            self._handle(ident, cmd, now, mono, events, encoded, replies)
        if self.gate is not None and mono >= self._next_tick and self.gate.refresh():
            self._rebind_relay()  # (a revocation counts while the log cannot be written too)
        if mono >= self._next_tick and not self.write_error:
            self._next_tick = mono + self.tick_s
            try:
                out = self.desk.tick(now, mono)
                events.extend(out.events)
                encoded.extend(out.encoded)
            except Exception:  # noqa: BLE001 - as for a command: put the state back
                log.exception("the timer's tick failed")
                self._restore(events)
        if self._parked and (self._parked_seq != self.desk.state.last_seq
                             or any(d <= mono for _, _, d in self._parked)):
            parked, self._parked = self._parked, []
            for ident, cmd, deadline in parked:
                self._handle(ident, cmd, now, mono, events, encoded, replies, deadline)
        self._parked_seq = self.desk.state.last_seq
        if events:
            try:
                self.log.append(events, encoded)
            except LogWriteError as exc:
                self._write_failed(str(exc), replies, mono)
                events, encoded = [], []
        failpoints.hit("broker.before_ack")
        if encoded and self.follower is not None:
            self.follower.push(encoded)  # before the acks: answers include what was acked
        send, encode = self.router.send, p.reply_encoder.encode
        for ident, reply in replies:
            send(ident, _SNDMORE)
            send(encode(reply))
        if encoded:
            self.stats["batches"] += 1
            self.stats["events"] += len(encoded)
            self.pub.send_multipart([p.RELAY_TOPIC, pack_batch(encoded)])
        if self.notifier is not None:
            self.notifier.events(events)  # durable now: told to the user's command
        for ident, read in reads:
            self.router.send_multipart([ident, p.reply_encoder.encode(self._read(read))])

    def _handle(self, ident: bytes, cmd: p.Command, now: float, mono: float, events: list,
                encoded: list, replies: list, deadline: float | None = None) -> None:
        if self.write_error:
            kept = self._degraded(ident, cmd, mono, replies, deadline)
            if kept is None:
                return
            cmd = kept
        try:
            out = self.desk.handle(cmd, now, cause=f"{ident.hex()}:{cmd.req}", mono=mono)
        except Exception as exc:  # a bug must not take the broker down with it
            log.exception("command %s failed; the state is folded again", type(cmd).__name__)
            self._restore(events)
            replies.append((ident, p.Error(req=cmd.req, code="internal",
                                           message=f"{type(exc).__name__}: {exc}")))
            return
        events.extend(out.events)
        encoded.extend(out.encoded)
        if out.park:  # a Ready with no work: answer when something changes or time is up
            deadline = mono + cmd.wait_s if deadline is None else deadline  # type: ignore[attr-defined]
            if deadline > mono:
                self._parked.append((ident, cmd, deadline))  # type: ignore[arg-type]
                return
        if out.reply is not None:
            replies.append((ident, self._fill(out.reply)))

    def _recall(self, seq: int) -> JobSpec:
        """The spec of the JobSubmitted at ``seq`` in the log (a finished job's whole spec)."""
        for at, raw in self.log.read_raw_from(seq, limit=1):
            ev = decode(raw, where=f"event {at}")
            if at == seq and isinstance(ev, JobSubmitted):
                return ev.spec
        raise LookupError(f"event {seq} of the log is not a JobSubmitted")

    def _restore(self, pending: list) -> None:
        """The state as the log and ``pending`` (this batch's events so far) say it is."""
        t0 = time.perf_counter()
        state = fold(self.log.read_from(1))
        for ev in pending:
            state.apply(ev)
        self.desk.state = state
        self.desk.resync(time.monotonic())
        self.stats["restores"] += 1
        log.warning("state folded again from %d events in %.2fs", state.last_seq,
                    time.perf_counter() - t0)

    # --- a log that cannot be written ---------------------------------------------------------

    def _write_failed(self, why: str, replies: list, mono: float) -> None:
        """The batch is not durable: nothing of it is acknowledged, the state forgets it."""
        log.error("%s: %d command(s) not recorded; the broker serves reads and queries and "
                  "refuses writes until the disk takes them again", why, len(replies))
        self.write_error = why
        self._probe_at = mono + PROBE_EVERY_S
        self._restore([])
        message = f"not recorded: {why}; reads and queries still work"
        # What the batch's commands were told rested on its events; errors and output chunks
        # (written beside the log) did not.
        replies[:] = [(ident, r if isinstance(r, (p.Error, p.LogChunk)) or (
                           isinstance(r, p.Ok) and "size" in r.data)
                       else p.Error(req=r.req, code="unavailable", message=message))
                      for ident, r in replies]

    def _degraded(self, ident: bytes, cmd: p.Command, mono: float, replies: list,
                  deadline: float | None) -> p.Command | None:
        """While the log cannot be written: the command to handle instead (one that records
        nothing), or None once it has been answered."""
        if type(cmd) is p.Heartbeat:  # liveness is kept; the utilization sample is not
            return msgspec.structs.replace(cmd, util={}, gpus=[])
        if type(cmd) is p.Ready:  # no leases: held until its wait is up, then told none
            if deadline is None:
                deadline = mono + cmd.wait_s
            if deadline > mono:
                self._parked.append((ident, cmd, deadline))
            else:
                replies.append((ident, p.Leases(req=cmd.req, seq=self.desk.state.last_seq)))
            return None
        if isinstance(cmd, _WRITES):
            replies.append((ident, p.Error(
                req=cmd.req, code="unavailable",
                message=f"not recorded: {self.write_error}; reads and queries still work")))
            return None
        return cmd

    def _probe(self, mono: float) -> None:
        """Try writing and syncing a small file beside the log; clear the error if it works."""
        probe = self.log.dir / ".probe"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            self._probe_at = mono + PROBE_EVERY_S
            try:
                probe.unlink()
            except OSError:
                pass
            log.debug("the disk still refuses writes: %s", exc)
            return
        if self.log.broken:
            self.write_error = self.log.broken
            self._probe_at = mono + PROBE_EVERY_S
            return
        log.warning("the disk takes writes again: the broker records again")
        self.write_error = ""

    def _decode(self, ident: bytes, frames: list[bytes], replies: list) -> p.Command | None:
        if len(frames) != 2:
            body = frames[1] if len(frames) > 1 else b""
            replies.append((ident, p.Error(req=p.salvage_req(body), code="protocol",
                                           message=f"expected 1 frame, got {len(frames) - 1}")))
            self.stats["errors"] += 1
            return None
        try:
            return p.decode_command(frames[1])
        except p.BadFrame as exc:
            replies.append((ident, p.Error(req=p.salvage_req(frames[1]), code="protocol",
                                           message=f"bad command: {exc}")))
            self.stats["errors"] += 1
            return None

    def _fill(self, reply: p.Reply) -> p.Reply:
        if isinstance(reply, p.Welcome):
            return msgspec.structs.replace(reply, events_endpoint=self.events_endpoint,
                                           last_seq=self.log.last_seq,
                                           query_endpoint=self.query_endpoint)
        return reply

    def _output(self, cmd: p.Output | p.Logs) -> p.Reply:
        job = self.desk.state.jobs.get(cmd.job_id)
        if job is None:
            return p.Error(req=cmd.req, code="invalid", message=f"no job {cmd.job_id!r}")
        if isinstance(cmd, p.Output) and self.gate is not None and job.node != cmd.node:
            return p.Error(req=cmd.req, code="unauthorized",
                           message=f"node {cmd.node} does not run {cmd.job_id}")
        try:
            if isinstance(cmd, p.Output):
                size = self.outputs.write(cmd.job_id, cmd.attempt, cmd.stream, cmd.offset,
                                          cmd.data)
                return p.Ok(req=cmd.req, data={"size": size})
            attempts = self.outputs.attempts(cmd.job_id)
            if cmd.attempt and cmd.attempt not in attempts and cmd.attempt > job.attempt:
                return p.Error(req=cmd.req, code="invalid", message=(
                    f"job {cmd.job_id} has no attempt {cmd.attempt} (it has had {job.attempt}"
                    f"{': ' + ', '.join(map(str, attempts)) + ' with output' if attempts else ''})"))
            attempt = cmd.attempt or max([job.attempt, *attempts, 1])
            data, size = self.outputs.read(cmd.job_id, attempt, cmd.stream, cmd.offset,
                                           cmd.limit)
        except (ValueError, OSError) as exc:
            return p.Error(req=cmd.req, code="invalid", message=str(exc))
        return p.LogChunk(req=cmd.req, job_id=cmd.job_id, attempt=attempt, stream=cmd.stream,
                          offset=cmd.offset, data=data, size=size, attempts=attempts,
                          state=job.state)

    def _blob(self, cmd: p.Have | p.PutBlob | p.GetBlob) -> p.Reply:
        try:
            if isinstance(cmd, p.Have):
                return p.Ok(req=cmd.req, data={"missing": self.store.missing(cmd.digests)})
            if isinstance(cmd, p.PutBlob):
                size = self.store.put(cmd.digest, cmd.size, cmd.offset, cmd.data)
                return p.Ok(req=cmd.req, data={"size": size})
            data, size = self.store.read(cmd.digest, cmd.offset, cmd.limit)
        except StoreError as exc:
            return p.Error(req=cmd.req, code="invalid", message=str(exc))
        except OSError as exc:  # a full disk: nothing is kept, the sender may try again
            return p.Error(req=cmd.req, code="unavailable",
                           message=f"the broker's store: {exc.strerror or exc}")
        return p.Blob(req=cmd.req, digest=cmd.digest, offset=cmd.offset, data=data, size=size)

    def _unstored(self, cmd: p.Submit | p.SubmitSweep) -> str:
        """Why a submit names files the store does not have ("" when it has them all)."""
        specs = [cmd.spec] if isinstance(cmd, p.Submit) else cmd.jobs
        seen: set[tuple] = set()
        for i, spec in enumerate(specs):
            key = (spec.tree, tuple(sorted(spec.data.items())))
            if key in seen:
                continue
            seen.add(key)
            why = self.store.absent(spec.tree, spec.data)
            if why:
                where = "" if isinstance(cmd, p.Submit) else f"job {i + 1} of the sweep: "
                return f"{where}{why}: send the files first (evo.Client's submit does)"
        return ""

    def _read(self, cmd: p.Read) -> p.Reply:
        raws: list[bytes] = []
        size = 0
        limit = max(1, min(cmd.limit, 100_000))
        for _, raw in self.log.read_raw_from(cmd.from_seq, limit):
            raws.append(raw)
            size += len(raw)
            if size >= READ_BYTES:
                break
        return p.Events(req=cmd.req, events=msgspec.Raw(pack_batch(raws)), head=self.log.last_seq)

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()
        if self.follower is not None:
            self.follower.stop()
            self.follower.join(30)
        for sock in (self.router, self.pub):
            sock.close(0)
        if self.gate is not None:
            self.gate.close()
        self.ctx.term()
        self.log.close()
        info = read_broker_file(self.home)
        if info and info.get("pid") == os.getpid():
            try:
                (self.home / "broker.json").unlink()
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)


def run_broker(home: str | os.PathLike[str], bind: str = "tcp://127.0.0.1:*", **kw: Any) -> None:
    """Run a broker in the foreground until SIGINT or SIGTERM."""
    with collector_paused():
        broker = Broker(home, bind, **kw)
    broker.install_signal_handlers()
    log.info("broker at %s, relay at %s, %d events in the log", broker.address,
             broker.events_endpoint, broker.log.last_seq)
    with broker_collector():
        broker.serve_forever()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collection while a broker restores its state (entry points only): a restore builds
    about ten objects per job and finds no garbage, and collections over what it built were
    two thirds of a warm start's time at 100,000 jobs (README, Scale)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def broker_collector() -> Iterator[None]:
    """The process's collector as a broker wants it, set by the entry points that run one
    (`evo broker`, `evo up`), never by the library: the state holds one small object graph per
    job and no reference cycles worth chasing, so what the replay built is moved out of the
    collector's sight and young objects are collected less often, or full collections over a
    large state dominate each batch."""
    threshold = gc.get_threshold()
    gc.freeze()  # no collect first: over a large state it costs more than the little it frees
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        # collected at exit again: frozen, DuckDB's bindings would outlive the interpreter and
        # print "nanobind: leaked ..." as it ends
        gc.unfreeze()
        gc.set_threshold(*threshold)
