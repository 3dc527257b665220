"""Run `evo` with its syncs traced, for the power-loss check:

    python tests/fsync_tracer.py TRACE [evo arguments...]

Every os.fsync and os.fdatasync that returns is appended to TRACE as ``path<TAB>size``: what a
power loss could not take away. It wraps the OS calls, outside evo's own code, so a sync that
evo skips (``--no-sync``) or only believes it made shows up as missing.
"""

from __future__ import annotations

import os
import runpy
import sys

_trace = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_fsync, _fdatasync = os.fsync, os.fdatasync


def _record(fd) -> None:  # noqa: ANN001
    fd = fd if isinstance(fd, int) else fd.fileno()
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
    except OSError:
        return
    os.write(_trace, f"{path}\t{size}\n".encode())


def fsync(fd) -> None:  # noqa: ANN001
    _fsync(fd)
    _record(fd)


def fdatasync(fd) -> None:  # noqa: ANN001
    _fdatasync(fd)
    _record(fd)


os.fsync, os.fdatasync = fsync, fdatasync
sys.argv = ["evo", *sys.argv[2:]]
runpy.run_module("evo.cli.app", run_name="__main__")
