"""The live part of the page: one thread follows the broker's event relay (evo.Client.follow,
every event once and in order) and hands each event, made small, to every open page's
server-sent-event stream."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

log = logging.getLogger("evo.ui")

KEEP = 1000  # per page: a page that stops reading loses its oldest events, not the server


def brief(ev: Any) -> dict[str, Any]:
    """What a page needs of an event: which job, node and sweep it moves, and its type."""
    return {"seq": ev.seq, "time": ev.time, "type": type(ev).__name__,
            "job_id": getattr(ev, "job_id", None), "node": getattr(ev, "node", None),
            "sweep_id": getattr(ev, "sweep_id", None)}


class Relay:
    def __init__(self, broker: str | None, home: Any = None) -> None:
        self.broker, self.home = broker, home
        self.pages: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop = threading.Event()
        self.head = 0
        self.away = ""  # why the broker cannot be followed now ("" while it is)
        self.thread = threading.Thread(target=self._follow, name="evo-ui-relay", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(KEEP)
        self.pages.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.pages.discard(q)

    def _deliver(self, item: dict[str, Any]) -> None:  # on the event loop
        for q in list(self.pages):
            if q.full():
                q.get_nowait()
            q.put_nowait(item)

    def _follow(self) -> None:
        from evo.client import Client

        while not self.stop.is_set():
            try:
                with Client(self.broker, home=self.home, timeout_s=5) as c:
                    last = c.status().last_seq
                    if not self.head or last < self.head:  # a new log: from its head
                        self.head = last
                    if self.away:
                        log.info("the broker is back at %s", c.address)
                        self.away = ""
                        self._say({"type": "BrokerBack", "seq": self.head})
                    while not self.stop.is_set():  # in rounds, so a stop is seen when quiet
                        for ev in c.follow(self.head + 1, idle_s=0.5,
                                           until=time.monotonic() + 2.0):
                            self.head = ev.seq
                            if self.loop is not None:
                                self.loop.call_soon_threadsafe(self._deliver, brief(ev))
            except Exception as exc:  # noqa: BLE001 - the broker away: try again, say so once
                if not self.away:
                    log.warning("the event relay: %s; trying again every second", exc)
                    self.away = str(exc) or type(exc).__name__
                    self._say({"type": "BrokerAway", "error": self.away})
                self.stop.wait(1.0)

    def _say(self, item: dict[str, Any]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, item)
