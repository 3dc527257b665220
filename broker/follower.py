"""The broker's projection follower: one thread that owns ``evo.duckdb`` while the broker runs.

The server hands it every committed batch (the same bytes as the log and the relay) before it
sends the batch's acknowledgements, and the follower applies whatever has arrived before it
answers a query. So an answer is never staler than the events acknowledged before the query
was sent, and a slow query never delays an acknowledgement. Queries arrive on a socket of their
own (Welcome.query_endpoint) and run in threads beside the follower (QUERY_THREADS), each on a
cursor of its own in a READ ONLY transaction, within the time and size limits of
projections/sql.py; the follower goes on applying meanwhile (DuckDB's MVCC), so a slow query
delays neither the broker nor the other queries.

On start it catches the file up from the log (read-only) to the seq the broker had when it
started it; a file from another schema version, or ahead of the log, is rebuilt from nothing.
When a batch cannot be applied (a full disk), the events are kept and tried again every
RETRY_S; answers meanwhile come from what the file holds, and say so (QueryResult.behind). A
file that cannot be opened for writing (a broker started on a full disk) is replaced by a copy
in memory caught up from the log, which answers and applies as the file would; the file is
tried again every FILE_RETRY_S.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zmq

from evo.broker import protocol as p
from evo.broker.auth import Gate
from evo.events.codec import decode_seq
from evo.errors import EvoError

from evo.projections import sql
from evo.projections.files import open_projection
from evo.projections.store import Projection, SqlError, query_at

log = logging.getLogger("evo.projections")
# Without a query, batches are applied only in a quiet moment (no batch for QUIET_S, and at
# most every APPLY_EVERY_S), or when MAX_PENDING events wait: an apply costs about 50 ms of
# CPU whatever its size, which on a small machine is taken from the trials; a query folds
# what waits before it is answered (20,000 events: a fraction of a second), and a stop folds
# the rest.
APPLY_EVERY_S = 60.0
QUIET_S = 1.0
MAX_PENDING = 20_000
WAIT_MS = 1000  # the loop's longest sleep: queries and answers wake it, only timers wait
RETRY_S = 1.0  # after a failed apply or open
FILE_RETRY_S = 5.0  # answering from memory: how often the file is tried again
QUERY_THREADS = 2
_ids = itertools.count(1)


class Follower(threading.Thread):
    def __init__(self, home: Path, ctx: zmq.Context, start_seq: int, host: str,
                 gate: Gate | None = None) -> None:
        super().__init__(name="evo-projection", daemon=True)
        self.home, self.ctx, self.start_seq, self.host = home, ctx, start_seq, host
        self.gate = gate  # with keys: every query's sender is checked
        self.inbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.pool: ThreadPoolExecutor  # the query threads, made when the loop starts (run)
        self.endpoint = ""
        self.error: str = ""  # why there is no projection to answer from, when there is none
        self.behind: str = ""  # why the file is behind the log (its last apply failed)
        self.durable = start_seq  # the last seq handed over (durable in the log)
        self.pending: list[bytes] = []
        self.last_push = 0.0  # when the broker last handed a batch over
        self.fallback = ""  # why answers come from a copy in memory: the file cannot be written
        self._retry_at = 0.0
        self._file_retry_at = 0.0
        self._ready = threading.Event()
        self._halt = threading.Event()
        self._query = p.Query()
        self._asking: bytes | None = None  # the sender of the query being handled
        self._wake_at = f"inproc://evo-queries-{next(_ids)}"
        self._answers: queue.SimpleQueue[tuple[bytes, p.Reply]] = queue.SimpleQueue()
        self._cursors: set = set()  # queries running, interrupted at a stop
        self._shape: set[str] = set()  # the databases the instance has attached, queries or not

    def start_and_wait(self, timeout_s: float = 10.0) -> None:
        self.start()
        self._ready.wait(timeout_s)

    def push(self, raws: list[bytes]) -> None:
        self.durable = decode_seq(raws[-1])  # first, so an open never misses what is queued
        self.last_push = time.monotonic()
        self.inbox.put(raws)

    def stop(self) -> None:
        self._halt.set()
        self._wake()

    def _wake(self) -> None:
        """Wake the loop from another thread (it sleeps up to WAIT_MS otherwise)."""
        wake = self.ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 1000)
        wake.connect(self._wake_at)
        wake.send(b"")
        wake.close()

    # --- applying -----------------------------------------------------------------------------

    def _take(self) -> None:
        while True:
            try:
                self.pending.extend(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _discard(self) -> None:
        """Forget what was handed over: it is in the log, and will be read from there."""
        self.pending.clear()
        self._take()
        self.pending.clear()

    def _open(self, memory: bool = True) -> Projection | None:
        """The projection file caught up to what the broker has handed over; failing that (a
        full disk) a copy in memory caught up from the log, to answer from and apply to
        (``memory``); failing both, None. Tried again later (RETRY_S, FILE_RETRY_S).

        With ``memory`` there is no projection yet: what was handed over is dropped and read
        from the log. Without it a copy in memory goes on meanwhile, with its pending events
        kept: all were handed over before ``durable`` was read, so the file caught up to it
        holds them (applying them again is skipped)."""
        if memory:
            self._discard()
        upto = self.durable
        try:
            proj = open_projection(self.home, upto, stop=self._halt)
            sql.secure(proj.con)
            self._shape = sql.databases(proj.con)
        except Exception as exc:  # noqa: BLE001 - a full disk, a damaged file: try again
            why = f"{type(exc).__name__}: {exc}"
            if self._halt.is_set():  # stopped while it caught up: nothing to answer for
                return None
        else:
            if self.error or self.fallback:
                log.warning("the projection file is open again (seq %d)", proj.last_seq)
            self.error, self.fallback, self.behind = "", "", ""
            return proj
        if not memory:
            self._file_retry_at = time.monotonic() + FILE_RETRY_S
            return None
        self._retry_at = time.monotonic() + RETRY_S
        try:
            proj = open_projection(self.home, upto, path=":memory:")
            sql.secure(proj.con)
            self._shape = sql.databases(proj.con)
        except Exception as exc:  # noqa: BLE001
            if not self.error:
                log.error("the projection cannot be opened (%s), nor made in memory (%s); "
                          "trying again every %gs", why, exc, RETRY_S)
            self.error = why
            return None
        log.error("the projection file cannot be opened for writing (%s); answering from a "
                  "copy in memory, caught up from the log (seq %d)", why, proj.last_seq)
        self.error, self.fallback = "", why
        self._file_retry_at = time.monotonic() + FILE_RETRY_S
        return proj

    def _note(self) -> str:
        """What an answer should say about where it comes from, if anything."""
        if self.fallback:
            return (f"the projection file cannot be written ({self.fallback}); answers come "
                    f"from a copy in memory{'; ' + self.behind if self.behind else ''}")
        return self.behind

    def _drain(self, proj: Projection) -> Projection | None:
        """Apply what has arrived; the projection to go on with (None: open it again)."""
        self._take()
        if not self.pending or time.monotonic() < self._retry_at:
            return proj
        try:
            proj.apply(self.pending)
        except Exception as exc:  # noqa: BLE001 - kept, and tried again
            self._retry_at = time.monotonic() + RETRY_S
            if not self.behind:
                log.warning("the projection cannot apply events from seq %d (%s); answers "
                            "come from seq %d until it can", decode_seq(self.pending[0]), exc,
                            proj.last_seq)
            self.behind = f"events after seq {proj.last_seq} are not applied yet: {exc}"
            if isinstance(exc, EvoError) or "invalidated" in str(exc):
                # the file and the events disagree, or DuckDB gave the file up: from the log
                self._close(proj)
                self.error = f"opening again from the log: {exc}"
                return None
            return proj
        if self.behind:
            log.warning("the projection applies events again (seq %d)", proj.last_seq)
        self.pending, self.behind = [], ""
        return proj

    def _close(self, proj: Projection | None) -> None:
        for cur in list(self._cursors):
            cur.interrupt()
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="evo-query")
        if proj is not None:
            proj.close()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)  # like the broker's own socket
        if self.gate is not None:
            self.gate.serve(sock)
        sock.bind(f"{self.host}:*")
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        wake = self.ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(self._wake_at)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        self.pool = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="evo-query")
        self._ready.set()
        proj: Projection | None = None
        next_apply = time.monotonic() + APPLY_EVERY_S
        try:
            while not self._halt.is_set():
                try:
                    proj, next_apply = self._turn(proj, sock, wake, poller, next_apply)
                except Exception as exc:  # noqa: BLE001 - a bug here must not end the answers
                    log.exception("the projection follower failed; opening it again")
                    self.error = f"{type(exc).__name__}: {exc}"
                    if self._asking is not None:  # the query it was on gets the reason
                        sock.send_multipart([self._asking, p.reply_encoder.encode(p.Error(
                            req=self._query.req, code="internal", message=self.error))])
                        self._asking = None
                    if proj is not None:
                        self._close(proj)
                    proj, self._retry_at = None, time.monotonic() + RETRY_S
            if proj is not None:
                self._retry_at = 0.0
                self._drain(proj)  # what was committed before the stop is in the file
        finally:
            for cur in list(self._cursors):
                cur.interrupt()
            self.pool.shutdown(wait=True)
            if proj is not None:
                proj.close()
            sock.close(0)
            wake.close(0)

    def _turn(self, proj: Projection | None, sock: zmq.Socket, wake: zmq.Socket,
              poller: zmq.Poller, next_apply: float) -> tuple[Projection | None, float]:
        """One pass of the loop: (re)open, answer what came, apply when it is time."""
        if proj is None and time.monotonic() >= self._retry_at:
            proj = self._open()
        elif self.fallback and time.monotonic() >= self._file_retry_at:  # the file again?
            better = self._open(memory=False)
            if better is not None:
                self._close(proj)
                proj = better
        ready = dict(poller.poll(100 if proj is None or self.fallback or self.behind
                                 else WAIT_MS))
        if wake in ready:
            while wake.poll(0):
                wake.recv()
            while not self._answers.empty():
                ident, answer = self._answers.get()
                sock.send_multipart([ident, p.reply_encoder.encode(answer)])
        if sock in ready:
            ident, reply = self._receive(sock)
            self._asking = ident
            if reply is None and proj is not None:
                proj = self._drain(proj)
            if reply is None and proj is None:
                reply = p.Error(req=self._query.req, code="unavailable",
                                message=f"the projection is unavailable: {self.error}")
            if reply is None and proj is not None and self._query.kind == "digest":
                reply = self._digest(proj)
            if reply is None and proj is not None:  # answered by a query thread, on its cursor
                self.pool.submit(self._answer, proj.con.cursor(), ident, self._query,
                                 proj.last_seq, self._note(), self._shape)
            else:
                sock.send_multipart([ident, p.reply_encoder.encode(reply)])
            self._asking = None
        elif proj is not None:
            # Batches are applied when a query comes (so answers are fresh), otherwise in a
            # quiet moment or when many wait: bigger batches cost DuckDB far less per event,
            # and on a small machine the CPU belongs to the jobs.
            self._take()
            now = time.monotonic()
            if len(self.pending) >= MAX_PENDING or (
                    self.pending and now >= next_apply and now - self.last_push >= QUIET_S):
                proj = self._drain(proj)
                next_apply = time.monotonic() + APPLY_EVERY_S
        return proj, next_apply

    def _receive(self, sock: zmq.Socket) -> tuple[bytes, p.Reply | None]:
        """The sender and, for anything but a well-formed query, the error to answer it with
        (the query itself is left in ``self._query``)."""
        parts = sock.recv_multipart(copy=False)
        frames = [f.bytes for f in parts]
        ident = frames[0]
        if len(frames) != 2:
            body = frames[1] if len(frames) > 1 else b""
            return ident, p.Error(req=p.salvage_req(body), code="protocol",
                                  message=f"expected 1 frame, got {len(frames) - 1}")
        try:
            cmd = p.decode_command(frames[1])
        except p.BadFrame as exc:
            return ident, p.Error(req=p.salvage_req(frames[1]), code="protocol",
                                  message=f"bad query: {exc}")
        if not isinstance(cmd, p.Query):
            return ident, p.Error(req=cmd.req, code="protocol",
                                  message="only queries are served here")
        if self.gate is not None:
            why = self.gate.refusal(str(parts[-1].get("User-Id") or ""), cmd)
            if why is not None:
                return ident, p.Error(req=cmd.req, code="unauthorized", message=why)
        self._query = cmd
        return ident, None

    def _digest(self, proj: Projection) -> p.Reply:
        try:
            digest, tables = proj.digest()
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the follower
            return p.Error(req=self._query.req, code="internal", message=f"digest: {exc}")
        return p.QueryResult(req=self._query.req, seq=proj.last_seq, digest=digest,
                             tables=tables, behind=self._note())

    def _answer(self, cur, ident: bytes, cmd: p.Query, seq: int, behind: str,  # noqa: ANN001
                shape: set[str]) -> None:
        """Run one query (in a query thread) and hand its answer to the follower's loop."""
        try:
            if cmd.as_of:
                try:
                    at, arrow = query_at(cur, cmd.as_of, cmd.sql, self._cursors, cmd.params)
                finally:
                    cur.close()
                reply: p.Reply = p.QueryResult(req=cmd.req, seq=at, arrow=arrow)
            else:
                reply = p.QueryResult(req=cmd.req, seq=seq, behind=behind,
                                      arrow=sql.run(cur, cmd.sql, running=self._cursors,
                                                    shape=shape, params=cmd.params))
        except SqlError as exc:
            reply = p.Error(req=cmd.req, code="invalid", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad query must not stop the follower
            log.exception("query failed")
            reply = p.Error(req=cmd.req, code="internal", message=f"{type(exc).__name__}: {exc}")
        self._answers.put((ident, reply))
        self._wake()
