"""`evo jobs` and `evo show`: the job list (like squeue) and one job in full, from the projections.

Registered on the main typer app by ``register`` (as cli/experiments.py is), so that the
queries work with a broker (through its projection) and without one (from the files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from evo.errors import BadInput
from evo.events.lifecycle import CANCELLED, COMPLETED, FAILED, LEASED, PRUNED, QUEUED, RUNNING
from evo.projections.files import json_cell

STATES = (QUEUED, LEASED, RUNNING, COMPLETED, FAILED, CANCELLED, PRUNED)


def _j(v):  # noqa: ANN001, ANN202
    return json_cell(v, {})


def register(app: typer.Typer, sql: Callable, print_table: Callable, broker_opt) -> None:  # noqa: ANN001
    @app.command()
    def jobs(state: Optional[str] = typer.Option(None, "--state", help="|".join(STATES)),
             sweep: Optional[str] = typer.Option(None, "--sweep", help="a sweep id"),
             node: Optional[str] = typer.Option(None, "--node", help="the node it ran on"),
             limit: int = typer.Option(50, "--limit", help="rows, newest first"),
             as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
             broker: Optional[str] = broker_opt) -> None:
        """Jobs, newest first: id, name, state, node, attempt, elapsed, the last step it reported,
        and its metrics (the final ones once it has completed, else the last it reported)."""
        where, values = [], []
        if state is not None:
            if state not in STATES:
                raise BadInput(f"--state: expected one of {', '.join(STATES)}, got {state!r}")
            where.append("state = ?")
            values.append(state)
        if sweep is not None:
            if not sql("SELECT 1 FROM sweeps WHERE sweep_id = ?", broker, params=[sweep]).num_rows:
                raise BadInput(f"--sweep: no sweep {sweep!r}")
            where.append("sweep_id = ?")
            values.append(sweep)
        if node is not None:
            if not sql("SELECT 1 FROM nodes WHERE node = ?", broker, params=[node]).num_rows:
                raise BadInput(f"--node: no node {node!r} has joined")
            where.append("node = ?")
            values.append(node)
        if limit < 1:
            raise BadInput(f"--limit: expected >= 1, got {limit}")
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        table = sql(f"""
            WITH j AS (SELECT * FROM jobs {cond} ORDER BY submitted_seq DESC LIMIT ?),
            last AS (SELECT m.job_id, max(m.seq) AS seq,
                            max(m.seq) FILTER (WHERE m.kind = 'progress') AS step_seq
                     FROM metrics m WHERE m.kind IN ('progress', 'final')
                     AND m.job_id IN (SELECT job_id FROM j) GROUP BY m.job_id),
            -- the final metrics once it has completed, else the last it reported
            shown AS (SELECT m.job_id,
                      string_agg(m.name || '=' || CAST(round(m.value, 4) AS VARCHAR), ' '
                                 ORDER BY m.name) AS metrics
                      FROM metrics m JOIN last l ON m.job_id = l.job_id AND m.seq = l.seq
                      GROUP BY m.job_id),
            steps AS (SELECT m.job_id, any_value(m.step) AS step
                      FROM metrics m JOIN last l ON m.job_id = l.job_id AND m.seq = l.step_seq
                      GROUP BY m.job_id)
            SELECT j.job_id AS id, j.name, j.state,
                CASE WHEN j.state = 'queued' THEN NULL ELSE j.node END AS node,
                j.attempts AS try,
                round(CASE WHEN j.started_at IS NULL OR j.state IN ('queued', 'leased') THEN NULL
                      ELSE coalesce(j.finished_at, epoch(current_timestamp)) - j.started_at
                      END, 1) AS elapsed_s,
                t.step, s.metrics
            FROM j LEFT JOIN shown s USING (job_id) LEFT JOIN steps t USING (job_id)
            ORDER BY j.submitted_seq DESC""", broker,
            params=[*values, int(limit)])
        print_table(table, "json" if as_json else "table")

    @app.command()
    def pull(job: str = typer.Argument(..., help="a job id"),
             to: Optional[Path] = typer.Option(None, "--to", help="where (default ./JOB)"),
             checkpoint: bool = typer.Option(False, "--checkpoint",
                                             help="also its latest stored checkpoint, into TO/checkpoints"),
             broker: Optional[str] = broker_opt) -> None:
        """A job's outputs (`evo.artifact`, `--output`) from the broker's store, wherever it
        ran: each at its path in the job's folder under TO (one from elsewhere under its name)."""
        from evo.client import Client

        if not sql("SELECT 1 FROM jobs WHERE job_id = ?", broker, params=[job]).num_rows:
            raise BadInput(f"no job {job!r}")
        rows = sql("SELECT type, payload ->> '$.outputs' AS outputs, payload ->> '$.digest' AS "
                   "digest FROM events WHERE job_id = ? AND type IN ('JobCompleted', "
                   "'Checkpointed') ORDER BY seq", broker, params=[job]).to_pylist()
        outputs: dict[str, str] = {}
        for r in rows:
            if r["type"] == "JobCompleted":
                outputs = _j(r["outputs"]) or {}
        stored = [r["digest"] for r in rows if r["type"] == "Checkpointed" and r["digest"]]
        wanted = [(digest, "") for digest in outputs.values()]
        if checkpoint and stored:
            wanted.append((stored[-1], "checkpoints"))
        if not wanted:
            typer.echo(f"{job} has no outputs in the store" + (" and no stored checkpoint"
                       if checkpoint else "") + ": a job names them with evo.artifact(path) "
                       "or `evo submit --output GLOB`", err=True)
            raise typer.Exit(1)
        dest = (to or Path(job)).expanduser()
        with Client(broker) as c:
            for digest, under in wanted:
                for path in c.fetch_tree(digest, dest / under if under else dest):
                    typer.echo(path)

    @app.command()
    def show(job: str = typer.Argument(..., help="a job id"),
             as_json: bool = typer.Option(False, "--json", help="one JSON document"),
             broker: Optional[str] = broker_opt) -> None:
        """One job in full: spec, every attempt (node, times, exit, error), checkpoints, final
        metrics, and the fingerprints of its code and data."""
        rows = sql("SELECT * FROM jobs WHERE job_id = ?", broker, params=[job]).to_pylist()
        if not rows:
            raise BadInput(f"no job {job!r}")
        row = rows[0]
        spec = _j(row["spec"])
        attempts = sql(
            "SELECT attempt, node, leased_at, started_at, ended_at, outcome, exit_code, error, "
            "pid FROM attempts WHERE job_id = ? ORDER BY attempt, lease_epoch",
            broker, params=[job]).to_pylist()
        checkpoints = sql(
            "SELECT seq, payload ->> '$.path' AS path, payload ->> '$.step' AS step, "
            "payload ->> '$.digest' AS digest, payload ->> '$.size' AS size FROM events "
            "WHERE job_id = ? AND type = 'Checkpointed' ORDER BY seq", broker,
            params=[job]).to_pylist()
        done = sql("SELECT payload ->> '$.outputs' AS outputs FROM events WHERE job_id = ? AND "
                   "type = 'JobCompleted' ORDER BY seq DESC LIMIT 1", broker,
                   params=[job]).to_pylist()
        outputs = (_j(done[0]["outputs"]) or {}) if done else {}
        doc = {"job_id": job, "name": row["name"], "state": row["state"],
               "sweep_id": row["sweep_id"], "model_type": row["model_type"],
               "node": row["node"], "error": row["error"] or None,
               "retry_of": spec.get("retry_of"), "workdir": spec.get("workdir"),
               "command": spec.get("command"), "callable": spec.get("callable"),
               "params": _j(row["params"]), "seed": spec.get("seed"),
               "resources": spec.get("resources"), "metrics": _j(row["metrics"]),
               "code": spec.get("code") or {}, "data": spec.get("data") or {},
               "attempts": attempts, "checkpoints": checkpoints, "outputs": outputs}
        if as_json:
            typer.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
            return
        what = " ".join(doc["command"]) if doc["command"] else doc["callable"]
        typer.echo(f"{job} {doc['name'] or ''}: {doc['state']}"
                   + (f" (sweep {doc['sweep_id']})" if doc["sweep_id"] else "")
                   + (f", a retry of {doc['retry_of']}" if doc["retry_of"] else ""))
        for key in ("workdir", "model_type", "seed", "error"):
            if doc[key] is not None:
                typer.echo(f"  {key}: {doc[key]}")
        typer.echo(f"  runs: {what}")
        for key in ("params", "resources", "metrics", "code", "data"):
            if doc[key]:
                typer.echo(f"  {key}: {json.dumps(doc[key], sort_keys=True)}")
        for a in attempts:
            took = (f"{a['ended_at'] - a['started_at']:.1f}s" if a["ended_at"] and a["started_at"]
                    else "-")
            typer.echo(f"  attempt {a['attempt']} on {a['node']}: {a['outcome'] or 'running'} "
                       f"after {took}" + (f", exit {a['exit_code']}" if a["exit_code"] is not None
                                          else "")
                       + (f": {a['error']}" if a["error"] else ""))
        for c in checkpoints:
            kept = (f", {int(c['size'] or 0):,} bytes in the store" if c["digest"] else
                    ", not stored")
            typer.echo(f"  checkpoint {c['path']} (step {c['step']}{kept})")
        if outputs:
            typer.echo(f"  outputs ({len(outputs)}, `evo pull {job}`): {', '.join(sorted(outputs))}")
