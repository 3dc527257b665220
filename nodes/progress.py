"""Progress from inside a job, and from its log lines as a fallback.

Inside a job, ``evo.report(step=3, loss=0.41)``, ``evo.result(auc=0.7)`` and
``evo.checkpoint(path)`` append one JSON line to the file named by EVO_REPORT_FILE, which the
node tails. Jobs that do not use evo are still tracked through lines such as
``epoch 3/10 loss=0.41 auc=0.61``; a job that calls evo.report or evo.result is not (its prints
are output only, so nothing is counted twice).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

# A key starts where no key character precedes it: without the lookbehind, a long word with no
# `=` after it was tried from each of its characters (quadratic: 1 s for a 10,000-character
# line). Numbers are bounded in length, so none is too big for an event.
_KV = re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-]{0,99})\s*[=:]\s*"
                 r"(-?\d{1,30}(?:\.\d{1,30})?(?:[eE][-+]?\d{1,3})?)(?![\d.])")
_EPOCH = re.compile(r"\bepoch\s*[:=]?\s*(\d{1,18})\s*(?:/\s*(\d{1,18}))?", re.IGNORECASE)
_STEP = re.compile(r"\bstep\s*[:=]?\s*(\d{1,18})(?!\d)", re.IGNORECASE)
MAX_LINE = 4096  # longer lines are not parsed (they are still the job's output)


def parse_line(line: str) -> dict | None:
    """A progress report from a log line, or None when the line says nothing measurable."""
    if len(line) > MAX_LINE:
        return None
    metrics = {k: float(v) for k, v in _KV.findall(line) if k.lower() not in ("epoch", "step")}
    epoch = _EPOCH.search(line)
    step = _STEP.search(line)
    if not metrics and not epoch and not step:
        return None
    out: dict = {"metrics": metrics}
    if epoch:
        out["epoch"] = int(epoch.group(1))
    if step:
        out["step"] = int(step.group(1))
    return out


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
