"""Running one attempt of a job: a subprocess in its own process group.

A command job runs from its argv list (never a shell). A callable job (``module:function``)
runs in a warm worker from the node's pool, or with ``isolate: true`` in a fresh process through
``python -m evo.nodes.runner``. Each attempt gets its own working directory with
stdout and stderr captured to files; the checkpoint directory is per job and the same across
attempts, so a retry can resume. The job sees EVO_* variables and CUDA_VISIBLE_DEVICES set to
exactly its devices (empty for a CPU job, which hides every GPU).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
import subprocess

from evo.broker.protocol import LeaseGrant

from .pool import Worker, WorkerPool
from .progress import parse_line


LOOK_EVERY_S = 0.2


class Run:
    def __init__(self, grant: LeaseGrant, root: Path, node: str,
                 pool: WorkerPool | None = None) -> None:
        self.grant = grant
        spec = grant.spec
        self.job_dir = root / "jobs" / grant.job_id
        self.dir = self.job_dir / f"attempt-{grant.attempt}"
        self.ckpt = self.job_dir / "checkpoints"
        workdir = Path(spec.workdir) if spec.workdir else self.dir
        self.report_file = self.dir / "reports.jsonl"
        warm = spec.callable is not None and not spec.isolate and pool is not None
        if not warm:  # a warm worker makes these itself, off the node's thread
            self.dir.mkdir(parents=True, exist_ok=True)
            self.ckpt.mkdir(exist_ok=True)
        self.stdout_path, self.stderr_path = self.dir / "stdout.log", self.dir / "stderr.log"
        env = {
            "EVO_JOB_ID": grant.job_id, "EVO_ATTEMPT": str(grant.attempt),
            "EVO_LEASE_EPOCH": str(grant.lease_epoch), "EVO_NODE": node,
            "EVO_CHECKPOINT_DIR": str(self.ckpt), "EVO_REPORT_FILE": str(self.report_file),
            "EVO_WORKDIR": str(self.dir),
        }
        if spec.seed is not None:
            env["EVO_SEED"] = str(spec.seed)
        self.started = time.time()
        self.error = ""
        self.proc: subprocess.Popen | None = None
        self.worker: Worker | None = None
        self.pool = pool
        self.rc: int | None = None
        if warm:
            self.worker = pool.take(tuple(grant.devices))  # started with the job's devices
            self.worker.send({"callable": spec.callable, "params": spec.params, "seed": spec.seed,
                              "cwd": str(workdir), "stdout": str(self.stdout_path),
                              "stderr": str(self.stderr_path),
                              "mkdirs": [str(self.dir), str(self.ckpt)],
                              "env": env})
        else:
            env = {**os.environ, **env, "PYTHONUNBUFFERED": "1",
                   "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in grant.devices)}
            if spec.command is not None:
                argv = list(spec.command)
            else:
                params = self.dir / "params.json"
                params.write_text(json.dumps({"callable": spec.callable, "params": spec.params,
                                              "seed": spec.seed}))
                env["EVO_PARAMS_FILE"] = str(params)
                argv = [sys.executable, "-m", "evo.nodes.runner"]
            with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
                try:
                    self.proc = subprocess.Popen(
                        argv, cwd=workdir, env=env, stdout=out, stderr=err,
                        stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as exc:  # no such program, not executable, bad workdir
                    self.error = f"could not start {argv[0]!r}: {exc.strerror or exc}"
                    self.rc = 127
        self._reports = self._stdout = None  # opened once the job has written to them
        self._next_look = time.monotonic() + LOOK_EVERY_S
        self._partial = b""
        self.result: dict = {}
        self.kill_at: float | None = None
        self.cancelled = False
        self.shipped: dict[str, int] = {}  # stream -> bytes sent to the broker

    @property
    def pid(self) -> int:
        if self.worker is not None:
            return self.worker.pid
        return self.proc.pid if self.proc is not None else 0

    @property
    def fd(self) -> int | None:
        """A descriptor that becomes readable when a warm worker answers (None: poll)."""
        return self.worker.fd if self.worker is not None and self.rc is None else None

    def reports(self, final: bool = False) -> list[dict]:
        """New progress reports: from evo.report() first, else parsed from stdout lines.

        Files are looked at a few times a second while the job runs (a short trial would
        otherwise pay more for the looking than for itself), and always once at the end.
        """
        out: list[dict] = []
        now = time.monotonic()
        if not final and now < self._next_look:
            return out
        self._next_look = now + LOOK_EVERY_S
        if self._reports is None:
            self._reports = _open_if_there(self.report_file)
        data = self._reports.read() if self._reports is not None else b""
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line still being written: read it whole next time
            self._reports.seek(end - len(data), os.SEEK_CUR)
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "result":
                self.result = rec
            else:
                out.append(rec)
        if self._stdout is None:
            self._stdout = _open_if_there(self.stdout_path)
        chunk = self._stdout.read(1 << 20) if self._stdout is not None else b""
        if not chunk:
            return out
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            rec = parse_line(line.decode("utf-8", "replace"))
            if rec is not None:
                rec["kind"] = "progress"
                out.append(rec)
        return out

    def poll(self) -> int | None:
        if self.rc is not None:
            return self.rc
        if self.worker is not None:
            msgs = self.worker.replies()
            if msgs is None:  # the worker died under the job (crash, OOM kill, cancel)
                code = self.worker.proc.wait()
                self.rc = code if code else 1
                self.error = self.error or f"warm worker {self.worker.pid} died ({_how(code)})"
            elif msgs:
                reply = msgs[0]
                self.result = {"metrics": reply.get("metrics", {}),
                               "artifacts": reply.get("artifacts", {})}
                self.rc = 0 if reply["ok"] else int(reply.get("exit_code") or 1)
                self.error = reply.get("error", "")
        elif self.proc is not None:
            self.rc = self.proc.poll()
        if self.rc is None and self.kill_at is not None and time.time() >= self.kill_at:
            self._signal(signal.SIGKILL)
        return self.rc

    def _signal(self, sig: int) -> None:
        if self.worker is not None:
            self.worker.kill(sig)
            return
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def cancel(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the whole process group now, SIGKILL after the grace period."""
        self.cancelled = True
        if self.kill_at is None:
            self._signal(signal.SIGTERM)
            self.kill_at = time.time() + grace_s

    def finish(self) -> None:
        for f in (self._reports, self._stdout):
            if f is not None:
                f.close()
        if self.worker is not None:
            if self.cancelled or self.worker.exit_code() is not None or self.pool is None:
                self.worker.kill()  # a cancelled task may have left the worker mid-way
                self.worker.proc.wait()
                self.worker.close()
            else:
                self.pool.give_back(self.worker)
        elif self.proc is not None:
            self._signal(signal.SIGKILL)  # leftovers of the group must not outlive the attempt
            self.proc.wait()

    def tail(self, path: Path, n: int = 800) -> str:
        try:
            data = path.read_bytes()[-n:]
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
