"""`evo broker --notify CMD`: a command of the user's, run for the events people want to hear
about (a node lost, a job failed for good, a sweep completed), with the event as JSON on its
stdin. Mail or chat is the command's business; evo knows neither.

The command is an argv (split like a shell would, never run by one), started once the event
is durable, without waiting for it: the broker's loop looks at its children on each pass, a
few run at once and the rest wait their turn, and one that runs past its time is killed. Its
failure is logged; it never touches the log.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from collections import deque

import msgspec

from evo.errors import BadInput
from evo.events.schema import AnyEvent, JobFailed, NodeLost, SweepCompleted

log = logging.getLogger("evo.broker")

AT_ONCE = 4
TIMEOUT_S = 60.0


def wanted(ev: AnyEvent) -> bool:
    return isinstance(ev, (NodeLost, SweepCompleted)) or (isinstance(ev, JobFailed) and ev.final)


def parse_command(text: str) -> list[str]:
    """The argv of ``--notify``; BadInput when it is empty or its program is not found."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise BadInput(f"--notify: {exc}") from None
    if not argv:
        raise BadInput("--notify: expected a command")
    if shutil.which(argv[0]) is None:
        raise BadInput(f"--notify: no program {argv[0]!r} (give a path, or one on PATH)")
    return argv


class Notifier:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.waiting: deque[bytes] = deque()
        self.running: list[tuple[subprocess.Popen, float]] = []
        self.sent = 0

    def events(self, events: list) -> None:
        """Durable events: those wanted are told, in order."""
        for ev in events:
            if wanted(ev):
                self.waiting.append(msgspec.json.encode(ev) + b"\n")
        self.poll()

    def poll(self) -> None:
        now = time.monotonic()
        still = []
        for proc, started in self.running:
            rc = proc.poll()
            if rc is None and now - started > TIMEOUT_S:
                proc.kill()
                rc = proc.wait()
                log.warning("--notify %s ran past %gs: killed", self.argv[0], TIMEOUT_S)
            if rc is None:
                still.append((proc, started))
            elif rc != 0:
                log.warning("--notify %s exited %d", self.argv[0], rc)
        self.running = still
        while self.waiting and len(self.running) < AT_ONCE:
            body = self.waiting.popleft()
            try:
                proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=None, start_new_session=True, close_fds=True)
            except OSError as exc:
                log.warning("--notify %s could not start: %s", self.argv[0], exc)
                continue
            assert proc.stdin is not None
            try:
                os.set_blocking(proc.stdin.fileno(), False)
                proc.stdin.write(body)  # one event is small: the pipe takes it whole
            except (BlockingIOError, BrokenPipeError) as exc:
                log.warning("--notify %s did not take the event: %s", self.argv[0], exc)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            self.running.append((proc, time.monotonic()))
            self.sent += 1

    def close(self) -> None:
        for proc, _ in self.running:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
