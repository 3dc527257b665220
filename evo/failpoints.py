"""Named failpoints, for the fault suite: a crash or an I/O error at a chosen place.

    EVO_FAILPOINT="log.after_write=crash@40"     kill -9 of this process at the 40th hit
    EVO_FAILPOINT="log.fsync=EIO@3-5"            OSError(EIO) at hits 3, 4 and 5
    EVO_FAILPOINT="log.write=ENOSPC@2-,apply=crash"   from the 2nd hit on; several at once

The places (``hit(name)`` in the code): ``log.write`` and ``log.fsync`` (an append's write and
its fdatasync), ``log.after_write`` (written, not yet synced), ``log.rotate`` (a new segment
made, the directory not yet synced), ``broker.before_ack`` (a batch durable, nothing yet
acknowledged) and ``projection.apply`` (a projection batch staged, not yet committed).
``crash`` is SIGKILL of the process itself: nothing is flushed, no handler runs. Tests that run
a broker in their own process use ``arm()`` and ``disarm()`` instead of the variable. With no
failpoint armed, ``hit`` is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_armed: dict[str, tuple[str, int, int | None]] = {}  # name -> (action, first hit, last hit)
_hits: dict[str, int] = {}


def arm(name: str, action: str, first: int = 1, last: int | None = -1) -> None:
    """Fire ``action`` at hits first..last of ``name`` (last=None: every hit from first on;
    -1: only the first)."""
    if action != "crash" and not hasattr(errno, action):
        raise ValueError(f"failpoint {name}: unknown action {action!r} (crash or an errno name)")
    _armed[name] = (action, first, first if last == -1 else last)
    _hits[name] = 0


def disarm(name: str | None = None) -> None:
    if name is None:
        _armed.clear()
        _hits.clear()
    else:
        _armed.pop(name, None)
        _hits.pop(name, None)


def parse(text: str) -> None:
    """Arm what ``EVO_FAILPOINT`` says (see the module docstring)."""
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, rest = item.partition("=")
        action, _, when = rest.partition("@")
        first, last = 1, -1
        last_hit: int | None = last
        if when:
            lo, dash, hi = when.partition("-")
            first = int(lo)
            last_hit = (int(hi) if hi else None) if dash else -1
        arm(name, action or "crash", first, last_hit)


def hit(name: str) -> None:
    if not _armed:
        return
    spec = _armed.get(name)
    if spec is None:
        return
    n = _hits[name] = _hits[name] + 1
    action, first, last = spec
    if n < first or (last is not None and n > last):
        return
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, action)
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})")


parse(os.environ.get("EVO_FAILPOINT", ""))
