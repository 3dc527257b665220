"""The node's side of warm workers: spawn, hand out per device set, replace when one dies.

A worker is busy with at most one task. Idle workers are kept per CUDA device set (CUDA reads
CUDA_VISIBLE_DEVICES once per process); when more are idle than the node has slots, the
longest-idle one retires. A worker that dies or is killed (cancel) is dropped, and the next job
that needs one gets a fresh process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from .worker import AnyWorkerMessage, FrameReader, Reported, Task, TaskDone, WorkerReady, write_frame

STREAMS = ("stdout", "stderr", "reports")
# Native thread pools (OpenMP, BLAS) size themselves to the machine's cores unless told, so
# two one-CPU jobs on a 2-core node would each run 2 threads and slow each other down.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

_enc, _dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(AnyWorkerMessage)
MAX_REPLY = 256 << 20  # a TaskDone longer than this is a worker gone wrong, not a result


STOP_SIGNAL = signal.SIGUSR1
STOP_MARK = "stop"  # in the worker's folder: the lease epoch of the task to stop


class Worker:
    """One warm worker process and its folder: the default working directory of its tasks and
    the files that capture them (stdout, stderr, reports; a task owns a byte range of each)."""

    def __init__(self, devices: tuple[int, ...], folder: Path,
                 visible: dict[str, str] | None = None) -> None:
        self.devices = devices
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = {s: folder / s for s in STREAMS}
        for path in self.paths.values():
            path.write_bytes(b"")  # a name reused after a node restart starts empty
        self.ends = [0, 0, 0]  # where the last task's output ended, per stream
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   **(visible or {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}))
        for var in THREAD_VARS:  # one thread per task unless it asked for more CPUs
            env.setdefault(var, "1")
        with open(folder / "worker.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evo.nodes.worker", str(self.paths["stdout"]),
                 str(self.paths["stderr"])], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self._frames = FrameReader(self.fd, MAX_REPLY)
        self.error = ""  # why its answers could not be read, when they could not
        self.ready = False
        self.reported = False  # its task wrote a report since the node last looked
        self.tasks = 0
        self.idle_since = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, task: Task) -> None:
        assert self.proc.stdin is not None
        write_frame(self.proc.stdin.fileno(), _enc.encode(task))
        self.tasks += 1

    def replies(self) -> list[TaskDone] | None:
        """Complete answers read so far without blocking; None once the worker is gone (or
        has written something that is not an answer: it is then killed)."""
        try:
            frames, eof = self._frames.read()
            msgs = [_dec.decode(f) for f in frames]
        except (ValueError, msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            self._garbled(str(exc))
            return None
        out = []
        for msg in msgs:
            if isinstance(msg, WorkerReady):
                self.ready = True
            elif isinstance(msg, Reported):
                self.reported = True
            else:
                out.append(msg)
        if eof and not out:
            return None
        return out

    def _garbled(self, what: str) -> None:
        """The pipe carried something else than answers (a job can write to any descriptor):
        the worker cannot be trusted with another task."""
        self.error = f"warm worker {self.pid} wrote {what} on its answer pipe"
        self.kill()
        self._frames.buf.clear()
        return None

    def stop(self, lease_epoch: int) -> None:
        """Ask the task of this lease to stop (a cancel, a pruned trial) and keep the worker:
        the mark names the task, so a signal that comes late stops nothing else."""
        (self.folder / STOP_MARK).write_text(str(lease_epoch))
        try:
            os.kill(self.proc.pid, STOP_SIGNAL)
        except ProcessLookupError:
            pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def close(self) -> None:
        """Retire: closing its stdin ends its loop; the group is killed if it lingers."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        for path in self.paths.values():  # already read and shipped by the runs that used it
            path.unlink(missing_ok=True)


class WorkerPool:
    def __init__(self, root: Path, keep_idle: int,
                 visible: Callable[[tuple[int, ...]], dict[str, str]] | None = None) -> None:
        self.root = root
        self.visible = visible  # devices -> the variables that make a worker see them
        root.mkdir(parents=True, exist_ok=True)
        self.keep_idle = keep_idle
        self.idle: list[Worker] = []
        self.spawned = 0

    def _spawn(self, devices: tuple[int, ...]) -> Worker:
        self.spawned += 1
        return Worker(devices, self.root / f"w{self.spawned}",
                      self.visible(devices) if self.visible is not None else None)

    def warm(self, n: int) -> None:
        """Start n CPU workers ahead of the first jobs, so they pay the imports while idle."""
        while len(self.idle) < n:
            self.idle.append(self._spawn(()))

    def take(self, devices: tuple[int, ...]) -> Worker:
        for i, w in enumerate(self.idle):
            if w.devices == devices and w.exit_code() is None:
                return self.idle.pop(i)
        return self._spawn(devices)

    def give_back(self, w: Worker) -> None:
        if w.exit_code() is not None:
            return
        w.idle_since = time.monotonic()
        self.idle.append(w)
        while len(self.idle) > self.keep_idle:
            self.idle.sort(key=lambda x: x.idle_since)
            self.idle.pop(0).close()

    def close(self) -> None:
        for w in self.idle:
            w.close()
        self.idle = []
