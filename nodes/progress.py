"""Progress from a job's log lines, for jobs that do not use the in-job API (evo/job.py).

Jobs that do not call evo are still tracked through lines such as
``epoch 3/10 loss=0.41 auc=0.61``; a job that calls evo.report or evo.result is not (its prints
are output only, so nothing is counted twice).
"""

from __future__ import annotations

import re

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
