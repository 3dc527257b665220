"""Users' SQL over the projections: read-only and bounded, by DuckDB itself.

  * The database instance a query runs on has external access off and its configuration
    locked (``secure``): no file outside the projection can be read or written (``read_csv``,
    ``read_text``, ``glob``, ``COPY``, ``ATTACH`` of a file), no extension installed or loaded,
    no setting changed, these two included.
  * Each query runs on a cursor of its own inside a READ ONLY transaction, so DuckDB refuses
    any write to the database (``DROP``, ``INSERT``, ``CREATE``, ``EXPLAIN ANALYZE`` of either),
    while the broker's follower goes on writing on its own connection. Without a broker the
    file is opened read-only as well.
  * One statement per query, a time limit (EVO_SQL_TIMEOUT_S, default 60 s; the query is
    interrupted) and a result limit (EVO_SQL_MAX_MB of Arrow, default 128): the result is read
    in record batches and written to the Arrow IPC stream as it comes, so a query past the
    limit is stopped there, never built whole in memory first.
  * What a query can change outside the database's contents, the instance's attached databases
    (``DETACH`` of the follower's staging database, ``ATTACH ':memory:'``), is put back after it.
"""

from __future__ import annotations

import os
import threading

import duckdb
import pyarrow as pa

from evo.errors import BadInput

BATCH_ROWS = 65_536


class SqlError(BadInput):
    """A query DuckDB refused (a write, a file, a syntax error) or one past a limit."""


def limits() -> tuple[float, int]:
    """(seconds, bytes) a query may take and return."""
    return (float(os.environ.get("EVO_SQL_TIMEOUT_S", "60")),
            int(float(os.environ.get("EVO_SQL_MAX_MB", "128")) * (1 << 20)))


def secure(con: duckdb.DuckDBPyConnection) -> None:
    """No file access beyond the database itself, and no setting changed from now on."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def databases(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases() "
                                      "WHERE NOT internal").fetchall()}


def run(cur: duckdb.DuckDBPyConnection, sql: str, *, timeout_s: float | None = None,
        max_bytes: int | None = None, running: set | None = None,
        shape: set[str] | None = None, params: list | None = None) -> bytes:
    """The result of one read-only statement as an Arrow IPC stream (see the module's rules).

    ``cur`` is a cursor of the instance for this query alone (made by the thread that owns the
    connection), so that it can run in a thread beside the connection's other work; it is
    closed at the end. While it runs it is in ``running``, for whoever must interrupt it.
    ``shape``: the databases the instance must have attached after it (default: those it has
    now; the follower gives its own, since queries run side by side). ``params``: the values
    of the statement's ``?`` placeholders."""
    default_timeout, default_bytes = limits()
    timeout_s = default_timeout if timeout_s is None else timeout_s
    max_bytes = default_bytes if max_bytes is None else max_bytes
    try:
        statements = cur.extract_statements(sql)
    except duckdb.Error as exc:
        cur.close()
        raise SqlError(_say(exc)) from exc
    if len(statements) != 1:
        cur.close()
        raise SqlError(f"expected one SQL statement, got {len(statements)}")
    shape = databases(cur) if shape is None else shape
    q, cur = cur.cursor(), cur  # the query's own; ``cur`` keeps what runs around it
    timer = threading.Timer(timeout_s, q.interrupt)
    timer.daemon = True
    rows = 0
    reader = None
    if running is not None:
        running.add(q)
    try:
        q.execute("BEGIN TRANSACTION READ ONLY")
        timer.start()
        try:
            # a relation streams its result; a DB-API result is built whole
            rel = q.sql(sql, params=params or None)
            if rel is None:  # a statement with no result (that DuckDB allowed)
                return _empty()
            reader = rel.to_arrow_reader(BATCH_ROWS)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    if sink.tell() > max_bytes:
                        raise SqlError(
                            f"the result passed {max_bytes / (1 << 20):g} MiB at row {rows:,} "
                            "and was stopped: add a LIMIT or a WHERE, or aggregate "
                            "(the limit is EVO_SQL_MAX_MB where the projection is served)")
            return memoryview(sink.getvalue())  # type: ignore[return-value] # no copy to bytes
        except duckdb.InterruptException:
            raise SqlError(f"the query ran past the {timeout_s:g} s time limit and was stopped "
                           "(EVO_SQL_TIMEOUT_S where the projection is served)") from None
        except duckdb.Error as exc:
            raise SqlError(_say(exc)) from exc
    finally:
        timer.cancel()
        if running is not None:
            running.discard(q)
        if reader is not None:
            reader.close()
        q.close()  # ends its transaction, whatever the statement left open
        _restore(cur, shape)
        cur.close()


def _empty() -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([])):
        pass
    return sink.getvalue().to_pybytes()


def _say(exc: duckdb.Error) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "read-only mode" in text or "attached in read-only mode" in text:
        return f"evo sql is read-only: {text}"
    if isinstance(exc, duckdb.PermissionException):
        return f"evo sql reads only the projections: {text}"
    return f"SQL error: {text}"


def _restore(con: duckdb.DuckDBPyConnection, shape: set[str]) -> None:
    now = databases(con)
    for name in now - shape:
        con.execute(f'DETACH DATABASE IF EXISTS "{name}"')
    for name in shape - now:  # only in-memory databases can be detached by a query
        con.execute(f"ATTACH ':memory:' AS \"{name}\"")
