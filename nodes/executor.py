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


class Run:
    def __init__(self, grant: LeaseGrant, root: Path, node: str,
                 pool: WorkerPool | None = None) -> None:
        self.grant = grant
        spec = grant.spec
        self.job_dir = root / "jobs" / grant.job_id
        self.dir = self.job_dir / f"attempt-{grant.attempt}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.job_dir / "checkpoints"
        self.ckpt.mkdir(exist_ok=True)
        workdir = Path(spec.workdir) if spec.workdir else self.dir
        self.report_file = self.dir / "reports.jsonl"
        self.report_file.touch()
        self.stdout_path, self.stderr_path = self.dir / "stdout.log", self.dir / "stderr.log"
        env = dict(os.environ)
        env.update({
            "EVO_JOB_ID": grant.job_id, "EVO_ATTEMPT": str(grant.attempt),
            "EVO_LEASE_EPOCH": str(grant.lease_epoch), "EVO_NODE": node,
            "EVO_CHECKPOINT_DIR": str(self.ckpt), "EVO_REPORT_FILE": str(self.report_file),
            "EVO_WORKDIR": str(self.dir),
            "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in grant.devices),
            "PYTHONUNBUFFERED": "1",
        })
        if spec.seed is not None:
            env["EVO_SEED"] = str(spec.seed)
        self.started = time.time()
        self.error = ""
        self.proc: subprocess.Popen | None = None
        self.worker: Worker | None = None
        self.pool = pool
        self.rc: int | None = None
        if spec.callable is not None and not spec.isolate and pool is not None:
            self.worker = pool.take(tuple(grant.devices))
            env.pop("CUDA_VISIBLE_DEVICES")  # the worker was started with the job's devices
            self.worker.send({"callable": spec.callable, "params": spec.params, "seed": spec.seed,
                              "cwd": str(workdir), "stdout": str(self.stdout_path),
                              "stderr": str(self.stderr_path),
                              "env": {k: v for k, v in env.items() if k.startswith("EVO_")}})
        else:
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
        self._reports = open(self.report_file, "rb")  # noqa: SIM115 - closed in finish()
        self._stdout = open(self.stdout_path, "ab+")  # noqa: SIM115 - created if absent
        self._stdout.seek(0)
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

    def reports(self) -> list[dict]:
        """New progress reports: from evo.report() first, else parsed from stdout lines."""
        out: list[dict] = []
        data = self._reports.read()
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
        chunk = self._stdout.read(1 << 20)
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
        self._reports.close()
        self._stdout.close()
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


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
