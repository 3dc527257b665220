"""The in-job API: what a job calls, from any process evo started (command or callable).

``evo.report(step=3, loss=0.41)``, ``evo.result(auc=0.7)`` and ``evo.checkpoint(path)``
append one JSON line to the file named by EVO_REPORT_FILE, which the node tails and turns into
events (nodes/reports.py). Outside evo they do nothing, so a script runs the same by hand.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class Stopped(BaseException):
    """Raised inside a job's code in a warm worker when evo stops it (cancelled, or a trial its
    sweep's pruner ruled out), so the worker stays warm: at the job's next ``evo.report`` or
    ``evo.stop_if_asked()`` (never from a signal handler, which could land in a library's
    native code or a finalizer). A BaseException, like KeyboardInterrupt: ``except
    Exception`` does not swallow it; ``finally`` blocks run."""


# Set by a warm worker: tells its node a report was written, so the node reads it now rather
# than at its next look (a learning sweep's pruner decides on it); and says whether evo has
# asked the running task to stop.
_on_report: Callable[[], None] | None = None
_stop_asked: Callable[[], bool] | None = None


def should_stop() -> bool:
    """Whether evo asked this job to stop (cancelled, or a trial its sweep's pruner ruled
    out), for a job in a warm worker; a loop may check it and end early, as Optuna's
    ``trial.should_prune()``. ``evo.report`` raises Stopped by itself once it is true, and the
    built-in trainers look at it every boosting round or epoch. A command is stopped with
    SIGTERM instead; outside evo, always False."""
    return _stop_asked is not None and _stop_asked()


def stop_if_asked() -> None:
    """Raise Stopped if evo asked this job to stop (see should_stop)."""
    if should_stop():
        raise Stopped("stopped by evo")


def _write(record: dict) -> None:
    path = os.environ.get("EVO_REPORT_FILE")
    if not path:
        return  # not running under evo: reporting is a no-op
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if _on_report is not None:
        _on_report()
    stop_if_asked()


def _numbers(call: str, given: Mapping[str, Any] | None, named: dict[str, Any]) -> dict:
    """The metrics of a call (a mapping, keywords, or both) as floats; TypeError naming the
    call and the metric for a value that is not a number."""
    out = {}
    for k, v in {**(given or {}), **named}.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"{call}: metric {k!r} must be a number, got {type(v).__name__}")
        out[str(k)] = float(v)
    return out


def report(step: int | None = None, metrics: Mapping[str, float] | None = None, *,
           epoch: int | None = None, eta_s: float | None = None, **named: float) -> None:
    """Report progress from inside a job: ``evo.report(step=3, loss=0.41)``, or the metrics
    as a mapping, ``evo.report(3, {"loss": 0.41})``."""
    _write({"kind": "progress", "step": step, "epoch": epoch, "eta_s": eta_s, "t": time.time(),
            "metrics": _numbers("evo.report", metrics, named)})


def result(metrics: Mapping[str, float] | None = None, **named: float) -> None:
    """Record this job's final metrics (a command's, or a callable's that returns nothing):
    ``evo.result(auc=0.7)`` or ``evo.result({"auc": 0.7})``.

    Several calls add up, a later value of a name replacing an earlier one. A job that neither
    returns metrics nor calls this has the last value it reported of each metric as its final
    one."""
    _write({"kind": "result", "t": time.time(),
            "metrics": _numbers("evo.result", metrics, named)})


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
            "metrics": _numbers("evo.checkpoint", None, metrics)})


def artifact(path: str | os.PathLike[str]) -> None:
    """Bring a file or folder this job made home with it when it completes (``evo pull JOB``
    gets it): ``evo.artifact("model.pkl")``. Relative to the current directory."""
    _write({"kind": "artifact", "path": os.path.abspath(os.fspath(path))})


def input(path: str | os.PathLike[str]) -> Path:  # noqa: A001 - evo.input, as the CLI's --input
    """Where an input file submitted with the job (``--input``, a sweep's ``inputs:``, a
    trainer's ``data``) is on the node running it: ``open(evo.input("/data/games.csv"))``.
    The node copies it when the path it was submitted from is not there (or holds other bytes);
    outside evo, and where nothing was moved, the path itself."""
    given = os.fspath(path)
    moved = json.loads(os.environ.get("EVO_INPUTS") or "{}")
    return Path(moved.get(given) or moved.get(os.path.abspath(given)) or given)
