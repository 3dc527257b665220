"""Every query the web page asks, in one place: each aggregates in DuckDB and returns at most
a page of rows, whatever the number of jobs or events (bench/ui.py times them at 100,000 jobs).

A query is ``(sql, params)``: values travel as bind parameters, never in the SQL text.
"""

from __future__ import annotations

from typing import Any

from evo.sweeps.summary import rungs_query, trials_query

Q = tuple[str, list[Any]]

PAGE = 50  # jobs per page of the list
EVENTS = 200  # events in the tail
QUEUE = 20  # queued jobs shown with their reason
SERIES_POINTS = 120  # buckets of a utilisation chart
CURVE_POINTS = 2000  # points of a metric curve (every k-th step past that)


def counts() -> Q:
    return "SELECT state, count(*) AS n FROM jobs GROUP BY state ORDER BY state", []


def node_summary() -> Q:
    return ("SELECT node, busy_fraction, jobs_completed, mean_cpu, mean_gpu_util, "
            "max_vram_used_gb FROM utilization_summary ORDER BY node", [])


def _series(table: str, columns: str, window_s: float) -> Q:
    """Per node, the mean of ``columns`` in SERIES_POINTS buckets over the last
    ``window_s`` seconds of samples."""
    width = max(window_s / SERIES_POINTS, 1.0)
    return (f"SELECT node, floor(time / ?) * ? AS t, {columns} FROM {table} "
            f"WHERE time >= (SELECT max(time) FROM {table}) - ? "
            "GROUP BY node, t ORDER BY node, t", [width, width, window_s])


def cpu_series(window_s: float = 3600.0) -> Q:
    return _series("utilization", "avg(cpu) AS cpu, avg(mem) AS mem", window_s)


def gpu_series(window_s: float = 3600.0) -> Q:
    return _series("gpu_utilization", "avg(util) AS util, avg(vram_used_gb) AS vram_gb, "
                   "max(vram_total_gb) AS vram_total_gb", window_s)


FILTERS = ("state", "sweep_id", "node", "model_type")


def _where(filters: dict[str, str | None]) -> tuple[str, list[Any]]:
    parts, params = [], []
    for column in FILTERS:
        value = filters.get(column)
        if value:
            parts.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(parts)) if parts else "", params


def jobs_page(filters: dict[str, str | None], page: int, size: int = PAGE) -> Q:
    where, params = _where(filters)
    return ("SELECT job_id, sweep_id, coalesce(name, callable, trainer, "
            "array_to_string(CAST(command AS VARCHAR[]), ' ')) AS what, model_type, state, node, "
            "attempts, submitted_at, finished_at, duration_s "
            f"FROM jobs{where} ORDER BY submitted_seq DESC LIMIT ? OFFSET ?",
            [*params, size, max(page, 0) * size])


def jobs_total(filters: dict[str, str | None]) -> Q:
    where, params = _where(filters)
    return f"SELECT count(*) AS n FROM jobs{where}", params


def choices() -> Q:
    """The values each filter can take: states, sweeps, nodes, model types (a few thousand
    sweeps at most in a long history: small beside a page of jobs)."""
    return ("SELECT 'state' AS k, state AS v FROM (SELECT DISTINCT state FROM jobs) "
            "UNION ALL SELECT 'sweep_id', sweep_id FROM sweeps "
            "UNION ALL SELECT 'node', node FROM nodes "
            "UNION ALL SELECT 'model_type', model_type FROM "
            "(SELECT DISTINCT model_type FROM jobs WHERE model_type IS NOT NULL) "
            "ORDER BY k, v", [])


def job(job_id: str) -> Q:
    return ("SELECT job_id, sweep_id, name, model_type, state, node, attempts, priority, "
            "params, metrics, artifacts, error, submitted_at, started_at, finished_at, "
            "duration_s, trainer, callable, command, seed, tags, spec, held "
            "FROM jobs WHERE job_id = ?", [job_id])


def attempts(job_id: str) -> Q:
    return ("SELECT attempt, lease_epoch, node, devices, fallback, leased_at, started_at, "
            "ended_at, outcome, error, exit_code, env FROM attempts WHERE job_id = ? "
            "ORDER BY attempt, lease_epoch", [job_id])


def curves(job_ids: list[str], name: str | None = None) -> Q:
    """Progress metrics of these jobs, per attempt (a retry's steps start again), thinned to
    about CURVE_POINTS per job, attempt and metric (every k-th point, and the last)."""
    marks = ", ".join("?" for _ in job_ids) or "NULL"
    named = " AND name = ?" if name else ""
    return (f"""
        WITH m AS (SELECT job_id, lease_epoch, name, coalesce(step, epoch) AS step, value, seq,
                          row_number() OVER p AS i, count(*) OVER p AS n
                   FROM metrics WHERE job_id IN ({marks}) AND kind = 'progress'{named}
                   WINDOW p AS (PARTITION BY job_id, lease_epoch, name))
        SELECT job_id, lease_epoch, name, step, value FROM m
        WHERE (i - 1) % greatest(CAST(ceil(n / ?) AS BIGINT), 1) = 0 OR i = n
        ORDER BY job_id, lease_epoch, name, seq""",
            [*job_ids, *([name] if name else []), CURVE_POINTS])


def checkpoints(job_id: str) -> Q:
    return ("SELECT seq, time, lease_epoch, payload ->> '$.path' AS path, "
            "CAST(payload ->> '$.step' AS BIGINT) AS step, payload ->> '$.digest' AS digest, "
            "CAST(payload ->> '$.size' AS BIGINT) AS size FROM events "
            "WHERE job_id = ? AND type = 'Checkpointed' ORDER BY seq DESC LIMIT 50", [job_id])


def sweeps(limit: int = 200) -> Q:
    return ("SELECT sweep_id, name, state, jobs, queued, running, completed, failed, "
            "cancelled, pruned, best_job, submitted_at, finished_at, "
            "spec ->> '$.metric' AS metric, spec ->> '$.mode' AS mode, "
            "spec ->> '$.method' AS method FROM sweeps ORDER BY submitted_at DESC LIMIT ?",
            [limit])


def sweep(sweep_id: str) -> Q:
    return ("SELECT sweep_id, name, state, jobs, queued, running, completed, failed, "
            "cancelled, pruned, best_job, submitted_at, finished_at, spec "
            "FROM sweeps WHERE sweep_id = ?", [sweep_id])


def leaderboard(sweep_id: str, metric: str, limit: int) -> Q:
    """The best ``limit`` trials by the sweep's metric, its mode honoured (the view's rank)."""
    return ("SELECT rank, job_id, model_type, value, lower_is_better, params FROM leaderboard "
            "WHERE sweep_id = ? AND metric = ? AND rank <= ? ORDER BY rank, job_id",
            [sweep_id, metric, limit])


def ranked(sweep_id: str, metric: str) -> Q:
    return ("SELECT count(*) AS n FROM leaderboard WHERE sweep_id = ? AND metric = ?",
            [sweep_id, metric])


def convergence(sweep_id: str, metric: str) -> Q:
    """The sweep's trials in asking order with their values: the same rows as the leaderboard's
    and the report's convergence (evo.sweeps.summary), folded there into the best so far."""
    return trials_query(sweep_id, metric)


def pruned_by_rung(sweep_id: str) -> Q:
    """How many trials were pruned at each resource: the pruner's decisions (PruneRequested)."""
    return rungs_query(sweep_id)


def events(type_: str | None = None, job_id: str | None = None, limit: int = EVENTS) -> Q:
    where, params = [], []
    if type_:
        where.append("type = ?")
        params.append(type_)
    if job_id:
        where.append("job_id = ?")
        params.append(job_id)
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    return (f"SELECT seq, time, type, job_id, node, sweep_id FROM events{cond} "
            "ORDER BY seq DESC LIMIT ?", [*params, limit])

