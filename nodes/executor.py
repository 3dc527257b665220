"""Running one attempt of a job: a subprocess in its own process group.

A command job runs from its argv list (never a shell). A callable job (``module:function``)
runs in a warm worker from the node's pool, or with ``isolate: true`` in a fresh process through
``python -m evo.nodes.runner``. A process of its own (command, isolate) gets its own working
directory with stdout and stderr captured to files; a warm task runs in its worker's folder and
its output is a byte range of the worker's files. The checkpoint directory is per job and the
same across attempts, so a retry can resume; a warm task makes it on first use
(``evo.checkpoint_dir()``). The job sees EVO_* variables and CUDA_VISIBLE_DEVICES set to
exactly its devices (empty for a CPU job, which hides every GPU).

What a job reports becomes typed report bodies (nodes/reports.py); what evo cannot record is
said on the job's own stderr, as a line starting ``evo:`` (``Run.note``). Reading is bounded per
look (REPORT_BYTES and OUTPUT_BYTES, lines over MAX_LINE are not parsed), so a job that prints
without end, or one enormous line, never holds up the node's loop and its heartbeats.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
import subprocess

from evo.broker import protocol as p
from evo.broker.protocol import LeaseGrant
from evo.events.schema import GpuInfo

from . import reports
from .reports import Notes  # the class's method `reports` hides the module in annotations
from .probe import device_env
from .staging import Placement
from .keeper import KeeperClient, KeptProcess
from .pool import THREAD_VARS, Worker, WorkerPool
from .progress import MAX_LINE, parse_line
from .worker import Task


# Progress files are looked at every LOOK_EVERY_S in a run's first LOOK_SLOWER_AFTER_S (a
# short trial's reports arrive promptly), then every LOOK_SLOW_S: a long run's progress a
# second late costs nothing, and each look wakes the node. A warm task wakes the node itself
# when it reports (its worker's pipe), so the node does not wake for its looks: they are
# taken then, and when its output is shipped (daemon.py).
LOOK_EVERY_S = 0.2
LOOK_SLOWER_AFTER_S = 5.0
LOOK_SLOW_S = 1.0
REPORT_BYTES = 1 << 20  # of the report file per look (8x at the last look)
OUTPUT_BYTES = 256 << 10  # of stdout parsed for progress lines per look (4x at the last)


def relocated(value, paths: dict[str, str]):  # noqa: ANN001, ANN201 - argv, params
    """``value`` (an argv list, a params dict) with every recorded path that is elsewhere on
    this node replaced by where it is: a whole argument or value, one that ends in ``=PATH``
    (``--data=PATH``), or one under a moved folder (``/home/me/proj/train.py`` when the job's
    folder runs from a copy)."""
    if not paths:
        return value
    if isinstance(value, dict):
        return {k: relocated(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, paths) for v in value]
    if isinstance(value, str):
        if value in paths:
            return paths[value]
        head, eq, tail = value.rpartition("=")
        if eq and tail in paths:
            return f"{head}={paths[tail]}"
        for old, new in paths.items():
            if value.startswith(old + "/"):
                return new + value[len(old):]
    return value


class Run:
    def __init__(self, grant: LeaseGrant, root: Path, node: str,
                 pool: WorkerPool | None = None, keeper: KeeperClient | None = None,
                 placement: Placement | None = None,
                 gpus: dict[int, GpuInfo] | None = None) -> None:
        self.grant = grant
        spec = grant.spec
        self.placement = placement
        self.job_dir = root / "jobs" / grant.job_id
        self.ckpt = self.job_dir / "checkpoints"
        self.worker: Worker | None = None
        self.retryable = True  # False: the same attempt anywhere would fail the same way
        self.error = ""
        self.rc: int | None = None
        self.cancelled = False
        self.finished = False
        workdir = Path(spec.workdir) if spec.workdir else None
        moved: dict[str, str] = {}  # input paths -> where they are on this node
        if placement is not None:  # staged (staging.py): where its files are on this node
            workdir = Path(placement.workdir) if placement.workdir else None
            moved = placement.paths
            if placement.cancelled:
                self.cancelled, self.rc = True, 1
            elif placement.error:
                self.error, self.rc, self.retryable = placement.error, 127, placement.retryable
        elif workdir is not None and not workdir.is_dir():
            if spec.trainer is not None:
                workdir = None  # a built-in trainer needs no folder of the user's
            else:  # a job submitted without its files (an older client): it runs where they are
                self.error = (f"the job's working directory {workdir} is not on node {node}, "
                              "and it was submitted without its files")
                self.rc, self.retryable = 127, False
        warm = (spec.callable is not None and not spec.isolate and pool is not None
                and self.rc is None)
        if warm:
            # No files or folders per attempt: the worker's own files hold this task's output
            # from the current ends on, and its folder is the working directory.
            assert pool is not None
            self.worker = pool.take(tuple(grant.devices))  # started with the job's devices
            self.dir = self.worker.folder
            paths = self.worker.paths
            self.stdout_path, self.stderr_path = paths["stdout"], paths["stderr"]
            self.report_file = paths["reports"]
            self.base = dict(zip(("stdout", "stderr", "reports"), self.worker.ends))
        else:
            self.dir = self.job_dir / f"attempt-{grant.attempt}"
            self.dir.mkdir(parents=True, exist_ok=True)
            self.ckpt.mkdir(exist_ok=True)
            self.stdout_path, self.stderr_path = self.dir / "stdout.log", self.dir / "stderr.log"
            self.report_file = self.dir / "reports.jsonl"
            self.base = {"stdout": 0, "stderr": 0, "reports": 0}
            self.stderr_path.touch()  # notes may come before the job writes anything
        self.ends: dict[str, int] | None = None  # a warm task's ends, once it has answered
        workdir = workdir or self.dir  # a job of no folder of its own: the attempt folder
        env = {
            "EVO_JOB_ID": grant.job_id, "EVO_ATTEMPT": str(grant.attempt),
            "EVO_LEASE_EPOCH": str(grant.lease_epoch), "EVO_NODE": node,
            "EVO_CHECKPOINT_DIR": str(self.ckpt), "EVO_REPORT_FILE": str(self.report_file),
            "EVO_WORKDIR": str(workdir),
        }
        if moved:  # inputs that are elsewhere here than where they were submitted from
            env["EVO_INPUTS"] = json.dumps(moved)
        if placement is not None and placement.resumed and placement.resume_step is not None:
            env["EVO_RESUME_STEP"] = str(placement.resume_step)  # its checkpoint is restored
        self.workdir = workdir
        params = relocated(spec.params, moved)
        if spec.seed is not None:
            env["EVO_SEED"] = str(spec.seed)
        self.started = time.monotonic()  # durations on the monotonic clock
        self.proc: subprocess.Popen | KeptProcess | None = None
        self.pool = pool
        threads = max(1, int(spec.resources.cpus))  # native thread pools get the job's CPUs
        if self.rc is not None:
            pass  # it cannot start here (said in self.error)
        elif self.worker is not None:
            self.worker.send(Task(callable=spec.callable or "", params=params,
                                  seed=spec.seed, cwd=str(workdir), env=env, threads=threads))
        else:
            env = {**{v: str(threads) for v in THREAD_VARS}, **os.environ, **env,
                   "PYTHONUNBUFFERED": "1",
                   **device_env(grant.devices, gpus or {})}
            if spec.command is not None:
                argv = relocated(list(spec.command), moved)
            else:
                params_file = self.dir / "params.json"
                params_file.write_text(json.dumps({"callable": spec.callable, "params": params,
                                                   "seed": spec.seed}))
                env["EVO_PARAMS_FILE"] = str(params_file)
                env["EVO_RESULT_FILE"] = str(self.dir / "result.json")
                argv = [sys.executable, "-m", "evo.nodes.runner"]
            try:
                if keeper is not None:  # the keeper starts it, so it ends with this node
                    self.proc = keeper.spawn(argv, cwd=str(workdir), env=env,
                                             stdout=str(self.stdout_path),
                                             stderr=str(self.stderr_path),
                                             epoch=str(grant.lease_epoch))
                else:
                    with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
                        self.proc = subprocess.Popen(
                            argv, cwd=workdir, env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:  # no such program, not executable, bad workdir
                self.error = (str(exc) if keeper is not None else
                              f"could not start {argv[0]!r}: {exc.strerror or exc}")
                self.rc = 127
        self._reports = self._stdout = None  # opened once the job has written to them
        self._next_look = time.monotonic() + LOOK_EVERY_S
        self.final: p.Report | None = None  # once it has ended: its final report, to send
        self.frozen: dict[str, int] | None = None  # a process's output sizes once it ended
        self._skipping = {"reports": False, "stdout": False}  # inside a line too long to read
        self.result: dict = {}  # {"metrics": ..., "artifacts": ...}: returned or evo.result()
        self.reported = False  # it called evo.report (or evo.result): its prints are output only
        self.last_metrics: dict[str, float] = {}  # the last reported value of each metric
        self.kill_at: float | None = None
        self.shipped: dict[str, int] = {}  # stream -> bytes sent to the broker
        self.declared: list[str] = []  # outputs it named with evo.artifact (absolute paths)
        self.outputs: dict[str, str] = {}  # output path -> its manifest in the store, once sent
        self.ending_at: float | None = None  # when it ended (its uploads are waited for)
        if placement is not None and placement.how and not placement.error:
            for line in placement.how.splitlines():  # where its files came from
                self.note(line)

    def span(self, stream: str) -> tuple[Path, int, int]:
        """(file, where this attempt's bytes start in it, how many there are so far)."""
        path = {"stdout": self.stdout_path, "stderr": self.stderr_path,
                "reports": self.report_file}[stream]
        base = self.base[stream]
        if self.ends is not None:
            return path, base, self.ends[stream] - base
        if self.frozen is not None:
            return path, base, self.frozen[stream]
        try:
            return path, base, max(0, path.stat().st_size - base)
        except FileNotFoundError:
            return path, base, 0

    def _wrote(self, stream: str) -> bool:
        """False when a warm task has answered and wrote nothing there (no file to look at)."""
        return self.ends is None or self.ends[stream] > self.base[stream]

    def _open(self, stream: str):  # noqa: ANN202 - a binary file positioned at our bytes, or None
        path, base, _ = self.span(stream)
        f = _open_if_there(path)
        if f is not None and base:
            f.seek(base)
        return f

    @property
    def next_look(self) -> float:
        """When its progress files are next looked at (monotonic)."""
        return self._next_look

    @property
    def pid(self) -> int:
        if self.worker is not None:
            return self.worker.pid
        return self.proc.pid if self.proc is not None else 0

    @property
    def kept(self) -> bool:
        """Started by the keeper: its end is told on the keeper's socket."""
        return isinstance(self.proc, KeptProcess)

    @property
    def fd(self) -> int | None:
        """A descriptor that becomes readable when a warm worker answers (None: poll)."""
        return self.worker.fd if self.worker is not None and self.rc is None else None

    def reports(self, final: bool = False) -> list[p.AnyReport]:
        """New progress reports: from evo.report() first, else parsed from stdout lines.

        Files are looked at a few times a second while the job runs (a short trial would
        otherwise pay more for the looking than for itself), and always once at the end.
        """
        out: list[p.AnyReport] = []
        now = time.monotonic()
        if not final and now < self._next_look:
            return out
        self._next_look = now + (LOOK_EVERY_S if now - self.started < LOOK_SLOWER_AFTER_S
                                 else LOOK_SLOW_S)
        notes = reports.Notes()
        grow = 8 if final else 1
        if self._reports is None and self._wrote("reports"):
            self._reports = self._open("reports")
        if self._reports is not None:
            ckpt = str(self.ckpt)
            for line in self._lines(self._reports, "reports", REPORT_BYTES * grow, notes):
                if line.strip():
                    self.reported = True
                    body = reports.from_line(line, notes, ckpt)
                    if isinstance(body, reports.Result):
                        self.result = {"metrics": {**self.result.get("metrics", {}),
                                                   **body.metrics}}
                    elif isinstance(body, reports.Artifact):
                        self.declared.append(body.path)
                    else:
                        out.append(body)
        if self._stdout is None and self._wrote("stdout"):
            self._stdout = self._open("stdout")
        if self._stdout is not None:
            # Printed lines are progress only for a job that does not call evo.report.
            for line in self._lines(self._stdout, "stdout", OUTPUT_BYTES * grow // 2, None):
                if self.reported:
                    continue
                rec = parse_line(line.decode("utf-8", "replace")) if len(line) <= MAX_LINE else None
                if rec is not None:
                    out.append(reports.from_record(rec, notes))
        for body in out:
            if isinstance(body, p.ProgressReport):  # the last value of each is its final one
                self.last_metrics.update(body.metrics)
        for text in notes:
            self.note(text)
        return out

    def _lines(self, f, stream: str, budget: int, notes: Notes | None) -> list[bytes]:  # noqa: ANN001
        """Whole lines read from ``f`` (at most ``budget`` bytes); a partial last line is read
        again next time, and a line longer than the budget is skipped to its end."""
        data = f.read(budget)
        if not data:
            return []
        end = data.rfind(b"\n") + 1
        if end == 0:
            if self._skipping[stream] or len(data) >= budget:  # inside a line too long to read
                if not self._skipping[stream] and notes is not None:
                    notes.append(f"a {stream} line of over {budget:,} bytes was not read")
                self._skipping[stream] = True
            else:  # a line still being written: whole, next time
                f.seek(-len(data), os.SEEK_CUR)
            return []
        if end < len(data):
            f.seek(end - len(data), os.SEEK_CUR)
        lines = data[:end - 1].split(b"\n")
        if self._skipping[stream]:  # the end of a line too long to read
            lines.pop(0)
            self._skipping[stream] = False
        return lines

    def note(self, text: str) -> None:
        """A line on the job's stderr from evo: what of its reports could not be recorded."""
        line = f"evo: {text}\n".encode("utf-8", "replace")
        if self.finished:  # shipped already, and a warm worker's file is another task's now
            return
        try:
            fd = os.open(self.stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            return
        if self.ends is not None:  # a warm task that has answered: its range grows by the note
            self.ends["stderr"] += len(line)
            if self.worker is not None:
                self.worker.ends[1] += len(line)
        elif self.frozen is not None:
            self.frozen["stderr"] += len(line)

    def poll(self) -> int | None:
        if self.rc is not None:
            return self.rc
        if self.worker is not None:
            msgs = self.worker.replies()
            if self.worker.reported:  # its task wrote a report: look at it now
                self.worker.reported = False
                self._next_look = time.monotonic()
            if msgs is None:  # the worker died under the job (crash, OOM kill, cancel)
                code = self.worker.proc.wait()
                self.rc = code if code else 1
                self.error = self.error or self.worker.error or \
                    f"warm worker {self.worker.pid} died ({_how(code)})"
            elif msgs:
                done = msgs[0]
                self.worker.ends = list(done.ends)
                self.ends = dict(zip(("stdout", "stderr", "reports"), done.ends))
                if done.metrics or done.artifacts:  # a returned dict; else evo.result's
                    self.result = {"metrics": done.metrics, "artifacts": done.artifacts}
                self.rc = 0 if done.ok else (done.exit_code or 1)
                self.error = done.error
        elif self.proc is not None:
            self.rc = self.proc.poll()
            if self.rc is not None and self.kept and self.proc.keeper.gone:  # type: ignore[union-attr]
                self.error = self.error or "the node's keeper of job processes died"
            if self.rc is not None and self.grant.spec.callable is not None:
                returned = self._result_file()
                if returned.get("metrics") or returned.get("artifacts"):
                    self.result = returned
        if self.rc is None and self.kill_at is not None and time.monotonic() >= self.kill_at:
            self._signal(signal.SIGKILL)
        return self.rc

    def _result_file(self) -> dict:
        """What the runner of an isolated callable wrote as its result ({} if nothing)."""
        try:
            rec = json.loads((self.dir / "result.json").read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def _signal(self, sig: int) -> None:
        if self.worker is not None:
            self.worker.kill(sig)
            return
        if self.proc is None:
            return
        if isinstance(self.proc, KeptProcess):
            self.proc.signal(sig)
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def end_leftovers(self) -> None:
        """Once the job's own process has exited: what it left running (its group, and for a
        kept job its orphans) is killed, so that nothing writes on into its output."""
        if isinstance(self.proc, KeptProcess):
            self.proc.signal(signal.SIGKILL, orphans=True)
        elif self.proc is not None:
            self._signal(signal.SIGKILL)

    def freeze(self) -> None:
        """Its output as it is now is all there is to ship (a warm task's range is known)."""
        if self.ends is None:
            self.frozen = {s: self.span(s)[2] for s in ("stdout", "stderr", "reports")}

    def cancel(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the whole process group now, SIGKILL after the grace period. A warm
        task is asked to stop instead (evo.job.Stopped is raised in its code at its next
        report or stop check), so its worker stays warm; the worker is killed if the task
        has not answered by the end of the grace period."""
        self.cancelled = True
        if self.kill_at is None:
            if self.worker is not None:
                self.worker.stop(self.grant.lease_epoch)
            else:
                self._signal(signal.SIGTERM)
            self.kill_at = time.monotonic() + grace_s

    def finish(self) -> None:
        self.finished = True
        for f in (self._reports, self._stdout):
            if f is not None:
                f.close()
        if self.worker is not None:
            if (self.cancelled and self.ends is None) or self.worker.exit_code() is not None \
                    or self.pool is None:
                self.worker.kill()  # a task stopped without its answer left the worker mid-way
                self.worker.proc.wait()
                self.worker.close()
            else:
                self.pool.give_back(self.worker)
        elif isinstance(self.proc, KeptProcess):
            # leftovers of the attempt, in its group or gone off on their own, do not outlive it
            self.proc.signal(signal.SIGKILL, orphans=True)
        elif self.proc is not None:
            self._signal(signal.SIGKILL)  # leftovers of the group must not outlive the attempt
            self.proc.wait()

    def tail(self, stream: str, n: int = 800) -> str:
        path, base, size = self.span(stream)
        if size <= 0:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(base + max(0, size - n))
                data = f.read(min(n, size))
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()


def _open_if_there(path: Path):  # noqa: ANN202 - a binary file or None
    try:
        return open(path, "rb")  # noqa: SIM115 - closed in Run.finish()
    except FileNotFoundError:
        return None


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
