"""The in-job API: what a job calls, from any process evo started (command or callable).

``evo.report(step=3, loss=0.41)``, ``evo.result(auc=0.7)`` and ``evo.checkpoint(path)``
append one JSON line to the file named by EVO_REPORT_FILE, which the node tails and turns into
events (nodes/reports.py). Outside evo they do nothing, so a script runs the same by hand.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _write(record: dict) -> None:
    path = os.environ.get("EVO_REPORT_FILE")
    if not path:
        return  # not running under evo: reporting is a no-op
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def report(step: int | None = None, *, epoch: int | None = None, eta_s: float | None = None,
           **metrics: float) -> None:
    """Report progress from inside a job."""
    _write({"kind": "progress", "step": step, "epoch": epoch, "eta_s": eta_s, "t": time.time(),
            "metrics": {k: float(v) for k, v in metrics.items()}})


def result(**metrics: float) -> None:
    """Record this job's final metrics (a command's, or a callable's that returns nothing).

    Several calls add up, a later value of a name replacing an earlier one. A job that neither
    returns metrics nor calls this has the last value it reported of each metric as its final
    one."""
    _write({"kind": "result", "t": time.time(),
            "metrics": {k: float(v) for k, v in metrics.items()}})


def checkpoint_dir() -> Path:
    """This job's checkpoint folder (the same across its attempts on a node), made if needed.

    Outside evo it is ./checkpoints. Warm workers do not make it ahead of time: most short
    trials never checkpoint, and a folder per trial costs more than the trial.
    """
    d = Path(os.environ.get("EVO_CHECKPOINT_DIR") or "checkpoints")
    d.mkdir(parents=True, exist_ok=True)
    return d


def checkpoint(path: str, step: int | None = None, **metrics: float) -> None:
    """Record that a checkpoint was written (it lives in EVO_CHECKPOINT_DIR across retries)."""
    _write({"kind": "checkpoint", "path": str(path), "step": step,
            "metrics": {k: float(v) for k, v in metrics.items()}})
