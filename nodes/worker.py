"""A warm worker: a long-lived process that runs callable jobs one after another.

The node starts one per slot with ``python -m evo.nodes.worker OUT ERR``. It imports the heavy
libraries once (numpy, scikit-learn, xgboost: whatever of EVO_WORKER_PRELOAD is installed), then
reads tasks from its stdin and answers on its stdout, each message a 4-byte big-endian length
and a msgpack map, typed below (Task in; WorkerReady, then one TaskDone per task, out). While a task runs, file descriptors 1 and 2 point at the worker's own OUT and
ERR files, so a job's prints and C-level output are captured as a fresh process's would be;
between tasks they point at the worker's log. The worker runs one task at a time, so what a
task wrote is the byte range of each file between the previous reply's ends and its own: each
reply carries the ends (stdout, stderr, reports), and a task makes no files or folders of its
own, which keeps a no-op trial off the disk.

A task sets the job's EVO_* variables and working directory (first on ``sys.path``) for its
duration and seeds ``random`` and numpy when the job has a seed. What it imported of the job's
own code is forgotten after it, so every task runs the code as it is on disk now; the standard
library, installed packages and evo stay imported (that is what the worker is warm for). CUDA_VISIBLE_DEVICES is fixed when the worker
starts, because CUDA reads it once per process: the node keeps workers per device set.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import signal
import struct
import sys
import sysconfig
import threading
import time
import traceback

from typing import Any, Union

import msgspec

from evo.job import Stopped

_LEN = struct.Struct(">I")
DEFAULT_PRELOAD = "numpy,sklearn,xgboost"


class Task(msgspec.Struct, frozen=True, kw_only=True):
    callable: str
    params: dict[str, Any] = {}
    seed: int | None = None
    cwd: str
    env: dict[str, str] = {}
    threads: int = 1


class WorkerMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="msg"):
    pass


class WorkerReady(WorkerMessage, frozen=True, tag="ready"):
    pid: int


class TaskDone(WorkerMessage, frozen=True, tag="done"):
    ok: bool
    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    exit_code: int | None = None
    error: str = ""
    ends: tuple[int, int, int] = (0, 0, 0)  # the stdout, stderr and report files' sizes


class Reported(WorkerMessage, frozen=True, tag="reported"):
    """The running task wrote a report: the node reads its report file now."""


AnyWorkerMessage = Union[WorkerReady, TaskDone, Reported]
NOTIFY_EVERY_S = 0.02  # at most this often: a job that reports in a tight loop costs no more


def read_frame(fd: int) -> bytes | None:
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, _LEN.unpack(head)[0])
    return body


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class FrameReader:
    """The frames of a non-blocking descriptor (4-byte length, payload), as they come."""

    def __init__(self, fd: int, limit: int = 256 << 20) -> None:
        self.fd, self.limit = fd, limit
        self.buf = bytearray()

    def read(self) -> tuple[list[bytes], bool]:
        """(the complete payloads read so far, whether the other end has closed). Raises
        ValueError for a length over ``limit``: what comes is not frames."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            n = _LEN.unpack_from(self.buf)[0]
            if n > self.limit:
                raise ValueError(f"a {n}-byte message")
            if len(self.buf) < 4 + n:
                break
            out.append(bytes(self.buf[4:4 + n]))
            del self.buf[:4 + n]
        return out, eof


def write_frame(fd: int, payload: bytes) -> None:
    data = _LEN.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def split_result(result: object) -> tuple[dict[str, float], dict[str, str]]:
    """A callable's returned dict as (metrics: its numbers, artifacts: everything else)."""
    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    if isinstance(result, dict):
        for k, v in result.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[str(k)] = float(v)
            else:
                artifacts[str(k)] = str(v)
    return metrics, artifacts


def resolve(target: str):  # noqa: ANN201 - any callable
    module, _, func = target.partition(":")
    fn = importlib.import_module(module)
    for part in func.split("."):
        fn = getattr(fn, part)
    return fn


def seed_everything(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (2**32))


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


def _report_size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except FileNotFoundError:
        return 0


def _thread_limit(threads: int):  # noqa: ANN202 - a context manager
    """The worker starts with one thread per native pool; a task given more CPUs gets as many."""
    if threads == 1:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


_KEPT_ROOTS = tuple(os.path.realpath(p) for p in {
    sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _is_users(module: object) -> bool:
    """A module of the job's own code: neither the standard library, nor an installed
    package, nor evo itself (those are what a warm worker keeps warm)."""
    path = getattr(module, "__file__", None)
    if not path or getattr(module, "__name__", "").split(".")[0] == "evo":
        return False
    return not os.path.realpath(path).startswith(_KEPT_ROOTS)


def forget_users_modules(before: set[str]) -> None:
    """Drop from sys.modules the job's own modules a task imported, so the next task imports
    them anew from disk (an edited train.py runs as edited; third-party imports stay warm)."""
    for name in set(sys.modules) - before:
        if _is_users(sys.modules.get(name)):
            del sys.modules[name]
    importlib.invalidate_caches()


_stoppable: Task | None = None  # the task a stop request may concern, while its code runs
_stopping: Task | None = None  # the task evo asked to stop
_STOP_MARK = ""


def _on_stop(signum: int, frame: object) -> None:
    """The node asks the running task to stop (cancelled, or pruned by its sweep). Only noted
    here: the task raises evo.job.Stopped at its next report or stop check (evo.job), a safe
    point of its own code, and the worker stays warm. The mark must name this task's lease,
    so a request that arrives after its task ended concerns nothing."""
    global _stopping
    task = _stoppable
    if task is None:
        return
    try:
        with open(_STOP_MARK) as f:
            mark = f.read().strip()
    except OSError:
        return
    if mark and mark == task.env.get("EVO_LEASE_EPOCH"):
        _stopping = task


def _stop_asked() -> bool:
    return _stopping is not None and _stopping is _stoppable


def run_task(task: Task, out_fd: int, err_fd: int) -> TaskDone:
    """Run one task with fds 1/2 on the worker's output files; never raises."""
    saved_cwd = os.getcwd()
    # Only the job's own variables are set and restored: copying the whole environment costs
    # more than a short trial. Other changes a job makes to os.environ stay in this worker
    # (``isolate: true`` gives a job a process of its own).
    saved_env = {k: os.environ.get(k) for k in task.env}
    sys.stdout.flush()
    sys.stderr.flush()
    keep_out, keep_err = os.dup(1), os.dup(2)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    done: dict = {"ok": False}
    sys.path.insert(0, task.cwd)  # the job's own modules are imported from its folder
    before = set(sys.modules)
    global _stoppable
    try:
        os.environ.update(task.env)
        os.chdir(task.cwd)
        seed_everything(task.seed)
        with _thread_limit(task.threads):
            _stoppable = task
            try:
                result = resolve(task.callable)(**task.params)
            finally:
                _stoppable = None
        done["metrics"], done["artifacts"] = split_result(result)
        done["ok"] = True
    except Stopped:
        done.update(exit_code=1, error="stopped by evo")
    except SystemExit as exc:  # a job may sys.exit(); 0 or None is success
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        done.update(ok=code == 0, exit_code=code, error=f"exit code {code}")
    except BaseException as exc:  # noqa: BLE001 - the job's failure is reported, not ours
        traceback.print_exc()
        done.update(exit_code=1, error=f"{type(exc).__name__}: {exc}")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a job that closed its own streams
            pass
        os.dup2(keep_out, 1)
        os.dup2(keep_err, 2)
        os.close(keep_out)
        os.close(keep_err)
        os.chdir(saved_cwd)
        if task.cwd in sys.path:
            sys.path.remove(task.cwd)
        forget_users_modules(before)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ends = (_size(out_fd), _size(err_fd), _report_size(task.env.get("EVO_REPORT_FILE")))
    return TaskDone(ends=ends, **done)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the node that started it dies (kill -9 included),
    instead of waiting to notice the closed pipe after its imports."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the node died before the request took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def main() -> int:
    global _STOP_MARK
    _die_with_parent()
    _STOP_MARK = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "stop")
    signal.signal(signal.SIGUSR1, _on_stop)
    # The protocol gets private copies of fds 0 and 1; the job's stdin is /dev/null and its
    # stdout is a file, so nothing a job prints can corrupt a frame.
    cmd_fd, reply_fd = os.dup(0), os.dup(1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out_fd, err_fd = os.open(sys.argv[1], flags, 0o644), os.open(sys.argv[2], flags, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # between tasks, stray prints go to the worker's log
    for name in filter(None, os.environ.get("EVO_WORKER_PRELOAD", DEFAULT_PRELOAD).split(",")):
        try:
            importlib.import_module(name.strip())
        except Exception:  # noqa: BLE001 - preload is an optimisation, a missing one is fine
            pass
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Task)
    lock = threading.Lock()  # a job's threads may report while another frame is written
    reported, last = enc.encode(Reported()), [0.0]

    def notify() -> None:
        now = time.monotonic()
        if now - last[0] >= NOTIFY_EVERY_S:
            last[0] = now
            with lock:
                write_frame(reply_fd, reported)

    from evo import job

    job._on_report, job._stop_asked = notify, _stop_asked
    write_frame(reply_fd, enc.encode(WorkerReady(pid=os.getpid())))
    while True:
        frame = read_frame(cmd_fd)
        if frame is None:  # the node closed the pipe: it is gone or retiring us
            return 0
        done = enc.encode(run_task(dec.decode(frame), out_fd, err_fd))
        with lock:
            write_frame(reply_fd, done)


if __name__ == "__main__":
    sys.exit(main())
