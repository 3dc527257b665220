"""A node's requests to the broker, pipelined, and the broker's answers as the core's events.

Reports, heartbeats, output chunks and one outstanding Ready travel without waiting for each
other; each reply is matched to its request by number and becomes an event for the node's core
(core.py). The daemon and the tests' fake node both talk to the broker through this.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from evo.broker import protocol as p
from evo.client import Client

from . import core as c

OnReply = Callable[[p.Reply], "c.Event | None"]


class Reconnect(Exception):
    """The broker went away or forgot us: join again."""


class KeyRefused(Exception):
    """The broker refuses this node's key (revoked, or not this node's): the node stops."""


class Link:
    def __init__(self, client: Client, node: str,
                 sample: Callable[[], tuple[dict, list]] = lambda: ({}, [])) -> None:
        self.client, self.node, self.sample = client, node, sample
        self.pending: dict[int, tuple[OnReply, float]] = {}

    def send(self, cmd: p.Command, on_reply: OnReply = lambda reply: None,
             wait_s: float = 0.0) -> int:
        req = self.client.send(cmd)
        self.pending[req] = (on_reply, time.monotonic() + wait_s + self.client.timeout_s)
        return req

    def carry(self, ins: c.Instruction) -> bool:
        """Send what a Send* instruction says; False for any other instruction."""
        if isinstance(ins, c.SendReport):
            cmd = ins.cmd
            self.send(cmd, lambda reply: c.Answered(cmd, reply.code, reply.message)
                      if isinstance(reply, p.Error) else c.Answered(cmd, stop=_stop(reply)))
        elif isinstance(ins, c.SendReady):
            self.send(p.Ready(node=self.node, max_leases=ins.max_leases, wait_s=ins.wait_s,
                              ahead=ins.ahead), _leased, ins.wait_s)
        elif isinstance(ins, c.SendHeartbeat):
            util, gpus = self.sample() if ins.sample else ({}, [])
            self.send(p.Heartbeat(node=self.node, running=list(ins.running), util=util,
                                  gpus=gpus), _beat)
        else:
            return False
        return True

    def events(self) -> list[c.Event]:
        """The events of every reply that has arrived; Reconnect when the broker is gone."""
        out = []
        for reply in self.client.replies():
            entry = self.pending.pop(reply.req, None)
            if entry is None:
                continue  # the answer to a request given up on
            if isinstance(reply, p.Error) and reply.code == "rejoin":
                raise Reconnect(reply.message)
            if isinstance(reply, p.Error) and reply.code == "unauthorized":
                raise KeyRefused(reply.message)
            ev = entry[0](reply)
            if ev is not None:
                out.append(ev)
        if self.pending:
            now = time.monotonic()
            if any(deadline < now for _, deadline in self.pending.values()):
                raise Reconnect(f"no answer from the broker at {self.client.address}")
        return out

    def join(self, join: p.Join) -> c.Joined:
        """Join (waiting for the answer): the core's Joined. Raises as Client.request does."""
        self.pending.clear()
        reply = self.client.request(join)
        assert isinstance(reply, p.Leases)
        return c.Joined(tuple(reply.cancel))


def _stop(reply: p.Reply) -> str:
    """Why the broker wants the job stopped, told in its answer to a report ("" to go on)."""
    stop = reply.data.get("stop", "") if isinstance(reply, p.Ok) else ""
    return stop if isinstance(stop, str) else ""


def _leased(reply: p.Reply) -> c.Event:
    if isinstance(reply, p.Leases):
        return c.Leased(tuple(reply.leases), tuple(reply.cancel))
    return c.Leased()


def _beat(reply: p.Reply) -> c.Event | None:
    return c.Beat(tuple(reply.cancel)) if isinstance(reply, p.Leases) else None
