"""The DuckDB projection: apply events in batches, replay, digest, query.

A batch goes in as one Arrow column of JSON (never row by row), is staged (its common fields
typed, in an in-memory database), and is folded into the tables in SQL; the last applied seq is
stored in the same transaction as the rows, so a crash mid-apply leaves the file at the previous
batch: nothing lost, nothing doubled. A catch-up's batches are single transactions too.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import queue
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import duckdb
import msgspec
import numpy as np
import pyarrow as pa

from evo import failpoints
from evo.errors import EvoError
from evo.events.codec import decode_many, decode_seq

from .sql import SqlError  # noqa: F401 - raised by Projection.query
from .schema import (APPENDED, DDL, DERIVE, DROP_STAGED, INSERT_EVENTS, KEYS, STAGE, STAGE_DB,
                     TABLES, VERSION, VIEWS)

_json = msgspec.json.Encoder()

# Catch-up batches: whole row groups of DuckDB's, so that each batch's events go to disk as
# whole row groups and the checkpoint has none to merge (batches of 250,000 took 10% longer);
# three did a little better than two or four. The first batch is one row group, so that the
# fold starts sooner.
ROW_GROUP = 122_880
CATCH_UP_BATCH = 3 * ROW_GROUP
DECODE_STEP = 2048  # events decoded per call (a few ms of holding the GIL)
LARGE_BATCH_BYTES = 2**31  # past 2 GiB of JSON in a batch (huge env dicts), 64-bit offsets


def _prepare(cur: duckdb.DuckDBPyConnection, raws: Sequence[bytes], lo: int) -> Staged | None:
    """The events of ``raws`` after seq ``lo``, staged, checked to follow on from ``lo``."""
    if raws and decode_seq(raws[0]) <= lo:  # a resend overlapping what is applied
        raws = [r for r in raws if decode_seq(r) > lo]
    if not raws:
        return None
    first = decode_seq(raws[0])
    if first != lo + 1:
        raise EvoError(f"events from seq {first} do not follow on from seq {lo}: a gap")
    return stage(cur, to_arrow(raws, first), first)


class Staged(NamedTuple):
    table: str  # in the in-memory database STAGE_DB
    first: int
    n: int


_names = itertools.count(1)


def stage(cur: duckdb.DuckDBPyConnection, batch: pa.Table, first: int) -> Staged:
    """``_b`` for a batch of JSON lines whose seqs must be ``first, first + 1, ...``: its typed
    columns (STAGE) and payload, as a table of the projection's in-memory STAGE_DB, made on
    ``cur`` (a cursor of the projection's, so that it can run beside the fold)."""
    name = f"{STAGE_DB}._b{next(_names)}"
    cur.register("_batch", batch)
    try:
        cur.execute(f"CREATE TABLE {name} AS {STAGE}")
    finally:
        cur.unregister("_batch")
    # rowid is the insertion order, which is the batch's order
    bad = cur.execute(f"SELECT rowid, seq FROM {name} WHERE seq <> rowid + ? ORDER BY rowid "
                      "LIMIT 1", [first]).fetchall()
    if bad:
        cur.execute(f"DROP TABLE {name}")
        i, seq = bad[0]
        raise EvoError(f"event {i} of a batch from seq {first} has seq {seq}, "
                       f"not {first + i}: the batch has a gap or is out of order")
    return Staged(name, first, batch.num_rows)


def to_arrow(raws: Sequence[bytes], first: int = 0) -> pa.Table:
    """Encoded events (the log's bytes) as one Arrow column of JSON lines, built from an offsets
    buffer and a data buffer; ``first`` (the first one's seq) is for naming an undecodable one.

    The typed decode checks every record against the schema; msgspec writes the events as JSON
    lines, and the offsets come from the newlines (JSON escapes a newline inside a string, so
    each one ends an event); they are then dropped from the buffer. No Python object is made
    per row for Arrow. It goes in steps of DECODE_STEP events: each step's structs are freed
    while still in cache, and the thread folding the previous batch (which needs the GIL
    between its statements) never waits long for it.
    """
    enabled = gc.isenabled()
    gc.disable()  # a million short-lived structs would set off full collections for nothing
    try:
        parts = [_json.encode_lines(decode_many(raws[i:i + DECODE_STEP], first=first + i))
                 for i in range(0, len(raws), DECODE_STEP)]
    finally:
        if enabled:
            gc.enable()
    lengths = []
    for i, part in enumerate(parts):  # in cache: the line lengths, the bytes without newlines
        ends = np.flatnonzero(np.frombuffer(part, dtype=np.uint8) == 10)
        lengths.append(np.diff(ends, prepend=-1) - 1)
        parts[i] = part.replace(b"\n", b"")
    n = sum(map(len, lengths))
    if n != len(raws):  # cannot happen with msgspec's escaping; never store a torn row
        raise EvoError(f"{len(raws)} events gave {n} JSON lines from seq {first}")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    del parts
    large = len(data) >= LARGE_BATCH_BYTES
    offsets = np.zeros(n + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    kind = pa.LargeStringArray if large else pa.StringArray
    payload = kind.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    # Typed as JSON (Arrow's extension type), so that DuckDB stores it without parsing it again
    # to check it: msgspec wrote it.
    payload = pa.ExtensionArray.from_storage(pa.json_(payload.type), payload)
    return pa.Table.from_arrays([payload], names=["payload"])


class Projection:
    def __init__(self, path: str | Path = ":memory:", read_only: bool = False) -> None:
        self.path = str(path)
        try:
            self.con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as exc:
            raise EvoError(f"cannot open the projection {self.path}: {exc}") from exc
        # The schema version of an existing file; a file of another version is left as it is
        # (its tables may not take this version's DDL), for the caller to rebuild.
        self.version: int | None = VERSION
        if self.con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta' "
                            "AND schema_name = 'main'").fetchall()[0][0]:
            rows = self.con.execute("SELECT value FROM meta WHERE key = 'version'").fetchall()
            self.version = int(rows[0][0]) if rows else None
        if not read_only:  # staged batches: in memory, shared by this connection's cursors
            self.con.execute(f"ATTACH ':memory:' AS {STAGE_DB}")
        if not read_only and self.version == VERSION:
            self.con.execute(DDL)
            self.con.execute(VIEWS)
            self.con.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('version', ?)",
                             [VERSION])
            self.con.execute("INSERT INTO appended SELECT value FROM meta WHERE key = 'last_seq' "
                             "AND NOT EXISTS (SELECT 1 FROM appended)")

    @property
    def last_seq(self) -> int:
        rows = self.con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchall()
        return int(rows[0][0]) if rows else 0

    # --- applying -----------------------------------------------------------------------------

    def apply(self, raws: Sequence[bytes]) -> int:
        """Apply the events after ``last_seq`` (older ones are skipped); returns the new last seq.

        The events must follow on without a gap; a gap raises, naming it.
        """
        lo = self.last_seq
        batch = _prepare(self.con, raws, lo)
        if batch is None:
            return lo
        _commit(self.con, batch)
        return lo + batch.n

    def catch_up(self, raws: Iterable[bytes], batch: int = CATCH_UP_BATCH) -> int:
        """Apply a long run of events in batches of ``batch``; returns the new last seq.

        A thread decodes and stages the next batch while DuckDB folds this one (DuckDB
        releases the GIL), and checkpoints wait for the end: a bulk load writes each table once
        instead of rewriting its last row groups at every 16 MB of log. Each batch is one
        transaction, as in ``apply``.
        """
        chunks: queue.Queue[Staged | BaseException | None] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            lo, buf, cur = self.last_seq, [], self.con.cursor()
            size = min(batch, ROW_GROUP)  # a small first batch: the fold starts sooner
            try:
                for raw in itertools.chain(raws, [None]):
                    if raw is not None:
                        buf.append(raw)
                        if len(buf) < size:
                            continue
                    size = batch
                    if stop.is_set():
                        return
                    table = _prepare(cur, buf, lo) if buf else None
                    if table is not None:
                        lo += table.n
                        chunks.put(table)
                    buf = []
                chunks.put(None)
            except BaseException as exc:  # handed to the folding thread, which raises it
                chunks.put(exc)
            finally:
                cur.close()

        producer = threading.Thread(target=produce, name="evo-projection-arrow", daemon=True)
        threshold = self.con.execute("SELECT current_setting('checkpoint_threshold')").fetchall()
        self.con.execute("SET checkpoint_threshold = '1GB'")
        # The fold takes the GIL back between its statements: while the producer runs Python,
        # each take would wait up to the switch interval (5 ms), a dozen times a batch.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        producer.start()
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                _commit(self.con, item)
            self.con.execute("CHECKPOINT")
        finally:
            stop.set()
            # unblock a producer waiting on a full queue, and drop what it staged
            while producer.is_alive() or not chunks.empty():
                try:
                    item = chunks.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, Staged):
                    _unstage(self.con, item)
            sys.setswitchinterval(interval)
            self.con.execute(f"SET checkpoint_threshold = '{threshold[0][0]}'")
        return self.last_seq

    # --- reading ------------------------------------------------------------------------------

    def digest(self) -> tuple[str, dict[str, str]]:
        """A sha256 over every table in a stable order, and one md5 per table."""
        per: dict[str, str] = {}
        for table in TABLES:
            row = self.con.execute(
                f"SELECT count(*), md5(coalesce(string_agg(md5(CAST(t AS VARCHAR)), '' "
                f"ORDER BY {KEYS[table]}), '')) FROM {table} t").fetchall()[0]
            per[table] = f"{row[0]}:{row[1]}"
        h = hashlib.sha256()
        for table in TABLES:
            h.update(f"{table}={per[table]}\n".encode())
        return h.hexdigest(), per

    def query(self, text: str, params: list | tuple = ()) -> pa.Table:
        """One read-only statement, within the limits of projections/sql.py; ``params``: the
        values of its ``?`` placeholders."""
        from . import sql

        return pa.ipc.open_stream(sql.run(self.con.cursor(), text, params=list(params))).read_all()

    def close(self) -> None:
        self.con.close()


def replay(raws: Iterable[bytes], path: str | Path = ":memory:", to_seq: int | None = None,
           batch: int = CATCH_UP_BATCH) -> Projection:
    """A projection rebuilt from nothing (up to ``to_seq``)."""
    proj = Projection(path)
    if to_seq is not None:
        raws = (r for r in raws if decode_seq(r) <= to_seq)
    proj.catch_up(raws, batch)
    return proj


def query_at(live: duckdb.DuckDBPyConnection, seq: int, text: str,
             running: set | None = None, params: list | None = None) -> tuple[int, bytes]:
    """One read-only query (projections/sql.py) on the projection as it was at ``seq``: the
    seq it answers at, and the Arrow IPC stream."""
    from . import sql

    past = as_of(live, seq)
    try:
        sql.secure(past.con)
        return past.last_seq, sql.run(past.con.cursor(), text, running=running, params=params)
    finally:
        past.close()


def as_of(live: duckdb.DuckDBPyConnection, seq: int) -> Projection:
    """The projection as it was at ``seq``, derived from the live ``events`` table (``live``: a
    connection or cursor of the live projection)."""
    proj = Projection(":memory:")
    rows = live.execute("SELECT max(seq) FROM events WHERE seq <= ?", [seq]).fetchall()
    hi = rows[0][0]
    if hi is not None:
        table = live.sql("SELECT CAST(payload AS VARCHAR) AS payload FROM events "
                         "WHERE seq <= $seq ORDER BY seq", params={"seq": seq}).to_arrow_table()
        _commit(proj.con, stage(proj.con, table, 1))
    return proj


# A batch's statements: those of the append-only tables (APPENDED), then the keyed folds.
_APPEND = [INSERT_EVENTS, *(sql for name, sql in DERIVE if name in APPENDED)]
_FOLD = [*(sql for name, sql in DERIVE if name not in APPENDED), DROP_STAGED]
_SET_APPENDED = "UPDATE appended SET last_seq = ?"
_SET_LAST = "UPDATE meta SET value = ? WHERE key = 'last_seq'"


def _transaction(con: duckdb.DuckDBPyConnection, statements: list[str], marks: list[str],
                 hi: int) -> None:
    """Run ``statements``, set each of ``marks`` to ``hi``, and commit; roll back on any error."""
    con.begin()
    try:
        for sql in statements:
            con.execute(sql)
        for mark in marks:
            con.execute(mark, [hi])
        failpoints.hit("projection.apply")
        con.commit()
    except BaseException:
        try:
            con.rollback()
        except duckdb.TransactionException:
            pass  # a commit that failed (a full disk) has ended the transaction already
        raise


def _view(batch: Staged) -> str:
    return f"CREATE OR REPLACE TEMP VIEW _b AS SELECT * FROM {batch.table}"


def _unstage(con: duckdb.DuckDBPyConnection, batch: Staged) -> None:
    con.execute(f"DROP VIEW IF EXISTS _b; DROP TABLE IF EXISTS {batch.table}")


def _commit(con: duckdb.DuckDBPyConnection, batch: Staged) -> None:
    """Insert a staged batch of events, fold it into the tables and record its last seq: one
    transaction. The staged table is dropped after it (a transaction writes to one database)."""
    try:
        con.execute(_view(batch))
        _transaction(con, _APPEND + _FOLD, [_SET_APPENDED, _SET_LAST],
                     batch.first + batch.n - 1)
    finally:
        _unstage(con, batch)
