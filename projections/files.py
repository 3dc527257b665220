"""The projection file, ``EVO_HOME/evo.duckdb``: opened caught up to the log (for the broker's
follower, broker/follower.py), or read-only for users' SQL when no broker runs; and the Arrow
IPC streams answers travel in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any


from .schema import VERSION

if TYPE_CHECKING:  # DuckDB and Arrow are imported when used: a client reading an answer
    import pyarrow as pa  # needs Arrow alone, and a command that reads none needs neither

    from .store import Projection

log = logging.getLogger("evo.projections")


def open_projection(home: Path, upto: int | None = None, path: Path | str | None = None
                    ) -> Projection:
    """``EVO_HOME/evo.duckdb`` (or ``path``) caught up from the log (rebuilt if it cannot be
    trusted)."""
    from .store import Projection

    path = path or home / "evo.duckdb"
    proj = Projection(path)
    try:
        from evo.events.log import SegmentLog  # not for json_cell's users (the CLI)

        with SegmentLog(home / "log", readonly=True) as lg:
            head = lg.last_seq if upto is None else min(upto, lg.last_seq)
            if proj.version != VERSION or proj.last_seq > head:
                log.warning("rebuilding %s (schema version %s, last seq %d, log head %d)", path,
                            proj.version, proj.last_seq, head)
                proj.close()
                for f in (Path(path), Path(str(path) + ".wal")):
                    f.unlink(missing_ok=True)
                proj = Projection(path)
            proj.catch_up(raw for seq, raw in lg.read_raw_from(proj.last_seq + 1) if seq <= head)
    except BaseException:
        proj.close()  # an instance left open would keep the file from opening otherwise
        raise
    return proj


def read_projection(home: Path) -> Projection:
    """The projection for users' SQL without a broker: caught up from the log if it is behind,
    then opened read-only and secured (see projections/sql.py)."""
    from . import sql
    from .store import Projection

    path = home / "evo.duckdb"
    from evo.events.log import SegmentLog

    with SegmentLog(home / "log", readonly=True) as lg:
        head = lg.last_seq
    if path.exists():
        proj = Projection(path, read_only=True)
        if proj.version == VERSION and proj.last_seq == head:
            sql.secure(proj.con)
            return proj
        proj.close()
    open_projection(home).close()
    proj = Projection(path, read_only=True)
    sql.secure(proj.con)
    return proj


def json_cell(value: Any, empty: Any = None) -> Any:
    """A JSON column's value as Python: the projections hand JSON back as text. Text that is not
    JSON is returned as it is; a missing value (NULL) as ``empty``."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return empty if value is None else value


def to_ipc(table: pa.Table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    import pyarrow.ipc

    return pyarrow.ipc.open_stream(data).read_all()
