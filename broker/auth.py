"""The broker's CURVE gate: the authenticator, the keys of its sockets, and the check of the
sender's key on every message (evo/keys.py says where keys live).

The authenticator (pyzmq's ThreadAuthenticator) is running before any socket binds; it lets
in only authorized public keys and names each connection by its public key (ZeroMQ's
User-Id, carried by every message; the key, not its name, so a name revoked and issued again
does not let the old key back in). Every command, query and read is checked again against
the keys authorized now, so a key revoked while its peer is connected is refused from its next
message; the event relay (a PUB socket, which cannot refuse one subscriber) is bound again on
its port when a key is revoked, so every subscriber shakes hands again and a revoked one is
left out. A node's commands must name the node its key is for (the broker machine's own key,
``local``, may run nodes of any name).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from evo.broker import protocol as p
from evo.keys import LOCAL, authorized, broker_pair, keys_dir

log = logging.getLogger("evo.broker")

# Commands that speak for a node: their `node` must be the key's name.
NODE_COMMANDS = (p.Join, p.Ready, p.Heartbeat, p.Report, p.Leave, p.Output)


class _Authenticator(ThreadAuthenticator):
    def __init__(self, ctx: zmq.Context, gate: Gate) -> None:
        super().__init__(ctx)
        self.gate = gate

    def curve_user_id(self, client_public_key: bytes) -> str:
        # the key itself, not its name: a name revoked and issued again has a new key
        return z85.encode(client_public_key).decode()


class Gate:
    def __init__(self, ctx: zmq.Context, home: Path) -> None:
        self.home = home
        self.public, self.secret = broker_pair(home)
        self.names: dict[bytes, str] = authorized(home)
        self._revoked: dict[bytes, str] = {}  # to name a revoked key in its refusal
        self._stamp = self._mtime()
        self.auth = _Authenticator(ctx, self)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:  # the authenticator's question
        return key in self.names

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server with the broker's key (before it binds)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def _mtime(self) -> tuple[int, int]:
        d = keys_dir(self.home)
        try:
            return (os.stat(d / "authorized").st_mtime_ns, os.stat(d / "revoked").st_mtime_ns)
        except OSError:
            return (0, 0)

    def refresh(self) -> bool:
        """Read the authorized keys again if they changed; True when a key was taken away."""
        stamp = self._mtime()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        names = authorized(self.home)
        gone = set(self.names) - set(names)
        self._revoked.update({k: self.names[k] for k in gone})
        self.names = names
        if gone:
            log.warning("key(s) revoked: connections with them are refused from now on")
        return bool(gone)

    def refusal(self, user: str, cmd: p.Command | None) -> str | None:
        """Why a message from ``user`` (its sender's public key) is refused, or None."""
        name = self.names.get(user.encode())
        if name is None:
            known = self._revoked.get(user.encode())
            return (f"key {known or user[:8] + '...'} is not authorized "
                    "(revoked or never issued)")
        if isinstance(cmd, NODE_COMMANDS) and cmd.node != name and name != LOCAL:
            return f"key {name!r} cannot act as node {cmd.node!r}: a node's name is its key's"
        return None

    def close(self) -> None:
        self.auth.stop()
