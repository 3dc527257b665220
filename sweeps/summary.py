"""What a learning sweep adds to its leaderboard and report: the best value over its trials
in the order they were asked (the convergence), and how many were pruned at each rung.

Read from the projections through ``sql(query, params)`` (the CLI's, or the report's), one
row per trial: a sweep of thousands of trials is two small queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evo.direction import mode_in_sweep, sweep_metric

from .spec import learning


def learning_summary(sweep: str, spec: dict[str, Any], sql: Callable) -> dict[str, Any] | None:
    """None for a sweep that does not learn (grid, random); else its trials, the pruned ones
    by the resource they were stopped at, and the convergence: for each trial in asking
    order, (trial number, job id, state, its value, the best completed value so far)."""
    if not learning(spec):
        return None
    metric = sweep_metric(spec)
    mode = mode_in_sweep(metric, spec)
    rows = sql(*trials_query(sweep, metric)).to_pylist()
    rungs = sql(*rungs_query(sweep)).to_pylist()
    curve = best_so_far(rows, mode)
    states = [r["state"] for r in rows]
    return {"metric": metric, "mode": mode, "trials": len(rows),
            "completed": states.count("completed"), "pruned": states.count("pruned"),
            "pruned_at": {int(r["resource"]): int(r["n"]) for r in rungs},
            "convergence": curve}


def trials_query(sweep: str, metric: str) -> tuple[str, list[Any]]:
    """A sweep's trials in the order they were asked, with their value of ``metric`` (NULL
    while it runs, and for one pruned, failed or cancelled)."""
    return ("SELECT j.job_id, j.state, f.value FROM jobs j LEFT JOIN final_metrics f "
            "ON f.job_id = j.job_id AND f.metric = ? WHERE j.sweep_id = ? "
            "ORDER BY j.submitted_seq", [metric, sweep])


def rungs_query(sweep: str) -> tuple[str, list[Any]]:
    """How many of a sweep's trials were pruned at each resource (the pruner's decision, not
    what the trial reported before it was stopped)."""
    return ("SELECT CAST(e.payload ->> '$.resource' AS INTEGER) AS resource, "
            "count(*) AS n FROM events e JOIN jobs j USING (job_id) "
            "WHERE e.type = 'PruneRequested' AND j.sweep_id = ? AND j.state = 'pruned' "
            "GROUP BY 1 ORDER BY 1", [sweep])


def best_so_far(rows: list[dict[str, Any]], mode: str
                ) -> list[tuple[int, str, str, float | None, float | None]]:
    """(trial number, job id, state, its value, the best value so far) for each trial."""
    best: float | None = None
    curve = []
    for i, r in enumerate(rows):
        v = r["value"]
        if v is not None and (best is None or (v > best if mode == "max" else v < best)):
            best = v
        curve.append((i + 1, r["job_id"], r["state"], v, best))
    return curve


def describe(summary: dict[str, Any], points: int = 6) -> list[str]:
    """The summary in a few lines of text, for the leaderboard."""
    lines = [f"{summary['trials']} trials asked: {summary['completed']} completed, "
             f"{summary['pruned']} pruned"
             + (" (" + ", ".join(f"{n} at resource {r}" for r, n in
                                 summary["pruned_at"].items()) + ")"
                if summary["pruned_at"] else "")]
    curve = [c for c in summary["convergence"] if c[4] is not None]
    if curve:
        n = len(summary["convergence"])
        marks = sorted({max(1, round(n * k / points)) for k in range(1, points + 1)})
        best = {c[0]: c[4] for c in summary["convergence"]}
        shown = [f"{m}: {best[m]:.6g}" for m in marks if best.get(m) is not None]
        lines.append(f"best {summary['metric']} ({summary['mode']}) after trial " +
                     ", ".join(shown))
    return lines
