"""The projection file, ``EVO_HOME/evo.duckdb``: opened caught up to the log (for the broker's
follower, broker/follower.py), or read-only for users' SQL when no broker runs; and the Arrow
IPC streams answers travel in.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any


from .schema import VERSION

if TYPE_CHECKING:  # DuckDB and Arrow are imported when used: a client reading an answer
    import pyarrow as pa  # needs Arrow alone, and a command that reads none needs neither

    from .store import Projection

log = logging.getLogger("evo.projections")
# A file this many events behind the log is caught up by a process of its own: a bulk load's
# memory (DuckDB's and Arrow's, kept by their allocators once freed) then goes back to the
# system when it ends, instead of staying in the broker for its lifetime (1,000,000 events:
# the broker's RSS 713 MB after the catch-up in its own process; 100,000: 383 MB).
APART = 50_000


def open_projection(home: Path, upto: int | None = None, path: Path | str | None = None,
                    apart: bool = True, stop: threading.Event | None = None) -> Projection:
    """``EVO_HOME/evo.duckdb`` (or ``path``) caught up from the log (rebuilt if it cannot be
    trusted); by a child process when it is APART behind, unless not ``apart``; ``stop``,
    once set, ends that child (and the open, with an error)."""
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
            if apart and head - proj.last_seq >= APART and str(path) != ":memory:":
                proj.close()
                _catch_up_apart(home, Path(path), head, stop)
                proj = Projection(path)
            proj.catch_up(raw for seq, raw in lg.read_raw_from(proj.last_seq + 1) if seq <= head)
    except BaseException:
        proj.close()  # an instance left open would keep the file from opening otherwise
        raise
    return proj


# The child: in a session of its own (a Ctrl-C to the broker's terminal is the broker's to
# handle), and killed with the thread that started it (Linux's parent-death signal), so that
# a broker that dies leaves no process holding the file; a batch cut short is rolled back at
# the next open.
_CHILD = """
import os, sys
if sys.platform == "linux":
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[4]):  # the parent died before that
        sys.exit("the broker has gone")
from pathlib import Path
from evo.projections.files import open_projection
open_projection(Path(sys.argv[1]), int(sys.argv[3]), Path(sys.argv[2]), apart=False).close()
"""


def _catch_up_apart(home: Path, path: Path, head: int, stop: threading.Event | None) -> None:
    """``path`` caught up to ``head`` by a child process (see APART). Each of its batches
    commits on its own, so a child that fails or is stopped leaves the file at its last whole
    batch."""
    with tempfile.TemporaryFile() as err:  # not a pipe: a chatty child never blocks on it
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(home), str(path), str(head), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True)
        while True:
            if stop is not None and stop.is_set():
                child.kill()
                child.wait()
                raise RuntimeError(f"catching {path} up to seq {head}: stopped")
            try:
                rc = child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                continue
        if rc != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines() or [
                f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"]
            raise RuntimeError(f"catching {path} up to seq {head} failed: {lines[-1]}")


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
