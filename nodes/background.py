"""A thread beside the node's loop for work that waits on the broker's store (staging a
lease's files, sending a checkpoint home), so that the loop's heartbeats never wait for it.

Work goes in with ``put``; results come out of ``ready()``, and ``fd`` becomes readable when
there are some, so the daemon waits on it with its other sockets. The thread has its own
client (ZeroMQ sockets belong to one thread); a call to the broker is tried again over a
minute while the broker is away.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("evo.node")

RETRY_FOR_S = 60.0


class StoreFailed(Exception):
    """The store cannot give (or take) a file; ``retryable``: the same could work later."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Background:
    name = "evo-background"

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect  # -> an evo.Client, made in the thread that uses it
        self._client: Any = None
        self._todo: queue.Queue[Any] = queue.Queue()
        self._done: list[Any] = []
        self._lock = threading.Lock()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._thread: threading.Thread | None = None

    @property
    def fd(self) -> int:
        return self._rfd

    def put(self, item: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._todo.put(item)

    def ready(self) -> list[Any]:
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        self._todo.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._client is not None:
            self._client.close()
            self._client = None
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _work(self, item: Any) -> Any:  # what the thread does with one item: its result
        raise NotImplementedError

    def _failed(self, item: Any, why: str) -> Any:  # the result of an item whose work raised
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            try:
                result = self._work(item)
            except Exception as exc:  # noqa: BLE001 - the thread must live: the item failed
                log.exception("%s: %r failed", self.name, item)
                result = self._failed(item, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._done.append(result)
            try:
                os.write(self._wfd, b"x")
            except OSError:
                return

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, tried again with a back-off while the broker is away."""
        from evo.client import BrokerUnavailable, CommandRejected
        from evo.errors import EvoError
        from evo.home import NoBroker

        delay, deadline = 0.5, time.monotonic() + RETRY_FOR_S
        while True:
            try:
                if self._client is None:
                    self._client = self._connect()
                return fn(self._client)
            except CommandRejected as exc:
                if exc.code != "unavailable":
                    raise StoreFailed(f"the broker's store: {exc}", retryable=False) from None
                why = str(exc)
            except (BrokerUnavailable, NoBroker, EvoError, OSError) as exc:
                why = str(exc)
            client, self._client = self._client, None
            if client is not None:
                client.close()
            if time.monotonic() + delay > deadline:
                raise StoreFailed(f"could not {what}: {why}")
            time.sleep(delay)  # a back-off between tries, in this thread only
            delay = min(delay * 2, 8.0)
