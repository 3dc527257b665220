"""EVO_HOME and how every command finds the broker.

EVO_HOME (default ``./.evo``, like ``.git``) holds the event log (``log/``), the projections
(``evo.duckdb``), job output (``logs/``) and ``broker.json`` (address and pid of the running
broker). A command finds the broker from ``--broker``, then ``EVO_BROKER``, then
``EVO_HOME/broker.json``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from evo.errors import EvoError


class NoBroker(EvoError):
    """Raised when no broker address is given and none is recorded in EVO_HOME."""


def evo_home(home: str | os.PathLike[str] | None = None) -> Path:
    return Path(home or os.environ.get("EVO_HOME") or ".evo").absolute()


HOME_MARK = ".evo-home"  # in every home a broker or node uses: never a job's code (content.py)


def mark_home(home: Path) -> None:
    """Say that ``home`` is evo's (whatever its name), so that a job's files never include it."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        mark = home / HOME_MARK
        if not mark.exists():
            mark.write_text("evo's home: the log, the store, caches. Not a job's code.\n")
    except OSError:
        pass  # a read-only home: the bound and .evoignore still apply


def broker_file(home: Path) -> Path:
    return home / "broker.json"


def write_broker_file(home: Path, info: dict) -> None:
    """Atomic replace, so a reader never sees half a file."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = broker_file(home).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, broker_file(home))


def read_broker_file(home: Path) -> dict | None:
    try:
        return json.loads(broker_file(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def find_broker(explicit: str | None = None, home: Path | None = None) -> str:
    if explicit:
        return normalize_address(explicit)
    env = os.environ.get("EVO_BROKER")
    if env:
        return normalize_address(env)
    home = home or evo_home()
    info = read_broker_file(home)
    gone = ""
    if info and info.get("address"):
        if not broker_gone(info):
            return str(info["address"])
        gone = f"; the broker {broker_file(home)} names (pid {info['pid']}) is gone"
    raise NoBroker(
        f"no broker: pass --broker ADDR, set EVO_BROKER, or start one with `evo broker` "
        f"or `evo up` (looked for {broker_file(home)}{gone})"
    )


def broker_gone(info: dict) -> bool:
    """True when the broker a broker.json names was on this machine and its process is gone
    (killed, so it could not remove the file): commands read the files instead of waiting."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("hostname", socket.gethostname()) != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def normalize_address(addr: str) -> str:
    """Accept ``host:port`` as shorthand for ``tcp://host:port``."""
    return addr if "://" in addr else f"tcp://{addr}"


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8 or ::1 (and for ipc/inproc, which never leave)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
