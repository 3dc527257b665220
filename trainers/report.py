"""`evo report SWEEP --out DIR`: the deliverables of a comparison, from the projections alone.

Everything comes from what the jobs reported (JobCompleted metrics and artifacts, Progress per
season), so a report can be made on any machine that has the log, long after the nodes are
gone. Written:

- ``experiments/<job>.json`` and ``experiments/<job>.csv``: one experiment, overall and per season
- ``comparison.csv``: one row per experiment, parameters and metrics
- ``comparison.tex``: the same as a booktabs table, the best value of each metric in bold
- ``roc.pdf`` and ``calibration.pdf``: curves of the top experiments (at most 12), colour by
  model, line style by calibration, legend outside the axes, forecasts per bin below the
  calibration curves, TrueType fonts
- ``utilization.csv`` and ``utilization.tex``: per node, busy fraction, jobs, GPU use
- ``convergence.pdf`` (a learning sweep, ``method: tpe`` or a client study): each trial's value
  in the order it was asked, the best so far as a step line, pruned trials marked apart, and
  how many were pruned at each rung
- pruned trials are left out of the comparison (they did not finish); ``summary.yaml`` counts
  them, by rung
- ``summary.yaml``: the handoff: sweep, models trained, experiments, wall time, utilization per
  node, the best model with its metrics, and the path of every file above
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from evo.direction import mode_in_sweep
from evo.errors import BadInput, EvoError
from evo.projections.files import json_cell

METRICS = ("auc", "brier", "logloss", "roi")
MAX_CURVES = 12


_json = json_cell


def _label(row: dict, varying: list[str]) -> str:
    parts = [row["model_type"] or row["job_id"]]
    parts += [f"{k}={row['params'].get(k)}" for k in varying if k != "trainer"]
    return " ".join(str(p) for p in parts)


def latex_escape(s: str) -> str:
    out = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                 ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                 ("^", r"\textasciicircum{}")):
        out = out.replace(a, b)
    return out


def latex_table(header: list[str], rows: list[list[str]], bold: set[tuple[int, int]],
                caption: str, label: str, align: str) -> str:
    lines = [r"% Needs \usepackage{booktabs} (for \toprule, \midrule, \bottomrule).",
             r"\begin{table}[ht]", r"\centering", f"\\caption{{{latex_escape(caption)}}}",
             f"\\label{{{label}}}", f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        cells = [f"\\textbf{{{latex_escape(c)}}}" if (i, j) in bold else latex_escape(c)
                 for j, c in enumerate(row)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_report(sweep: str, sql: Callable, out: Path) -> tuple[list[Path], list[str]]:
    """The files written, and what could not be drawn and why (no empty figures)."""
    rows = sql("SELECT job_id, model_type, state, node, params, metrics, artifacts, "
               "started_at, finished_at FROM jobs WHERE sweep_id = ? ORDER BY submitted_seq",
               [sweep]).to_pylist()
    if not rows:
        raise BadInput(f"no sweep {sweep!r} in the projections (see `evo sql \"SELECT * FROM sweeps\"`)")
    done = [r for r in rows if r["state"] == "completed"]
    if not done:
        raise EvoError(f"sweep {sweep}: no completed experiment to report on")
    for r in done:
        for k in ("params", "metrics", "artifacts"):
            r[k] = _json(r[k]) or {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiments").mkdir(exist_ok=True)
    written: list[Path] = []
    keys = sorted({k for r in done for k in r["params"]})
    varying = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in done}) > 1]
    found = sql("SELECT name, spec FROM sweeps WHERE sweep_id = ?", [sweep]).to_pylist()
    spec = (_json(found[0]["spec"]) or {}) if found else {}
    title = f"{found[0]['name']} ({sweep})" if found and found[0]["name"] else sweep
    # the comparison's metrics: the sweep's own first, then the built-in trainers', else
    # whatever the jobs reported
    reported = {m for r in done for m in r["metrics"]}
    metrics = [m for m in METRICS if m in reported] or sorted(reported)
    if spec.get("metric") in reported:
        metrics = [spec["metric"], *(m for m in metrics if m != spec["metric"])]
    missing: list[str] = []
    if not metrics:
        missing.append("no completed experiment reported a metric: the comparison lists only "
                       "parameters (a job reports with evo.report or evo.result, or returns "
                       "a dict)")

    # per experiment
    for r in done:
        per_season = _json(r["artifacts"].get("per_season", "[]")) or []
        doc = {"job_id": r["job_id"], "sweep_id": sweep, "model_type": r["model_type"],
               "node": r["node"], "params": r["params"], "metrics": r["metrics"],
               "duration_s": (r["finished_at"] or 0) - (r["started_at"] or 0),
               "data_sha256": r["artifacts"].get("data_sha256"), "per_season": per_season}
        pj = out / "experiments" / f"{r['job_id']}.json"
        pj.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        pc = out / "experiments" / f"{r['job_id']}.csv"
        with open(pc, "w", newline="") as f:
            cols = ["season", *metrics, "bets", "n"]
            w = csv.writer(f, lineterminator="\n")
            w.writerow(cols)
            for s in per_season:
                w.writerow([s.get(c) for c in cols])
            w.writerow(["overall", *(r["metrics"].get(c) for c in metrics),
                        r["metrics"].get("bets"), r["metrics"].get("n_test")])
        written += [pj, pc]

    # comparison, best first by the sweep's metric (else the first), in its direction
    first = metrics[0] if metrics else None
    if first:
        sign = -1 if mode_in_sweep(first, spec) == "max" else 1
        # ties keep submit order (the rows come in it): the earliest, as the desk's best job
        done.sort(key=lambda r: (first not in r["metrics"], sign * r["metrics"].get(first, 0.0)))
    comp = out / "comparison.csv"
    with open(comp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["job_id", "model_type", *varying, *metrics, "node"])
        for r in done:
            w.writerow([r["job_id"], r["model_type"], *(r["params"].get(k) for k in varying),
                        *(r["metrics"].get(m) for m in metrics), r["node"]])
    written.append(comp)

    shown = done[:40]  # a dissertation table, not the whole grid
    header = ["Model", *[k for k in varying if k != "trainer"],
              *[{"auc": "AUC", "brier": "Brier", "logloss": "Log loss", "roi": "ROI"}.get(m, m)
                for m in metrics]]
    table_rows, bold = [], set()
    offset = 1 + len([k for k in varying if k != "trainer"])
    for i, r in enumerate(shown):
        cells = [r["model_type"] or "", *[str(r["params"].get(k)) for k in varying if k != "trainer"]]
        for m in metrics:
            v = r["metrics"].get(m)
            cells.append("" if v is None else (f"{100 * v:.1f}\\%" if m == "roi" else f"{v:.4f}"))
        table_rows.append([c.replace("\\%", "%") for c in cells])
    for j, m in enumerate(metrics):
        vals = [r["metrics"].get(m) for r in shown]
        present = [v for v in vals if v is not None]
        if present:
            best = min(present) if mode_in_sweep(m, spec) == "min" else max(present)
            for i, v in enumerate(vals):
                if v == best:
                    bold.add((i, offset + j))
    tex = out / "comparison.tex"
    tex.write_text(latex_table(header, table_rows, bold,
                               f"Walk-forward comparison, sweep {title}"
                               + (f" (top {len(shown)} of {len(done)})" if len(done) > len(shown) else ""),
                               f"tab:{sweep}", "l" * offset + "r" * len(metrics)))
    written.append(tex)
    plots = _plots(done[:MAX_CURVES], varying, out)
    written += [p for p in plots if isinstance(p, Path)]
    missing += [p for p in plots if isinstance(p, str)]
    from evo.sweeps.summary import learning_summary

    learned = learning_summary(sweep, spec, sql)
    if learned is not None:
        written.append(_convergence(learned, title, out / "convergence.pdf"))
    util_paths, util = _utilization(sweep, title, sql, out)
    written += util_paths
    written.append(_summary(sweep, found[0] if found else {}, spec, rows, done, util, sql, out,
                            written, learned))
    return written, missing


def _convergence(learned: dict, title: str, path: Path) -> Path:
    """Value per trial in asking order, the best so far, pruned trials apart; rungs below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = learned["convergence"]
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        done = [(n, v) for n, _, state, v, _ in curve if state == "completed" and v is not None]
        if done:
            ax.scatter([n for n, _ in done], [v for _, v in done], s=12, color="tab:blue",
                       label="completed trial")
        best = [(n, b) for n, _, _, _, b in curve if b is not None]
        if best:
            ax.step([n for n, _ in best], [b for _, b in best], where="post", color="tab:red",
                    lw=1.5, label=f"best so far ({learned['mode']})")
        pruned = [n for n, _, state, _, _ in curve if state == "pruned"]
        if pruned:
            lo = min((v for _, v in done), default=0.0)
            ax.scatter(pruned, [lo] * len(pruned), marker="|", color="grey", s=40,
                       label=f"pruned trial ({len(pruned)})")
        rungs = ", ".join(f"{n} at resource {r}" for r, n in learned["pruned_at"].items())
        ax.set_title(f"Convergence, sweep {title}" + (f"\npruned: {rungs}" if rungs else ""),
                     fontsize=10)
        ax.set_xlabel("Trial (in the order asked)")
        ax.set_ylabel(learned["metric"])
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
        fig.savefig(path, bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return path


def _summary(sweep: str, found: dict, spec: dict, rows: list[dict], done: list[dict],
             util: list[dict], sql: Callable, out: Path, written: list[Path],
             learned: dict | None = None) -> Path:
    """summary.yaml, the handoff: what ran, where, how long, the best model, every file."""
    import yaml

    best = sql("SELECT best_job FROM sweeps WHERE sweep_id = ?", [sweep]).to_pylist()
    best_id = best[0]["best_job"] if best else None
    best_row = next((r for r in done if r["job_id"] == best_id), None)
    starts = [r["started_at"] for r in rows if r["started_at"] is not None]  # every run, failed
    ends = [r["finished_at"] for r in rows if r["finished_at"] is not None]  # ones included
    models = list(dict.fromkeys(r["model_type"] for r in done if r["model_type"]))
    states = [r["state"] for r in rows]
    doc = {
        "sweep_id": sweep,
        "name": found.get("name") or "",
        "metric": spec.get("metric"),
        "mode": mode_in_sweep(spec["metric"], spec) if spec.get("metric") else None,
        "models_trained": models,
        "experiments": {"total": len(rows), **{s: states.count(s) for s in
                                               ("completed", "failed", "cancelled",
                                                "pruned")}},
        # from the first experiment's start to the last one's end
        "wall_time_s": round(max(ends) - min(starts), 3) if starts and ends else None,
        "utilization": {u["node"]: {
            "slots": u["slots"], "busy_fraction": _round(u["busy_fraction"]),
            "experiments": u["sweep_jobs"] or 0,
            "models": list(dict.fromkeys(r["model_type"] for r in done
                                         if r["node"] == u["node"] and r["model_type"])),
            "mean_cpu_percent": _round(u["mean_cpu"]),
            "mean_gpu_percent": _round(u["mean_gpu_util"])} for u in util if u["sweep_jobs"]},
        "best": None if best_row is None else {
            "job_id": best_id, "model_type": best_row["model_type"],
            "params": best_row["params"], "node": best_row["node"],
            "metrics": {k: v for k, v in best_row["metrics"].items()
                        if isinstance(v, (int, float))}},
        "deliverables": {str(p.relative_to(out)): str(p.resolve()) for p in written},
    }
    if learned is not None:
        doc["learning"] = {"method": spec.get("method"), "pruner": spec.get("pruner"),
                           "trials": learned["trials"], "pruned_at_resource":
                           learned["pruned_at"], "best_after_trial": {
                               n: b for n, _, _, _, b in learned["convergence"]
                               if b is not None}}
    path = out / "summary.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


def _plots(rows: list[dict], varying: list[str], out: Path) -> list[Path | str]:
    """The curve PDFs, or for each that has no curve to draw, why it was not drawn."""
    return [
        _curves(rows, varying, out / "roc.pdf", "roc", ("fpr", "tpr"), ("auc", "AUC", ".3f"),
                ("False positive rate", "True positive rate"),
                "ROC, walk-forward test seasons", marker=None),
        _curves(rows, varying, out / "calibration.pdf", "calibration_bins", ("mean_p", "freq"),
                ("brier", "Brier", ".4f"), ("Forecast probability", "Observed frequency"),
                "Calibration, walk-forward test seasons", marker="o", counts="count"),
    ]


# Line style by calibration method; colour by model (or by series when there is one model).
CALIBRATION_STYLES = {"none": "-", "platt": "--", "isotonic": ":"}
EXTRA_MARKERS = ("s", "^", "v", "D", "P", "X")


def series_styles(rows: list[dict]) -> list[dict]:
    """Colour, line style and marker of each row's curve: colour by model type, line style by
    calibration method, and a marker for further series that share both."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors + colormaps["Dark2"].colors  # type: ignore[attr-defined] # listed colormaps
    models = list(dict.fromkeys(r["model_type"] or "" for r in rows))
    seen: dict[tuple[str, str], int] = {}
    out = []
    for i, r in enumerate(rows):
        model = r["model_type"] or ""
        cal = str(r["params"].get("calibration", "none"))
        colour = palette[(models.index(model) if len(models) > 1 else i) % len(palette)]
        n = seen[(model, cal)] = seen.get((model, cal), -1) + 1
        out.append({"color": colour, "ls": CALIBRATION_STYLES.get(cal, "-."),
                    "extra_marker": EXTRA_MARKERS[(n - 1) % len(EXTRA_MARKERS)] if n else None})
    return out


def curve_figure(rows: list[dict], varying: list[str], artifact: str, xy: tuple[str, str],
                 metric: tuple[str, str, str], labels: tuple[str, str], title: str,
                 marker: str | None, counts: str | None = None):  # noqa: ANN201 - a Figure
    """A curve per experiment from one of its artifacts and the diagonal, the legend outside
    the axes; with ``counts``, the forecasts per bin in a panel below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(r, st) for r, st in zip(rows, series_styles(rows))
             if (_json(r["artifacts"].get(artifact, "{}")) or {}).get(xy[0])]
    height = max(4.5, 1.5 + 0.22 * len(drawn))  # room for a legend row per series
    if counts:
        fig, (ax, below) = plt.subplots(2, 1, figsize=(8.5, height + 1.2), sharex=True,
                                        gridspec_kw={"height_ratios": (4, 1)})
    else:
        fig, ax = plt.subplots(figsize=(8.5, height))
        below = None
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="_diagonal")
    key, name, fmt = metric
    for r, st in drawn:
        curve = _json(r["artifacts"][artifact])
        v = r["metrics"].get(key)
        ax.plot(curve[xy[0]], curve[xy[1]], color=st["color"], ls=st["ls"], lw=1.3,
                marker=st["extra_marker"] or marker, ms=3.5,
                label=_label(r, varying) + (f" ({name} {v:{fmt}})" if v is not None else ""))
        if below is not None and curve.get(counts):
            below.plot(curve[xy[0]], curve[counts], color=st["color"], ls=st["ls"], lw=1.0,
                       marker=st["extra_marker"] or marker, ms=2.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    (below if below is not None else ax).set_xlabel(labels[0])
    if below is not None:
        below.set_ylabel("Forecasts\nper bin")
        below.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7,
              frameon=False)
    return fig


def _curves(rows: list[dict], varying: list[str], path: Path, artifact: str,
            xy: tuple[str, str], metric: tuple[str, str, str], labels: tuple[str, str],
            title: str, marker: str | None, counts: str | None = None) -> Path | str:
    """One PDF page of curves (see curve_figure), or why there is none to draw."""
    if not any((_json(r["artifacts"].get(artifact, "{}")) or {}).get(xy[0]) for r in rows):
        return (f"{path.name} not drawn: no experiment returned a {artifact!r} artifact (the "
                f"built-in trainers do; a job may return its own as a JSON string with "
                f"{xy[0]!r} and {xy[1]!r} lists)")
    import matplotlib
    import matplotlib.pyplot as plt

    # TrueType fonts: text stays text in the PDF (journals and thesis offices ask for it)
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        fig = curve_figure(rows, varying, artifact, xy, metric, labels, title, marker, counts)
        fig.savefig(path, bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return path


def _utilization(sweep: str, title: str, sql: Callable, out: Path) -> tuple[list[Path], list[dict]]:
    rows = sql(
        "SELECT u.node, u.slots, u.busy_fraction, u.idle_slot_s, u.jobs_completed, "
        "u.mean_cpu, u.mean_gpu_util, u.mean_vram_used_gb, s.n AS sweep_jobs "
        "FROM utilization_summary u LEFT JOIN (SELECT node, count(*) AS n FROM jobs "
        "WHERE sweep_id = ? AND state = 'completed' GROUP BY node) s USING (node) "
        "ORDER BY u.node", [sweep]).to_pylist()
    p = out / "utilization.csv"
    cols = ["node", "slots", "busy_fraction", "idle_slot_s", "jobs_completed", "sweep_jobs",
            "mean_cpu", "mean_gpu_util", "mean_vram_used_gb"]
    with open(p, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c) for c in cols])
    fmt = lambda v, d=2: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    t = out / "utilization.tex"
    t.write_text(latex_table(
        ["Node", "Slots", "Busy", "Jobs (sweep)", "Mean CPU %", "Mean GPU %"],
        [[r["node"], str(r["slots"]), fmt(r["busy_fraction"]), str(r["sweep_jobs"] or 0),
          fmt(r["mean_cpu"], 1), fmt(r["mean_gpu_util"], 1)] for r in rows], set(),
        f"Utilization per node, sweep {title}", f"tab:{sweep}-util", "lrrrrr"))
    return [p, t], rows
