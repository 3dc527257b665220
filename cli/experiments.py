"""`evo sweep`, `evo data`, `evo report`, `evo audit`: the experiment side of the CLI.

Registered on the main typer app by ``register`` (app.py passes its query helpers in, so this
module never imports app.py, which may be running as ``__main__``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from evo.errors import BadInput, EvoError
from evo.events.lifecycle import (CANCELLED, COMPLETED, FAILED, PRUNED, RUNNING, TERMINAL,
                                  state_after)
from evo.projections.files import json_cell
from evo.home import evo_home


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def register(app: typer.Typer, sql: Callable, print_table: Callable, client: Callable,
             broker_opt) -> None:  # noqa: ANN001
    def leaderboard_table(sweep: str, metric: str, top: int, broker: str | None,  # noqa: ANN202
                          pruned: bool = False, mode: str = "max"):
        # only the parameters that vary make useful columns (one query for all of them)
        rows = ("jobs WHERE sweep_id = ? AND state IN ('completed', 'pruned')" if pruned
                else "leaderboard WHERE sweep_id = ?")  # the trials the table shows
        varying = [r["k"] for r in sql(
            "SELECT k, count(DISTINCT params ->> k) AS n FROM (SELECT params, "
            f"unnest(json_keys(params)) AS k FROM {rows}) "
            "GROUP BY k ORDER BY k", broker, params=[sweep]).to_pylist() if r["n"] > 1]
        cols = "".join(f", params ->> ? AS {_ident(k)}" for k in varying)
        if not pruned:
            return sql(f"SELECT rank, job_id, model_type, value AS {_ident(metric)}{cols} "
                       "FROM leaderboard WHERE sweep_id = ? AND metric = ? ORDER BY rank LIMIT ?",
                       broker, params=[*varying, sweep, metric, int(top)])
        # with the pruned trials, each at the last value it reported (the one its sampler got)
        order = "value" if mode == "min" else "-value"
        return sql(
            f"WITH t AS (SELECT job_id, model_type, 'completed' AS state, value, params "
            f"FROM leaderboard WHERE sweep_id = ? AND metric = ? UNION ALL "
            f"SELECT j.job_id, j.model_type, 'pruned', arg_max(m.value, m.seq), j.params "
            f"FROM jobs j JOIN metrics m USING (job_id) WHERE j.sweep_id = ? AND "
            f"j.state = 'pruned' AND m.kind = 'progress' AND m.name = ? "
            f"GROUP BY j.job_id, j.model_type, j.params, j.submitted_seq) "
            f"SELECT rank() OVER (ORDER BY {order}, job_id) AS rank, job_id, model_type, state, "
            f"value AS {_ident(metric)}{cols} FROM t ORDER BY rank LIMIT ?",
            broker, params=[sweep, metric, sweep, metric, *varying, int(top)])

    @app.command()
    def leaderboard(sweep: str = typer.Argument(..., help="sweep id"),
                    metric: Optional[str] = typer.Option(
                        None, "--metric", help="default: the sweep's metric (ranked by its mode)"),
                    top: int = typer.Option(10, "--top"),
                    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
                    pruned: bool = typer.Option(
                        False, "--pruned", help="a learning sweep's pruned trials too, each at "
                        "the last value it reported"),
                    broker: Optional[str] = broker_opt) -> None:
        """The best configurations of a sweep by one metric, each varying parameter a column.
        For a learning sweep, then: its trials, the pruned ones by rung, and its best value
        over the trials."""
        from evo.direction import mode_in_sweep
        from evo.sweeps.summary import describe, learning_summary

        rows = sql("SELECT spec FROM sweeps WHERE sweep_id = ?", broker, params=[sweep]).to_pylist()
        if not rows:
            raise BadInput(f"no sweep {sweep!r} (see `evo sql \"SELECT sweep_id, name FROM sweeps\"`)")
        spec = rows[0]["spec"]
        spec = json_cell(spec) or {}
        metrics = [r["metric"] for r in sql(
            "SELECT DISTINCT metric FROM leaderboard WHERE sweep_id = ? ORDER BY 1",
            broker, params=[sweep]).to_pylist()]
        if not metrics:
            raise EvoError(f"sweep {sweep}: no completed job reported a metric")
        if metric is None:
            own = spec.get("metric")
            metric = own if own in metrics else ("auc" if "auc" in metrics else metrics[0])
        if metric not in metrics:
            raise BadInput(f"--metric: sweep {sweep} has no metric {metric!r} "
                           f"(it has {', '.join(metrics)})")
        table = leaderboard_table(sweep, str(metric), top, broker, pruned,
                                  mode_in_sweep(str(metric), spec))
        print_table(table, fmt, title=f"{sweep}: top {top} by {metric}")
        summary = learning_summary(sweep, spec, lambda q, ps: sql(q, broker, params=ps))
        if summary is not None and fmt == "table":
            for line in describe(summary):
                typer.echo(line)

    @app.command()
    def sweep(spec_file: Path = typer.Argument(..., help="sweep spec (YAML)"),
              wait: bool = typer.Option(False, "--wait", help="show progress; end with the leaderboard"),
              plan: bool = typer.Option(False, "--plan", help="print the execution plan; submit nothing"),
              top: int = typer.Option(10, "--top", help="leaderboard rows with --wait"),
              resume: bool = typer.Option(
                  False, "--resume", help="add to the last sweep of this name only the "
                  "configurations it has not completed (nor is running)"),
              broker: Optional[str] = broker_opt) -> None:
        """Run a grid or random sweep; prints the sweep id."""
        from evo.sweeps import job_specs, load_sweep, record
        from evo.sweeps.spec import learning

        spec = load_sweep(spec_file)
        jobs = job_specs(spec)
        if plan:  # a learning sweep's trials are its template, samples times, as far as a plan goes
            _plan(spec, jobs * (spec.samples or 1) if learning(spec) else jobs, client,
                  broker)
            return
        into = ""
        if resume and learning(spec):
            raise BadInput(f"--resume: {spec_file}: a `method: tpe` sweep asks for its trials "
                           "from its own results and goes on by itself after a restart; "
                           "submit it again for a new study")
        if resume:
            into, jobs = _missing(spec.name, jobs, sql, broker)
            if not jobs:
                typer.echo(into)
                typer.echo(f"sweep {into} ({spec.name}) has every configuration completed or "
                           "under way: nothing to resume", err=True)
                return
        with client(broker) as c:
            reply = c.submit_sweep(spec.name, jobs, record(spec, spec_file), into=into)
        if resume:
            typer.echo(f"resuming {reply.sweep_id}: {len(jobs)} configuration(s) not completed",
                       err=True)
        if reply.warning:
            typer.echo(f"warning: {reply.warning}", err=True)
        typer.echo(reply.sweep_id)
        if not wait:
            return
        done = _follow(reply, client, broker, (spec.samples or 0) if learning(spec) else len(jobs))
        metric = spec.metric
        table = leaderboard_table(reply.sweep_id, metric, top, broker)
        print_table(table, "table", title=f"{reply.sweep_id} ({spec.name}): top {top} by {metric}")
        if learning(spec):
            from evo.sweeps.summary import describe, learning_summary

            recorded = record(spec, spec_file)
            summary = learning_summary(reply.sweep_id, recorded,
                                       lambda q, ps: sql(q, broker, params=ps))
            for line in describe(summary) if summary else []:
                typer.echo(line)
        if not done.get("completed"):
            raise EvoError(f"sweep {reply.sweep_id}: no job completed ({done})")
        best = _best(reply.sweep_id, sql, broker)
        if best is None:
            got = sorted({r["metric"] for r in sql(
                "SELECT DISTINCT m.name AS metric FROM metrics m JOIN jobs j USING (job_id) "
                "WHERE j.sweep_id = ? AND m.kind = 'final'",
                broker, params=[reply.sweep_id]).to_pylist()})
            raise EvoError(f"sweep {reply.sweep_id}: no completed job reported the sweep's "
                           f"metric {metric!r} (they reported: {', '.join(got) or 'nothing'}); "
                           "no best configuration. Set `metric:` in the sweep file, or report "
                           "it with evo.report / evo.result")
        out = evo_home() / "sweeps" / reply.sweep_id / "best.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(best, indent=2, sort_keys=True) + "\n")
        typer.echo(f"best: {best['job_id']} {metric}={best['metrics'].get(metric)} "
                   f"params={json.dumps(best['params'], sort_keys=True)}")
        typer.echo(f"best configuration written to {out}")

    @app.command()
    def data(kind: str = typer.Argument(..., help="games: the synthetic games dataset"),
             out: Path = typer.Option(..., "--out", help="CSV file to write"),
             rows: int = typer.Option(5000, "--rows"),
             seed: int = typer.Option(2024, "--seed")) -> None:
        """Write a built-in dataset as CSV; prints its sha256."""
        from evo.trainers.data import games, to_csv

        if kind != "games":
            raise BadInput(f"evo data {kind!r}: unknown dataset (expected games)")
        if rows < 1:
            raise BadInput(f"--rows: expected >= 1, got {rows}")
        raw = to_csv(games(rows=rows, seed=seed))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(raw)
        import hashlib

        typer.echo(f"{hashlib.sha256(raw).hexdigest()}  {out}")

    @app.command()
    def report(sweep: str = typer.Argument(..., help="sweep id"),
               out: Path = typer.Option(..., "--out", help="folder for the report"),
               broker: Optional[str] = broker_opt) -> None:
        """Per-experiment JSON/CSV, a comparison CSV and LaTeX table, ROC and calibration PDFs,
        and utilization per node."""
        from evo.trainers.report import write_report

        paths, missing = write_report(sweep, lambda q, ps=(): sql(q, broker, params=ps), out)
        for p in paths:
            typer.echo(str(p))
        for why in missing:
            typer.echo(f"note: {why}", err=True)

    @app.command()
    def audit(job: str = typer.Argument(..., help="a completed job's id, or a learning sweep's"),
              broker: Optional[str] = broker_opt) -> None:
        """Re-run a completed job from its recorded spec, data and seed; compare metrics. For a
        learning sweep: derive every suggestion and pruning decision again from the log.

        Exit 0 when every metric matches bit for bit and the data is unchanged (every
        decision matches), else 1."""
        if job.startswith("s") and job[1:].isdigit():
            _audit_sweep(job, client, broker)
            return
        from evo.trainers.audit import audit_job

        def manifest_of(digest: str):  # noqa: ANN202 - the stored manifest, or None
            import tempfile

            from evo.content import decode_manifest

            try:
                with client(broker) as c, tempfile.TemporaryDirectory() as tmp:
                    c.fetch(digest, Path(tmp) / "manifest")
                    return decode_manifest((Path(tmp) / "manifest").read_bytes())
            except (EvoError, OSError, ValueError):  # no broker, or not stored: not named
                return None

        ok, lines = audit_job(job, lambda q, ps=(): sql(q, broker, params=ps), manifest_of)
        for line in lines:
            typer.echo(line)
        if not ok:
            raise typer.Exit(1)


def _audit_sweep(sweep_id: str, client: Callable, broker: str | None) -> None:
    """`evo audit SWEEP`: the log from the broker, or from the files when none runs."""
    from evo.broker.audit import audit_sweep
    from evo.home import NoBroker

    try:
        with client(broker) as c:
            ok, lines = audit_sweep(c.read_all(1), sweep_id)
    except NoBroker:
        from evo.events.log import SegmentLog

        with SegmentLog(evo_home() / "log", readonly=True) as lg:
            ok, lines = audit_sweep(lg.read_from(1), sweep_id)
    for line in lines:
        typer.echo(line)
    if not ok:
        raise typer.Exit(1)


def _missing(name: str, jobs: list, sql: Callable, broker: str | None) -> tuple[str, list]:  # noqa: ANN001
    """The last sweep named ``name``, and those of ``jobs`` whose parameters none of its jobs
    completed or is running: a configuration is its sweep's name and its parameters."""
    rows = sql("SELECT sweep_id FROM sweeps WHERE name = ? "
               "ORDER BY submitted_at DESC, sweep_id DESC LIMIT 1", broker, params=[name]).to_pylist()
    if not rows:
        raise BadInput(f"--resume: no sweep named {name!r} to resume (submit it without --resume)")
    sweep = rows[0]["sweep_id"]
    seen = {json.dumps(json_cell(r["params"]), sort_keys=True)
            for r in sql("SELECT params FROM jobs WHERE sweep_id = ? AND state NOT IN (?, ?)",
                         broker, params=[sweep, FAILED, CANCELLED]).to_pylist()}
    return sweep, [j for j in jobs if json.dumps(j.params, sort_keys=True) not in seen]


def _follow(reply, client: Callable, broker: str | None, total: int) -> dict:  # noqa: ANN001
    """Follow the sweep's events with a progress bar (stderr) until SweepCompleted."""
    from collections import Counter

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    ids = set(reply.job_ids)
    states: dict[str, str] = {}
    console = Console(stderr=True)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn())
    with client(broker, timeout_s=30) as c, Progress(*cols, console=console,
                                                      transient=False) as bar:
        task = bar.add_task(reply.sweep_id, total=total, detail="")
        for ev in c.follow(reply.seq - len(ids) + 1, idle_s=0.5):  # its first job on
            name = type(ev).__name__
            if name == "SweepCompleted" and ev.sweep_id == reply.sweep_id:
                break
            jid = getattr(ev, "job_id", None)
            if name == "JobSubmitted" and ev.spec.sweep_id == reply.sweep_id:
                ids.add(jid)  # a learning sweep's trial, asked now
            after = state_after(ev) if jid in ids else None
            if jid is None or after is None:
                continue
            states[jid] = after
            count = Counter(states.values())
            bar.update(task, completed=sum(count[s] for s in TERMINAL),
                       detail=f"done {count[COMPLETED]} running {count[RUNNING]} "
                              f"failed {count[FAILED]}"
                              + (f" pruned {count[PRUNED]}" if count[PRUNED] else ""))
    count = Counter(states.values())
    return {s: count[s] for s in (COMPLETED, FAILED, CANCELLED, PRUNED)}


def _best(sweep_id: str, sql: Callable, broker: str | None) -> dict | None:
    rows = sql("SELECT best_job FROM sweeps WHERE sweep_id = ?", broker, params=[sweep_id]).to_pylist()
    if not rows or not rows[0]["best_job"]:
        return None
    job = rows[0]["best_job"]
    r = sql("SELECT job_id, model_type, params, metrics FROM jobs WHERE job_id = ?",
            broker, params=[job]).to_pylist()[0]
    return {"sweep_id": sweep_id, "job_id": job, "model_type": r["model_type"],
            "params": json_cell(r["params"]), "metrics": json_cell(r["metrics"])}


def _plan(spec, jobs: list, client: Callable, broker: str | None) -> None:  # noqa: ANN001
    """Where the routing rules would send each configuration now, how long each may take on
    each node (the broker's estimates, learned from jobs like it), and when all would be done."""
    from collections import Counter, defaultdict

    from evo.broker import protocol as p
    from evo.broker.cluster import load_cluster
    from evo.broker.estimates import makespan
    from evo.broker.scheduler import prefers
    from evo.home import NoBroker

    cluster = load_cluster(None, evo_home())
    nodes: list[dict] = []
    est: list[dict] = [{} for _ in jobs]
    try:
        with client(broker) as c:
            reply = c.request(p.Estimate(specs=jobs))
            nodes, est = reply.nodes, reply.jobs
    except NoBroker:
        pass
    typer.echo(f"sweep {spec.name}: {len(jobs)} configurations ({spec.method}), "
               f"metric {spec.metric}")
    by_type = Counter(j.model_type or "-" for j in jobs)
    may: dict[str, list[str]] = {}  # model type -> the nodes the routing sends it to now
    for mt, n in sorted(by_type.items()):
        rule = cluster.rule_for(mt) if mt != "-" else None
        preferred = [x["node"] for x in nodes if rule and prefers(rule, x["labels"])]
        if rule is None:
            where = ", ".join(x["node"] for x in nodes) or "any node (none present now)"
            why = "no routing rule: any node that fits"
            may[mt] = [x["node"] for x in nodes]
        elif preferred:
            where, why = ", ".join(preferred), f"preferred ({rule.reason})"
            may[mt] = preferred
        else:
            others = ", ".join(x["node"] for x in nodes) or "none present now"
            where = f"fallback: {others}"
            why = f"no node labelled {'/'.join(rule.route_to)} present: any node that fits " \
                  f"takes them now (once one joins, others wait up to {cluster.wait_limit(rule):g}s)"
            may[mt] = [x["node"] for x in nodes]
        typer.echo(f"  {mt:<14} {n:>5} jobs -> {where}   [{why}]")
    # per node: the mean estimate of the jobs it may take, and what it is learned from
    per_node: dict[str, list[float]] = defaultdict(list)
    basis: dict[str, Counter] = defaultdict(Counter)
    unknown = 0
    batch: list[dict[str, float]] = []
    for job, row in zip(jobs, est):
        allowed = may.get(job.model_type or "-", [])
        known = {n: v[0] for n, v in row.items() if v is not None and n in allowed}
        for n, v in row.items():
            if v is not None and n in allowed:
                per_node[n].append(v[0])
                basis[n][v[1]] += 1
        if known:
            batch.append(known)
        else:
            unknown += 1
    for x in nodes:
        times = per_node.get(x["node"])
        if times:
            src, _ = basis[x["node"]].most_common(1)[0]
            typer.echo(f"  {x['node']:<14} ~{sum(times) / len(times):.1f}s a job, {x['slots']} "
                       f"slot(s) [{src}]")
        else:
            typer.echo(f"  {x['node']:<14} no estimate (nothing like these ran yet)")
    slots = sum(x["slots"] for x in nodes)
    if not slots:
        typer.echo("no node is present now: nothing would start until one joins")
    elif batch:
        end, busy = makespan(batch, {x["node"]: x["slots"] for x in nodes})
        share = ", ".join(f"{n} {s:.0f}" for n, s in busy.items() if s)
        left = f"; {unknown} job(s) with no estimate not counted" if unknown else ""
        typer.echo(f"estimated makespan: ~{end:.0f}s on {slots} slot(s) (slot-seconds: "
                   f"{share}){left}")
    else:
        typer.echo("estimated duration: unknown (nothing like these ran yet)")
    sys.stdout.flush()
