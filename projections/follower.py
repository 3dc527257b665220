"""The broker's projection follower: one thread that owns ``evo.duckdb`` while the broker runs.

The server hands it every committed batch (the same bytes as the log and the relay) before it
sends the batch's acknowledgements, and the follower applies whatever has arrived before it
answers a query. So an answer is never staler than the events acknowledged before the query
was sent, and a slow query never delays an acknowledgement: it runs in this thread, on its own
socket (Welcome.query_endpoint), while the broker's loop carries on.

On start it catches the file up from the log (read-only) to the seq the broker had when it
started it; a file from another schema version, or ahead of the log, is rebuilt from nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa
import zmq

from evo.broker import protocol as p
from evo.errors import EvoError
from evo.events.log import SegmentLog

from .schema import VERSION
from .store import Projection, SqlError, as_of

log = logging.getLogger("evo.projections")
APPLY_EVERY_S = 5.0


def open_projection(home: Path, upto: int | None = None) -> Projection:
    """``EVO_HOME/evo.duckdb`` caught up from the log (rebuilt if it cannot be trusted)."""
    path = home / "evo.duckdb"
    proj = Projection(path)
    with SegmentLog(home / "log", readonly=True) as lg:
        head = lg.last_seq if upto is None else min(upto, lg.last_seq)
        if proj.version != VERSION or proj.last_seq > head:
            log.warning("rebuilding %s (schema version %s, last seq %d, log head %d)", path,
                        proj.version, proj.last_seq, head)
            proj.close()
            for f in (path, Path(str(path) + ".wal")):
                f.unlink(missing_ok=True)
            proj = Projection(path)
        proj.catch_up(raw for seq, raw in lg.read_raw_from(proj.last_seq + 1) if seq <= head)
    return proj


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class Follower(threading.Thread):
    def __init__(self, home: Path, ctx: zmq.Context, start_seq: int, host: str) -> None:
        super().__init__(name="evo-projection", daemon=True)
        self.home, self.ctx, self.start_seq, self.host = home, ctx, start_seq, host
        self.inbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.endpoint = ""
        self.error: str = ""
        self._ready = threading.Event()
        self._halt = threading.Event()
        self._query = p.Query()

    def start_and_wait(self, timeout_s: float = 10.0) -> None:
        self.start()
        self._ready.wait(timeout_s)

    def push(self, raws: list[bytes]) -> None:
        self.inbox.put(raws)

    def stop(self) -> None:
        self._halt.set()

    def _drain(self, proj: Projection) -> None:
        raws: list[bytes] = []
        while True:
            try:
                raws.extend(self.inbox.get_nowait())
            except queue.Empty:
                break
        if raws:
            proj.apply(raws)

    def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"{self.host}:*")
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ready.set()
        proj = None
        try:
            proj = open_projection(self.home, self.start_seq)
            next_apply = time.monotonic() + APPLY_EVERY_S
            while not self._halt.is_set():
                # Batches are applied when a query comes (so answers are fresh) and otherwise
                # at most every APPLY_EVERY_S: bigger batches cost DuckDB far less per event,
                # and on a small machine the CPU belongs to the training jobs.
                if sock.poll(100):
                    ident, reply = self._receive(sock)
                    if reply is None:
                        self._drain(proj)
                        reply = self._answer(proj, self._query)
                    sock.send_multipart([ident, p.reply_encoder.encode(reply)])
                elif time.monotonic() >= next_apply:
                    self._drain(proj)
                    next_apply = time.monotonic() + APPLY_EVERY_S
            self._drain(proj)  # what was committed before the stop is in the file
        except Exception as exc:  # noqa: BLE001 - the broker keeps serving without projections
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("projection follower stopped")
            while not self._halt.is_set():  # answer queries with the reason, not silence
                if sock.poll(100):
                    ident, reply = self._receive(sock)
                    if reply is None:
                        reply = p.Error(req=self._query.req, code="internal",
                                        message=f"the projection is unavailable: {self.error}")
                    sock.send_multipart([ident, p.reply_encoder.encode(reply)])
        finally:
            if proj is not None:
                proj.close()
            sock.close(0)

    def _receive(self, sock: zmq.Socket) -> tuple[bytes, p.Reply | None]:
        """The sender and, for anything but a well-formed query, the error to answer it with
        (the query itself is left in ``self._query``)."""
        frames = sock.recv_multipart()
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
        self._query = cmd
        return ident, None

    def _answer(self, proj: Projection, cmd: p.Query) -> p.Reply:
        try:
            if cmd.kind == "digest":
                digest, tables = proj.digest()
                return p.QueryResult(req=cmd.req, seq=proj.last_seq, digest=digest, tables=tables)
            if cmd.as_of:
                past = as_of(proj, cmd.as_of)
                try:
                    return p.QueryResult(req=cmd.req, seq=past.last_seq,
                                         arrow=to_ipc(past.query(cmd.sql)))
                finally:
                    past.close()
            return p.QueryResult(req=cmd.req, seq=proj.last_seq, arrow=to_ipc(proj.query(cmd.sql)))
        except SqlError as exc:
            return p.Error(req=cmd.req, code="invalid", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad query must not stop the follower
            log.exception("query failed")
            return p.Error(req=cmd.req, code="internal", message=f"{type(exc).__name__}: {exc}")
