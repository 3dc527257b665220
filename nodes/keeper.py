"""The keeper: the process that starts a node's job processes, so that they end with the node.

A killed process cannot clean up after itself, so the node does not start its command jobs (and
isolated callables) itself: it asks its keeper, a small process it starts once (``python -m
evo.nodes.keeper``), over a socket pair. The keeper

  * is a child subreaper (PR_SET_CHILD_SUBREAPER): a job's descendants whose parents exit,
    daemons that double-fork into a session of their own included, become its children
    instead of init's, so it can always find them;
  * starts each job in a session of its own (its process group is the job's: signals go to
    the group); should the keeper itself be killed, the node kills those groups;
  * reports each job's exit (it reaps them), and on request signals a job's process group and,
    at the end of an attempt, the orphans it left (found among its own children by the
    attempt's EVO_LEASE_EPOCH);
  * when the node goes, by any signal, kill -9 included (its end of the socket closes), kills
    every process it has ever started and everything they started, and exits.

Messages are the worker's framing (4-byte length, msgpack), typed below. Linux only; elsewhere
the node starts jobs itself and a job may outlive a killed node.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Union

import msgspec

from .worker import FrameReader, read_frame, write_frame

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


# --- messages -----------------------------------------------------------------------------------


class ToKeeper(msgspec.Struct, frozen=True, kw_only=True, tag_field="msg"):
    pass


class Spawn(ToKeeper, frozen=True, tag="spawn"):
    id: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    stdout: str  # appended to
    stderr: str
    epoch: str = ""  # the attempt's EVO_LEASE_EPOCH: how its orphans are known


class Kill(ToKeeper, frozen=True, tag="kill"):
    id: int
    sig: int
    orphans: bool = False  # the attempt is over: its orphans too


class FromKeeper(msgspec.Struct, frozen=True, kw_only=True, tag_field="msg"):
    pass


class Spawned(FromKeeper, frozen=True, tag="spawned"):
    id: int
    pid: int


class NotSpawned(FromKeeper, frozen=True, tag="not_spawned"):
    id: int
    error: str


class Exited(FromKeeper, frozen=True, tag="exited"):
    id: int
    code: int  # as subprocess says it: negative for a signal


_enc = msgspec.msgpack.Encoder()
_to_keeper = msgspec.msgpack.Decoder(Union[Spawn, Kill])
_from_keeper = msgspec.msgpack.Decoder(Union[Spawned, NotSpawned, Exited])


try:
    _libc_prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _libc_prctl = None


def _prctl(option: int, arg: int) -> bool:
    return _libc_prctl is not None and _libc_prctl(option, arg, 0, 0, 0) == 0


# --- the keeper process -----------------------------------------------------------------------


class _Keeper:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.jobs: dict[int, tuple[subprocess.Popen, str]] = {}  # id -> (process, epoch)
        self.by_pid: dict[int, int] = {}  # leader pid -> id

    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the node's end closing is the one way to stop
        fd = self.sock.fileno()
        while True:
            ready, _, _ = select.select([fd, wake_r], [], [], 1.0)
            if wake_r in ready:
                os.read(wake_r, 4096)
            self._reap()
            if fd in ready:
                try:
                    frame = read_frame(fd)
                except OSError:  # reset: the node closed its end with our answers unread
                    frame = None
                if frame is None:  # the node is gone
                    self._kill_everything()
                    return
                self._handle(_to_keeper.decode(frame))

    def _send(self, msg: FromKeeper) -> None:
        try:
            write_frame(self.sock.fileno(), _enc.encode(msg))
        except OSError:
            pass  # the node is gone: serve() sees the closed socket and cleans up

    def _handle(self, msg: Spawn | Kill) -> None:
        if isinstance(msg, Spawn):
            try:
                with open(msg.stdout, "ab") as out, open(msg.stderr, "ab") as err:
                    proc = subprocess.Popen(msg.argv, cwd=msg.cwd, env=msg.env, stdout=out,
                                            stderr=err, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                error = getattr(exc, "strerror", None) or str(exc)
                self._send(NotSpawned(id=msg.id, error=f"could not start {msg.argv[0]!r}: {error}"))
                return
            self.jobs[msg.id] = (proc, msg.epoch)
            self.by_pid[proc.pid] = msg.id
            self._send(Spawned(id=msg.id, pid=proc.pid))
            return
        job = self.jobs.get(msg.id)
        if job is None:
            return
        proc, epoch = job
        try:
            os.killpg(proc.pid, msg.sig)
        except (ProcessLookupError, PermissionError):
            pass
        if msg.orphans:
            self._kill_orphans(epoch)
            if proc.returncode is not None:
                del self.jobs[msg.id]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job_id = self.by_pid.pop(pid, None)
            if job_id is None:
                continue  # an orphan that came to us, now gone
            proc, _ = self.jobs[job_id]
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            self._send(Exited(id=job_id, code=proc.returncode))

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def _kill_orphans(self, epoch: str) -> None:
        """Processes of an ended attempt that left its group, found among our children."""
        if not epoch:
            return
        mark = f"EVO_LEASE_EPOCH={epoch}".encode()
        for pid in self._children():
            if pid in self.by_pid:
                continue  # a running job's leader
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            for victim in [*_descendants(pid), pid]:
                _kill(victim)

    def _kill_everything(self) -> None:
        for proc, _ in self.jobs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            kids = self._children()
            if not kids:
                return
            for pid in kids:
                for victim in [*_descendants(pid), pid]:
                    _kill(victim)
            time.sleep(0.01)  # let the kills land before reaping (SIGKILL cannot be caught)
            self._reap()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)  # a prompt nudge; the closed socket decides
    signal.signal(signal.SIGUSR1, lambda *_: None)
    _Keeper(sock).serve()
    return 0


# --- the node's side ----------------------------------------------------------------------------


class KeptProcess:
    """A job process started by the keeper: what the node needs of a Popen."""

    def __init__(self, keeper: KeeperClient, job: int, pid: int) -> None:
        self.keeper, self.id, self.pid = keeper, job, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.keeper.read()
        return self.returncode

    def signal(self, sig: int, orphans: bool = False) -> None:
        self.keeper.kill(self.id, sig, orphans)


class KeeperGone(OSError):
    """Raised when the keeper process is not there to start a job (it died, or stopped
    answering and was stopped)."""


class KeeperClient:
    """The node's end: starts the keeper, spawns jobs through it, learns of their exits."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen([sys.executable, "-m", "evo.nodes.keeper",
                                      str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.sock = mine
        self.fd = mine.fileno()
        os.set_blocking(self.fd, False)
        self._frames = FrameReader(self.fd)
        self._ids = 0
        self.procs: dict[int, KeptProcess] = {}
        self._answers: dict[int, FromKeeper] = {}
        self._exits: dict[int, int] = {}  # exits told with the answer to a spawn, before it
        self.gone = False

    def spawn(self, argv: list[str], *, cwd: str, env: dict[str, str], stdout: str,
              stderr: str, epoch: str = "", timeout_s: float = 30.0) -> KeptProcess:
        """Start a job; raises OSError (as Popen would) when it cannot be started."""
        self._ids += 1
        job = self._ids
        self._write(Spawn(id=job, argv=argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                          epoch=epoch))
        deadline = time.monotonic() + timeout_s
        while job not in self._answers:
            if self.gone:
                raise KeeperGone("the node's keeper process is gone")
            if time.monotonic() > deadline:  # it hangs: stop it (its jobs with it), say so
                self.close()
                self._lost()
                raise KeeperGone(f"the node's keeper did not answer within {timeout_s:g}s")
            select.select([self.fd], [], [], 0.5)
            self.read()
        answer = self._answers.pop(job)
        if isinstance(answer, NotSpawned):
            raise OSError(answer.error)
        assert isinstance(answer, Spawned), answer
        kept = KeptProcess(self, job, answer.pid)
        kept.returncode = self._exits.pop(job, None)
        self.procs[job] = kept
        return kept

    def kill(self, job: int, sig: int, orphans: bool = False) -> None:
        if not self.gone:
            self._write(Kill(id=job, sig=sig, orphans=orphans))
        if orphans and self.procs.get(job) is not None and self.procs[job].returncode is not None:
            del self.procs[job]

    def _write(self, msg: ToKeeper) -> None:
        try:
            os.set_blocking(self.fd, True)
            write_frame(self.fd, _enc.encode(msg))
        except OSError:
            self._lost()
        finally:
            if not self.gone:
                os.set_blocking(self.fd, False)

    def read(self) -> None:
        """Take in what the keeper said, without waiting."""
        if self.gone:
            return
        frames, eof = self._frames.read()
        for frame in frames:
            msg = _from_keeper.decode(frame)
            if isinstance(msg, Exited):
                kept = self.procs.get(msg.id)
                if kept is not None:
                    kept.returncode = msg.code
                else:
                    self._exits[msg.id] = msg.code
            else:
                self._answers[msg.id] = msg
        if eof:  # after what it said last: exits it told are not taken for deaths
            self._lost()

    def _lost(self) -> None:
        """The keeper died (killed on its own): end its jobs' groups, and say so for each."""
        if self.gone and not self.procs:
            return
        self.gone = True
        for kept in self.procs.values():
            if kept.returncode is None:
                try:
                    os.killpg(kept.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                kept.returncode = -signal.SIGKILL
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop the keeper: closing our end makes it kill whatever is left and exit."""
        if self.sock.fileno() != -1:
            self.sock.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.gone = True


if __name__ == "__main__":
    sys.exit(main())
