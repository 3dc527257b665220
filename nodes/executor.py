"""Running one attempt of a job: a subprocess in its own process group.

A command job runs from its argv list (never a shell). A callable job (``module:function``)
runs through ``python -m evo.nodes.runner``. Each attempt gets its own working directory with
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

from .progress import parse_line


class Run:
    def __init__(self, grant: LeaseGrant, root: Path, node: str) -> None:
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
        if spec.command is not None:
            argv = list(spec.command)
        else:
            params = self.dir / "params.json"
            params.write_text(json.dumps({"callable": spec.callable, "params": spec.params,
                                          "seed": spec.seed}))
            env["EVO_PARAMS_FILE"] = str(params)
            argv = [sys.executable, "-m", "evo.nodes.runner"]
        self._out = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in finish()
        self._err = open(self.stderr_path, "ab")  # noqa: SIM115
        self.started = time.time()
        self.error = ""
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=self._out, stderr=self._err,
                stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:  # no such program, not executable, bad workdir
            self.proc = None
            self.error = f"could not start {argv[0]!r}: {exc.strerror or exc}"
        self._report_off = 0
        self._stdout_off = 0
        self._partial = b""
        self.result: dict = {}
        self.kill_at: float | None = None
        self.cancelled = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def reports(self) -> list[dict]:
        """New progress reports: from evo.report() first, else parsed from stdout lines."""
        out: list[dict] = []
        with open(self.report_file, "rb") as f:
            f.seek(self._report_off)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._report_off += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "result":
                self.result = rec
            else:
                out.append(rec)
        with open(self.stdout_path, "rb") as f:
            f.seek(self._stdout_off)
            chunk = f.read(1 << 20)
        self._stdout_off += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            rec = parse_line(line.decode("utf-8", "replace"))
            if rec is not None:
                rec["kind"] = "progress"
                out.append(rec)
        return out

    def poll(self) -> int | None:
        if self.proc is None:
            return 127
        rc = self.proc.poll()
        if rc is None and self.kill_at is not None and time.time() >= self.kill_at:
            self._signal(signal.SIGKILL)
        return rc

    def _signal(self, sig: int) -> None:
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
        self._out.close()
        self._err.close()
        if self.proc is not None:
            self._signal(signal.SIGKILL)  # leftovers of the group must not outlive the attempt

    def tail(self, path: Path, n: int = 800) -> str:
        try:
            data = path.read_bytes()[-n:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()
