"""What a job wrote, as the typed reports the broker takes; what cannot be one, as a note.

A job reports through records it appends to its report file (``evo.report``,
``evo.checkpoint``), through lines it prints (``epoch 3/10 loss=0.41``) and through what a
callable returns. Each becomes one body of the wire protocol (broker/protocol.py), built with
the same types the broker decodes with, so what the broker would refuse is caught here, where
the job's stderr can say so (``notes``):

  * a metric value that is not a finite number (NaN, inf) is left out of the report: metrics
    are finite numbers (the one rule, docs/decisions.md), and a diverged loss is said so on
    stderr rather than recorded as a value nothing can rank;
  * a record of the wrong shape (a float step, a string metric) becomes a RefusedReport naming
    the field, which the broker records as ReportRejected;
  * a checkpoint path must lead inside the job's checkpoint folder (symlinks followed);
  * a report too large to be an event: a completed one becomes a failed attempt that is not
    retried (the same code would return the same result), any other is refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta

from evo.broker import protocol as p
from evo.events.codec import MAX_EVENT_BYTES
from evo.events.strict import friendly, is_finite
from evo.names import inside


class Notes(list):
    """Lines for the job's stderr, about what of its reports evo could not record."""




class Result(msgspec.Struct, frozen=True, kw_only=True, tag="result", tag_field="kind"):
    """A job's final metrics, from ``evo.result()`` (not a report: the completed one says them)."""

    metrics: dict[str, p.Finite] = {}


class Artifact(msgspec.Struct, frozen=True, kw_only=True, tag="artifact", tag_field="kind"):
    """A file or folder the job made, to come home when it completes (``evo.artifact``)."""

    path: Annotated[str, Meta(min_length=1, max_length=4096)]


_RECORD = Union[p.ProgressReport, p.CheckpointReport, Result, Artifact]


def finite_metrics(metrics: dict, notes: Notes, where: str) -> dict:
    """``metrics`` without the values that are numbers but not finite (each one noted)."""
    dropped = [k for k, v in metrics.items() if isinstance(v, float) and not is_finite(v)]
    if not dropped:
        return metrics
    notes.append(f"{where}: {', '.join(f'{k}={metrics[k]}' for k in dropped)} not recorded "
                 "(metrics must be finite numbers)")
    return {k: v for k, v in metrics.items() if k not in dropped}


def _where(rec: dict) -> str:
    step = rec.get("step")
    return f"{rec.get('kind', 'progress')} report" + (f" at step {step}" if step is not None else "")


def from_record(rec: Any, notes: Notes, checkpoints: str | None = None
                ) -> p.AnyReport | Result | Artifact:
    """One record of the job's report file (or a parsed output line) as a report body."""
    kind = str(rec.get("kind", "progress"))[:40] if isinstance(rec, dict) else ""
    try:
        if not isinstance(rec, dict):
            raise msgspec.ValidationError(f"Expected `object`, got `{type(rec).__name__}`")
        rec = {"kind": "progress", **rec}
        if isinstance(rec.get("metrics"), dict):
            rec["metrics"] = finite_metrics(rec["metrics"], notes, _where(rec))
        body = msgspec.convert(rec, _RECORD)
    except msgspec.ValidationError as exc:
        return refused(kind, friendly(str(exc)), notes)
    if isinstance(body, p.CheckpointReport) and checkpoints is not None:
        rel = inside(checkpoints, body.path)
        if rel is None:
            return refused(kind, f"$.path: {body.path!r} leads outside the checkpoint folder "
                                 f"{checkpoints}", notes)
        # the digest is the node's to say, once it has sent the files: never the job's
        body = msgspec.structs.replace(body, path=rel, digest="", size=0)
    bad = p.report_error(body)
    return refused(kind, bad, notes) if bad else body


def from_line(line: bytes, notes: Notes, checkpoints: str | None = None
              ) -> p.AnyReport | Result | Artifact:
    """A line of the report file: JSON (NaN and Infinity as Python writes them)."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return refused("progress", f"not a JSON record ({exc})", notes)
    return from_record(rec, notes, checkpoints)


def completed(metrics: dict, artifacts: dict, duration_s: float, notes: Notes,
              outputs: dict[str, str] | None = None) -> p.AnyReport:
    """A callable's result (or none, for a command) as the completed report."""
    rec = {"kind": "completed", "metrics": finite_metrics(metrics, notes, "the result"),
           "artifacts": artifacts, "duration_s": max(0.0, duration_s), "outputs": outputs or {}}
    try:
        body = msgspec.convert(rec, p.CompletedReport)
    except msgspec.ValidationError as exc:
        return failed(f"evo could not record the job's result: {friendly(str(exc))}", notes)
    bad = p.report_error(body)
    return failed(f"evo could not record the job's result: {bad}", notes) if bad else body


def failed(why: str, notes: Notes) -> p.FailedReport:
    """A failed attempt that is not retried: the same code would give the same result."""
    notes.append(why)
    return p.FailedReport(error=why, retryable=False)


def refused(kind: str, why: str, notes: Notes) -> p.RefusedReport:
    notes.append(f"{kind} report not recorded: {why}")
    return p.RefusedReport(report=kind, reason=why[:2000])


MAX_TEXT = 16 << 10  # of an error or a reason: its tail is what tells (the whole is in stderr)


def fit(cmd: p.Report, notes: Notes) -> p.Report:
    """``cmd``, or what to send instead when it is too large to be an event. A final report
    stays final (the job must end): a completed one becomes a failed attempt that is not
    retried, a failed or cancelled one keeps the tail of its text."""
    size = len(p.command_encoder.encode(cmd))
    if size <= MAX_EVENT_BYTES - 1024:  # the event adds a little to the report
        return cmd
    body = cmd.report
    kind = p.report_kind(body)
    why = (f"the {kind} report is {size:,} bytes, over evo's limit of {MAX_EVENT_BYTES:,} for "
           "one event: return or report less (write large results to files)")
    if isinstance(body, p.FailedReport):
        body = msgspec.structs.replace(body, error=body.error[-MAX_TEXT:])
    elif isinstance(body, p.CancelledReport):
        body = msgspec.structs.replace(body, reason=body.reason[-MAX_TEXT:])
    elif isinstance(body, p.CompletedReport):
        body = failed(why, notes)
    else:
        body = refused(kind, why, notes)
    return msgspec.structs.replace(cmd, report=body)
