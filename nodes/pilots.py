"""Slurm pilots: `evo node --slurm` submits batch jobs that each run `evo node` on a compute
node, connected back to the broker, and keeps ``scale`` of them alive while there is work.

A pilot is an ordinary evo node with an end: the batch script passes its allocation's end
(``--until``, from the walltime) and the node declares it to the broker, which leases it only
jobs expected to end before then (broker/estimates.py, scheduler.outlasts). Slurm's warning
signal (``--signal=B:USR1@grace``) drains it; its SIGTERM (scancel, preemption, the time limit)
stops what runs at once so the reports reach the broker; the jobs are then retried on another
node from their checkpoints. A pilot with nothing to do for ``idle_exit_s`` leaves, and the
keeper submits another only while jobs are queued or a learning sweep asks for trials, so an
idle cluster holds no allocation. Stopping the keeper (Ctrl-C, SIGTERM) cancels its pilots.

Names: a pilot's node is ``slurm-<jobid>`` (``slurm-<jobid>-<n>`` for the n-th node of a
multi-node pilot, each started by srun), so `squeue` and `evo status` name the same thing.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from evo.errors import BadInput

log = logging.getLogger("evo.pilots")

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def walltime_s(text: str) -> int:
    """Slurm's --time in seconds: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = _TIME.match(text.strip())
    if not m:
        raise BadInput(f"--time: expected Slurm's time (minutes, HH:MM:SS or D-HH:MM:SS), "
                       f"got {text!r}")
    days, a, b, c = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if days is not None:  # D-HH[:MM[:SS]]
        secs = int(days) * 86400 + a * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        secs = a * 60 + int(b)
    else:  # minutes
        secs = a * 60
    if secs <= 0:
        raise BadInput(f"--time: expected a walltime above 0, got {text!r}")
    return secs


@dataclass
class PilotSpec:
    broker: str
    home: Path
    partition: str | None = None
    nodes: int = 1
    cpus_per_node: int | None = None
    gpus_per_node: int = 0
    mem_gb: float | None = None
    time: str = "1:00:00"
    sbatch_args: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    slots: int | None = None
    grace_s: float = 60.0
    idle_exit_s: float = 120.0
    heartbeat_s: float = 2.0

    def script(self) -> str:
        """The batch script: resources as #SBATCH lines, then `evo node` with the pilot's end."""
        wall = walltime_s(self.time)
        if self.grace_s >= wall:
            raise BadInput(f"--grace-s {self.grace_s:g} leaves nothing of --time {self.time}")
        lines = ["#!/bin/bash", "#SBATCH --job-name=evo-pilot", f"#SBATCH --nodes={self.nodes}",
                 "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={self.time}",
                 f"#SBATCH --signal=B:USR1@{int(self.grace_s)}",
                 f"#SBATCH --output={self.home / 'pilots'}/pilot-%j.out",
                 f"#SBATCH --chdir={Path.cwd()}"]
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.cpus_per_node:
            lines.append(f"#SBATCH --cpus-per-task={self.cpus_per_node}")
        if self.mem_gb:
            lines.append(f"#SBATCH --mem={max(int(self.mem_gb * 1024), 1)}M")
        if self.gpus_per_node:
            lines.append(f"#SBATCH --gres=gpu:{self.gpus_per_node}")
        lines += [f"#SBATCH {a}" for a in self.sbatch_args]
        node = [sys.executable, "-m", "evo.cli.app", "node", "--broker", self.broker,
                "--heartbeat-s", f"{self.heartbeat_s:g}", "--grace-s", f"{self.grace_s:g}",
                "--idle-exit-s", f"{self.idle_exit_s:g}",
                "--labels", ",".join(["slurm", *([self.partition] if self.partition else []),
                                      *self.labels])]
        if self.cpus_per_node:  # what Slurm gave, not what the machine has
            node += ["--cpus", str(self.cpus_per_node)]
        if self.mem_gb:
            node += ["--mem-gb", f"{self.mem_gb:g}"]
        if self.slots or self.cpus_per_node:  # a slot per CPU Slurm gave, unless told
            node += ["--slots", str(self.slots or self.cpus_per_node)]
        if self.gpus_per_node:
            node += ["--gpus", str(self.gpus_per_node)]
        cmd = " ".join(shlex.quote(w) for w in node)
        lines += [f"export EVO_HOME={shlex.quote(str(self.home))}",
                  # the allocation ends ``wall`` seconds after it started
                  f'UNTIL=$(( ${{SLURM_JOB_START_TIME:-$(date +%s)}} + {wall} ))']
        if self.nodes == 1:  # exec: Slurm's signals reach the node itself
            lines.append(f'exec {cmd} --name "slurm-$SLURM_JOB_ID" --until "$UNTIL"')
        else:  # one node per allocated machine; srun passes the signals on
            lines.append(f"exec srun --kill-on-bad-exit=0 bash -c "
                         f"{shlex.quote('exec ' + cmd + ' --name slurm-$SLURM_JOB_ID-$SLURM_NODEID --until ')}"
                         f'"$UNTIL"')
        return "\n".join(lines) + "\n"


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BadInput(f"{argv[0]} is not installed: `evo node --slurm` needs Slurm's "
                       f"client commands (sbatch, squeue, scancel)") from None
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


class Keeper:
    """Keeps ``scale`` pilots submitted while there is work; cancels them when stopped."""

    def __init__(self, spec: PilotSpec, scale: int, work_waiting) -> None:  # noqa: ANN001
        self.spec, self.scale, self.work_waiting = spec, scale, work_waiting
        self.ids: list[str] = []  # pilots submitted and not seen ended
        self.stop = threading.Event()
        (spec.home / "pilots").mkdir(parents=True, exist_ok=True)
        self.script_path = spec.home / "pilots" / "pilot.sh"
        self.script_path.write_text(spec.script())

    def submit(self) -> str:
        job_id = _run(["sbatch", "--parsable", str(self.script_path)]).strip().split(";")[0]
        self.ids.append(job_id)
        log.info("pilot %s submitted (node slurm-%s)", job_id, job_id)
        return job_id

    def alive(self) -> list[str]:
        """The pilots Slurm still has pending or running."""
        if not self.ids:
            return []
        out = _run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(self.ids)])
        states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
        gone = [j for j in self.ids if j not in states or states[j].strip() in (
            "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")]
        for j in gone:
            log.info("pilot %s ended", j)
        self.ids = [j for j in self.ids if j not in gone]
        return self.ids

    def run(self, every_s: float = 2.0) -> None:
        try:
            while not self.stop.is_set():
                try:
                    alive = self.alive()
                    if len(alive) < self.scale and self.work_waiting():
                        for _ in range(self.scale - len(alive)):
                            self.submit()
                except RuntimeError as exc:  # Slurm or the broker busy: look again later
                    log.warning("%s", exc)
                self.stop.wait(every_s)
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self.ids:
            log.info("cancelling pilots %s", " ".join(self.ids))
            try:
                _run(["scancel", *self.ids])
            except RuntimeError as exc:
                log.warning("%s", exc)


def work_waiting(broker: str, within_s: float):  # noqa: ANN201
    """A check for the keeper: a queued job a new pilot could start (runnable, and not
    expected to outlast ``within_s``, the pilot's walltime less its grace), or a sweep that
    asks for trials as slots free. A job no pilot could take (held, waiting for another, or
    longer than any pilot lasts) submits no pilot, or pilots would come and go for it."""
    from evo.broker import protocol as p
    from evo.client import Client

    def check() -> bool:
        try:
            with Client(broker, timeout_s=10) as c:
                st = c.request(p.Status(within_s=within_s))
        except Exception as exc:  # noqa: BLE001 - the broker away: keep what runs, add none
            raise RuntimeError(f"the broker at {broker}: {exc}") from None
        assert isinstance(st, p.StatusReply)
        return st.startable or st.asking > 0

    return check

