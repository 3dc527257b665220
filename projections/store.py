"""The DuckDB projection: apply events in batches, replay, digest, query.

A batch goes in as one Arrow table (never row by row): the events flattened, their payload as
JSON. The derived tables are then recomputed in SQL for what the batch touched, and the last
applied seq is stored in the same transaction as the rows, so a crash mid-apply leaves the file
at the previous batch: nothing lost, nothing doubled.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb
import msgspec
import numpy as np
import pyarrow as pa

from evo.errors import BadInput, EvoError
from evo.events.codec import decode_batch, decode_seq, pack_batch

from .schema import DDL, DERIVE, KEYS, TABLES, VERSION, VIEWS

_json = msgspec.json.Encoder()

READ_ONLY = {"SELECT", "EXPLAIN"}


class SqlError(BadInput):
    """A query DuckDB refused, or one that would write."""


def to_arrow(raws: Sequence[bytes]) -> pa.Table:
    """Encoded events (the log's bytes) as one Arrow column of JSON, built from two buffers.

    The typed decode checks every record against the schema; the JSON lines are joined into one
    data buffer with an offsets buffer, so no Python object is made per row for Arrow. DuckDB
    then flattens the columns it needs (see INSERT_EVENTS) in C++.
    """
    enabled = gc.isenabled()
    gc.disable()  # a million short-lived structs would set off full collections for nothing
    try:
        events = decode_batch(pack_batch(raws))
        enc = _json.encode
        lines = [enc(e) for e in events]
    finally:
        if enabled:
            gc.enable()
    lens = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
    offsets = np.zeros(len(lines) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    payload = pa.StringArray.from_buffers(len(lines), pa.py_buffer(offsets),
                                          pa.py_buffer(b"".join(lines)))
    return pa.Table.from_arrays([payload], names=["payload"])


INSERT_EVENTS = """
INSERT INTO events
SELECT s.seq, s.time, s.type, s.job_id, s.node,
    coalesce(s.sweep_id, CASE WHEN s.type = 'JobSubmitted' THEN s.spec.sweep_id END),
    s.attempt, CASE WHEN s.type = 'JobLeased' THEN s.seq ELSE s.lease_epoch END, p
FROM (SELECT p, json_transform(p, '{"seq": "BIGINT", "time": "DOUBLE", "type": "VARCHAR",
        "job_id": "VARCHAR", "node": "VARCHAR", "sweep_id": "VARCHAR", "attempt": "INTEGER",
        "lease_epoch": "BIGINT", "spec": {"sweep_id": "VARCHAR"}}') AS s
      FROM (SELECT CAST(payload AS JSON) AS p FROM _batch))
ORDER BY s.seq
"""


class Projection:
    def __init__(self, path: str | Path = ":memory:", read_only: bool = False) -> None:
        self.path = str(path)
        try:
            self.con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as exc:
            raise EvoError(f"cannot open the projection {self.path}: {exc}") from exc
        if not read_only:
            self.con.execute(DDL)
            self.con.execute(VIEWS)
            self.con.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('version', ?)",
                             [VERSION])

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
        raws = [r for r in raws if decode_seq(r) > lo]
        if not raws:
            return lo
        first, hi = decode_seq(raws[0]), decode_seq(raws[-1])
        if first != lo + 1 or hi - first + 1 != len(raws):
            raise EvoError(f"events {first}..{hi} do not follow on from seq {lo} without a gap")
        _commit(self.con, to_arrow(raws), INSERT_EVENTS, lo, hi)
        return hi

    def catch_up(self, raws: Iterable[bytes], batch: int = 100_000) -> int:
        buf: list[bytes] = []
        for raw in raws:
            buf.append(raw)
            if len(buf) >= batch:
                self.apply(buf)
                buf = []
        if buf:
            self.apply(buf)
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

    def query(self, sql: str) -> pa.Table:
        """Run one read-only statement; writes and DuckDB errors raise SqlError."""
        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlError(f"SQL error: {exc}") from exc
        if len(statements) != 1:
            raise SqlError(f"expected one SQL statement, got {len(statements)}")
        kind = statements[0].type.name
        if kind not in READ_ONLY:
            raise SqlError(f"evo sql is read-only: a {kind} statement is refused "
                           "(export with --out FILE)")
        try:
            return self.con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise SqlError(f"SQL error: {exc}") from exc

    def close(self) -> None:
        self.con.close()


def replay(raws: Iterable[bytes], path: str | Path = ":memory:", to_seq: int | None = None,
           batch: int = 250_000) -> Projection:
    """A projection rebuilt from nothing (up to ``to_seq``)."""
    proj = Projection(path)
    if to_seq is not None:
        raws = (r for r in raws if decode_seq(r) <= to_seq)
    proj.catch_up(raws, batch)
    return proj


def as_of(live: Projection, seq: int) -> Projection:
    """The projection as it was at ``seq``, derived from the live ``events`` table."""
    proj = Projection(":memory:")
    table = live.con.sql("SELECT * FROM events WHERE seq <= $seq ORDER BY seq",
                         params={"seq": seq}).to_arrow_table()
    if table.num_rows:
        hi = int(table.column("seq")[-1].as_py())
        _commit(proj.con, table, "INSERT INTO events SELECT * FROM _batch", 0, hi)
    return proj


def _commit(con: duckdb.DuckDBPyConnection, batch: pa.Table, insert: str, lo: int,
            hi: int) -> None:
    """Insert a batch of events, derive what it touched, record ``hi``: one transaction."""
    con.begin()
    try:
        con.register("_batch", batch)
        con.execute(insert)
        con.unregister("_batch")
        for _, sql in DERIVE:
            con.execute(sql, {"lo": lo, "hi": hi})
        con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", [hi])
        con.commit()
    except BaseException:
        con.rollback()
        raise
