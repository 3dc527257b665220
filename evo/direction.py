"""Which way a metric is better: the one rule the desk, the SQL views and the reports share.

A sweep's ``mode`` decides for its own metric; otherwise losses and errors (and the names
below) are minimised and everything else is maximised.
"""

from __future__ import annotations

LOWER_IS_BETTER = frozenset({"brier", "logloss", "log_loss", "loss", "rmse", "mse", "mae",
                             "error", "duration_s", "ece"})
LOWER_IF_CONTAINS = ("loss", "error")


def metric_mode(metric: str, mode: str | None = None) -> str:
    """'max' or 'min': ``mode`` when it is one, else 'min' for losses and errors."""
    if mode in ("max", "min"):
        return mode
    name = metric.lower()
    return "min" if name in LOWER_IS_BETTER or any(s in name for s in LOWER_IF_CONTAINS) else "max"


def lower_is_better_sql(name: str, mode: str = "NULL") -> str:
    """The same rule as ``metric_mode`` as a SQL boolean over the columns ``name`` and ``mode``."""
    names = ", ".join(f"'{n}'" for n in sorted(LOWER_IS_BETTER))
    contains = " OR ".join(f"contains(lower({name}), '{s}')" for s in LOWER_IF_CONTAINS)
    return (f"CASE WHEN {mode} IN ('max', 'min') THEN {mode} = 'min' "
            f"ELSE (lower({name}) IN ({names}) OR {contains}) END")


def mode_in_sweep(metric: str, sweep_spec: dict | None) -> str:
    """``metric``'s direction in a sweep recorded as ``sweep_spec``: its mode rules its metric."""
    spec = sweep_spec or {}
    return metric_mode(metric, spec.get("mode") if metric == spec.get("metric") else None)


def sweep_metric(sweep_spec: dict | None) -> str:
    """The metric a sweep recorded as ``sweep_spec`` is ranked by: its own, else ``auc`` (the
    sweep file's default, sweeps/spec.py)."""
    return str((sweep_spec or {}).get("metric") or "auc")
