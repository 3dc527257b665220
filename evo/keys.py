"""CURVE keys: the broker's key pair, the keys it authorizes, and the one file a machine needs.

``evo keys init`` makes EVO_HOME/keys/: ``broker.json`` (the broker's key pair),
``authorized/NAME.json`` (the public key of each client or node allowed in), ``revoked/``
(keys taken back) and ``local.json``, the key this machine's own commands use. ``evo keys
issue NAME`` makes a key pair for NAME, authorizes its public key, and writes one file to copy
to that machine: its name, its key pair and the broker's public key (mode 0600). A node's
name is its key's name: a key cannot act as another node.

With keys, every socket of the broker uses ZeroMQ's CURVE (through pyzmq's zmq.auth); a peer
with no key, an unknown key or a revoked one is refused, and the broker checks the sender's key
on every message, so a key revoked while its peer is connected stops working at once. Without
keys the broker binds loopback only: the zero-setup default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from evo.errors import BadInput
from evo.home import broker_gone, read_broker_file

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOCAL = "local"  # the key of the broker machine's own commands


@dataclass(frozen=True)
class Key:
    """A peer's key file: who it is, its key pair, and the broker it may talk to."""

    name: str
    public: bytes
    secret: bytes
    broker_public: bytes


def keys_dir(home: Path) -> Path:
    return home / "keys"


def has_keys(home: Path) -> bool:
    return (keys_dir(home) / "broker.json").is_file()


def _write_private(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a leftover's mode (or a link) is never reused
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{what}: no such key file {path}") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{what}: {path} is not an evo key file ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what}: {path} is not an evo key file")
    return data


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise BadInput(f"key name {name!r}: expected letters, digits, '.', '_' or '-' "
                       "(at most 64, starting with a letter or digit)")


def broker_pair(home: Path) -> tuple[bytes, bytes]:
    """The broker's (public, secret) key."""
    data = _read(keys_dir(home) / "broker.json", "the broker's keys")
    return data["public"].encode(), data["secret"].encode()


def init(home: Path) -> Path:
    """Make the broker's key pair and this machine's own key; refuse when keys exist."""
    import zmq

    d = keys_dir(home)
    if has_keys(home):
        raise BadInput(f"keys already exist in {d} (`evo keys list` shows them)")
    public, secret = zmq.curve_keypair()
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    (d / "revoked").mkdir(exist_ok=True)
    _write_private(d / "broker.json", {"public": public.decode(), "secret": secret.decode()})
    issue(home, LOCAL, d / "local.json")
    return d


def issue(home: Path, name: str, out: Path | None = None) -> Path:
    """A key pair for ``name``, authorized; the one file for that machine (default
    ``NAME.key`` here). Refuses a name that is authorized already."""
    import zmq

    _check_name(name)
    d = keys_dir(home)
    if not has_keys(home):
        raise BadInput(f"no keys in {d}: run `evo keys init` first")
    if (d / "authorized" / f"{name}.json").exists():
        raise BadInput(f"key {name!r} exists already (`evo keys revoke {name}` first)")
    broker_public, _ = broker_pair(home)
    public, secret = zmq.curve_keypair()
    out = (out or Path(f"{name}.key")).absolute()
    if out.exists():
        raise BadInput(f"{out} exists: give another --out (a key file is never overwritten)")
    _write_private(out, {"evo_key": 1, "name": name, "public": public.decode(),
                         "secret": secret.decode(), "broker_public": broker_public.decode()})
    _write_private(d / "authorized" / f"{name}.json", {"name": name, "public": public.decode()})
    (d / "revoked" / f"{name}.json").unlink(missing_ok=True)
    return out


def revoke(home: Path, name: str) -> None:
    d = keys_dir(home)
    src = d / "authorized" / f"{name}.json"
    if not src.exists():
        known = ", ".join(sorted(p.stem for p in (d / "authorized").glob("*.json"))) or "none"
        raise BadInput(f"no authorized key {name!r} (authorized: {known})")
    (d / "revoked").mkdir(exist_ok=True)
    os.replace(src, d / "revoked" / f"{name}.json")


def listing(home: Path) -> list[tuple[str, str, str]]:
    """(name, 'authorized' or 'revoked', public key) of every key issued."""
    d = keys_dir(home)
    out = []
    for state in ("authorized", "revoked"):
        for path in sorted((d / state).glob("*.json")):
            out.append((path.stem, state, str(_read(path, "a key").get("public", ""))))
    return out


def authorized(home: Path) -> dict[bytes, str]:
    """public key (z85) -> name, of the keys allowed in now."""
    out = {}
    for path in (keys_dir(home) / "authorized").glob("*.json"):
        try:
            data = json.loads(path.read_text())
            out[data["public"].encode()] = data["name"]
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # half written, or not ours: not a key
    return out


def load_key(path: str | os.PathLike[str]) -> Key:
    """A key file written by ``evo keys issue``; BadInput naming the file otherwise."""
    path = Path(path).expanduser()
    data = _read(path, "--key-file")
    try:
        return Key(name=str(data["name"]), public=data["public"].encode(),
                   secret=data["secret"].encode(), broker_public=data["broker_public"].encode())
    except (KeyError, AttributeError):
        raise BadInput(f"--key-file: {path} is not an evo key file (expected name, public, secret "
                       "and broker_public)") from None


def find_key(explicit: str | os.PathLike[str] | None, home: Path | None) -> Key | None:
    """The key to connect with: ``--key-file``, else EVO_KEY, else this machine's own key when
    the broker's home has keys, else none (loopback without keys)."""
    if explicit:
        return load_key(explicit)
    env = os.environ.get("EVO_KEY")
    if env:
        return load_key(env)
    if home is not None and (keys_dir(home) / "local.json").is_file():
        info = read_broker_file(home) or {}
        if info.get("keys") is False and not broker_gone(info):
            return None  # a broker started before `evo keys init`: it runs without keys
        return load_key(keys_dir(home) / "local.json")
    return None
