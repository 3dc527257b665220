"""Sweeps end to end: spec checks, the desk's SweepCompleted, a real broker and node, report, audit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from evo.broker import protocol as p
from evo.broker.desk import Desk
from evo.client import Client
from evo.sweeps import configurations, job_specs, load_sweep
from evo.errors import BadInput
from evo.events.schema import JobSpec
from tests.conftest import ROOT, run_evo
from tests.test_nodes import cluster, of, wait_for  # noqa: F401 - the fixture is used by name


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_packaged_specs_expand_to_the_documented_sizes():
    grid = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_grid.yaml")
    jobs = job_specs(grid)
    assert len(jobs) == 324 and {j.model_type for j in jobs} == {"XGBoost"}
    assert len({json.dumps(j.params, sort_keys=True) for j in jobs}) == 324
    ens = job_specs(load_sweep(ROOT / "configs" / "ensemble.yaml"))
    assert len(ens) == 12
    assert {(j.model_type, j.params["calibration"]) for j in ens} == {
        (m, c) for m in ("GLM", "XGBoost", "RandomForest", "MLP")
        for c in ("none", "platt", "isotonic")}
    assert all(j.callable.startswith("evo.trainers.experiment:") and j.seed == 42 for j in ens)
    assert all(len(j.data) == 1 and len(next(iter(j.data.values()))) == 64 for j in ens)
    assert len(job_specs(load_sweep(ROOT / "configs" / "sweeps" / "quick.yaml"))) == 12


def test_random_search_is_seeded_and_commands_fill_placeholders(tmp_path):
    text = """
name: r
command: [python, train.py, --lr, "{lr}", --depth, "{depth}", --seed, "{seed}"]
method: random
samples: 5
seed: 3
space:
  lr: {low: 0.001, high: 0.1, log: true}
  depth: [3, 5, 7]
"""
    a = job_specs(load_sweep(write(tmp_path, text)))
    b = job_specs(load_sweep(write(tmp_path, text)))
    assert [j.command for j in a] == [j.command for j in b] and len(a) == 5
    for j in a:
        assert j.command[-1] == "3" and 0.001 <= float(j.command[3]) <= 0.1
        assert j.command[5] in ("3", "5", "7")
    other = load_sweep(write(tmp_path, text.replace("seed: 3", "seed: 4")))
    assert configurations(other) != configurations(load_sweep(write(tmp_path, text)))


def test_trials_start_in_the_order_written_or_longest_expected_first_when_asked(tmp_path):
    grid = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_grid.yaml")
    as_written = [(j.params["max_depth"], j.params["n_estimators"]) for j in job_specs(grid)]
    assert as_written[0] == (3, 100) and as_written[-1] == (9, 500)  # the default
    grid.order = "longest_first"
    costs = [j.params["n_estimators"] * j.params["max_depth"] for j in job_specs(grid)]
    assert costs == sorted(costs, reverse=True) and costs[0] == 500 * 9 and costs[-1] == 100 * 3
    first = job_specs(grid)[:2]  # ties keep the order written
    assert [j.params["learning_rate"] for j in first] == [0.01, 0.01]
    assert [j.params["subsample"] for j in first] == [0.7, 0.7]
    assert [j.params["colsample_bytree"] for j in first] == [0.7, 0.8]
    written = load_sweep(write(tmp_path, "name: w\ntrainer: XGBoost\norder: written\n"
                                         "space: {max_depth: [3, 9], n_estimators: [100, 500]}"))
    assert [(c["max_depth"], c["n_estimators"]) for c in configurations(written)] == [
        (3, 100), (3, 500), (9, 100), (9, 500)]
    cmd = load_sweep(write(tmp_path, "name: c\ncommand: [x, '{a}', '{b}']\ncost: [a, b]\n"
                                     "order: longest_first\nspace: {a: [1, 3], b: [5, 2]}"))
    assert [j.command for j in job_specs(cmd)] == [["x", "3", "5"], ["x", "3", "2"],
                                                   ["x", "1", "5"], ["x", "1", "2"]]
    plain = load_sweep(write(tmp_path, "name: p\ncommand: [x, '{a}']\nspace: {a: [1, 3]}"))
    assert [c["a"] for c in configurations(plain)] == [1, 3]  # no cost known: as written


@pytest.mark.parametrize("body, message", [
    ("trainer: SVM\nspace: {C: [1]}", r"\$.trainer: unknown trainer 'SVM' \(expected one of GLM"),
    ("trainer: XGBoost\nspace: {max_depth: [3, five]}",
     r"\$.space.max_depth\[1\]: XGBoost.max_depth: expected `int`, got 'five'"),
    ("trainer: XGBoost\nspace: {subsample: [0.5, 1.5]}",
     r"\$.space.subsample\[1\]: XGBoost.subsample: expected `float` <= 1.0, got 1.5"),
    ("trainer: XGBoost\nspace: {max_depth: []}", r"\$.space.max_depth: expected a non-empty list"),
    ("trainer: XGBoost\nspace: {}", r"\$.space: expected at least one parameter"),
    ("trainer: XGBoost\nspace: {depth: [3]}", r"\$.space.depth\[0\]: XGBoost has no parameter 'depth'"),
    ("trainer: GLM\nspace: {C: [1]}\nresources: {cpus: many}",
     r"Expected `float`, got `str` - at `\$.resources.cpus`"),
    ("command: [x, '{lr}']\nspace: {depth: [1]}", r"\$.command\[1\]: placeholder \{lr\} is not a parameter"),
    ("trainer: GLM\nspace: {C: [1]}\nmethod: random", r"\$.samples: expected a positive number"),
    ("trainer: GLM\nspace: {C: [1\n", r"not valid YAML"),
    ("space:\n  trainer: [GLM, Lasso]\n  calibration: [none]", r"\$.space.trainer\[1\]: unknown trainer 'Lasso'"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\ncost: [lr, trees]",
     r"\$.cost\[1\]: 'trees' is not a parameter \(expected one of lr\)"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\norder: longest_first", r"\$.order: longest_first needs `cost`"),
    # learning sweeps
    ("command: [x, '{lr}']\nspace: {lr: [1]}\npruner: asha", r"\$.pruner: only for `method: tpe`"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\nmethod: tpe", r"\$.samples: expected a positive number"),
    ("command: [x, '{lr}']\nspace: {lr: {low: 1, high: 2}}\nmethod: tpe\nsamples: 5\n"
     "pruner: {type: asha, reduction_factor: 1}", r"\$.pruner.reduction_factor: expected >= 2"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\nmethod: tpe\nsamples: 5\npruner: hyperband",
     r"Expected `str` matching|Invalid enum value 'hyperband'"),
    ("space:\n  trainer: [GLM, XGBoost]\nmethod: tpe\nsamples: 4", r"\$.space.trainer: `method: tpe` runs one"),
    ("trainer: XGBoost\nmethod: tpe\nsamples: 4\nspace: {rows: {low: 100, high: 900, int: true}}",
     r"\$.space.rows: the data is fingerprinted"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\nmethod: client\nsamples: 3", r"\$.method: `client` is"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\nmethod: tpe\nsamples: 3\ntarget: .nan",
     r"\$.target: expected a finite number"),
    ("command: [x, '{lr}']\nspace: {lr: [1]}\nmethod: tpe\nsamples: 3\norder: written",
     r"\$.order: a tpe sweep asks"),
])
def test_bad_specs_name_file_path_and_expectation(tmp_path, body, message):
    f = write(tmp_path, "name: bad\n" + body)
    with pytest.raises(BadInput) as err:
        job_specs(load_sweep(f))
    assert str(f) in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def _sweep_cmd(specs):
    return p.SubmitSweep(name="t", spec={"metric": "auc"}, jobs=specs)


def test_the_desk_completes_a_sweep_once_every_job_ended_and_names_the_best():
    desk = Desk()
    now = 1000.0
    desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=4), now)
    specs = [JobSpec(callable="m:f", params={"i": i}) for i in range(3)]
    out = desk.handle(_sweep_cmd(specs), now)
    assert isinstance(out.reply, p.SweepAccepted)
    kinds = [type(e).__name__ for e in out.events]
    assert kinds == ["SweepSubmitted", "JobSubmitted", "JobSubmitted", "JobSubmitted"]
    sid, ids = out.reply.sweep_id, out.reply.job_ids
    assert [e.job_id for e in out.events[1:]] == ids and all(e.spec.sweep_id == sid for e in out.events[1:])
    grants = desk.handle(p.Ready(node="n", max_leases=3), now).reply.leases
    aucs = {ids[0]: 0.61, ids[1]: 0.66}
    for g in grants:
        desk.handle(p.Report(node="n", job_id=g.job_id, lease_epoch=g.lease_epoch,
                             report=p.StartedReport()), now)
    for g in grants[:2]:
        o = desk.handle(p.Report(node="n", job_id=g.job_id, lease_epoch=g.lease_epoch,
                                 report=p.CompletedReport(metrics={"auc": aucs[g.job_id]})), now)
        assert not any(type(e).__name__ == "SweepCompleted" for e in o.events)
    o = desk.handle(p.Cancel(target=sid), now)  # the last job is cancelled...
    o = desk.handle(p.Report(node="n", job_id=ids[2], lease_epoch=grants[2].lease_epoch,
                             report=p.CancelledReport()), now)
    (done,) = [e for e in o.events if type(e).__name__ == "SweepCompleted"]  # ...and it ends
    assert (done.completed, done.failed, done.cancelled, done.best_job) == (2, 0, 1, ids[1])
    assert desk.state.sweeps[sid].done and not desk.state.closable
    bad = desk.handle(p.SubmitSweep(name="x", jobs=[JobSpec(callable="m:f"),
                                                    JobSpec(command=[])]), now)
    assert isinstance(bad.reply, p.Error) and "$.jobs[1].command" in bad.reply.message
    assert not bad.events


def test_a_sweep_end_to_end_with_report_and_audit(cluster, tmp_path):
    home, b, node = cluster
    node("solo", "--slots", "2", "--cpus", "2")
    csv_file = tmp_path / "games.csv"
    r = run_evo("data", "games", "--out", str(csv_file), "--rows", "1200", home=home)
    assert r.returncode == 0 and r.stdout.split()[0] == __import__("hashlib").sha256(
        csv_file.read_bytes()).hexdigest()
    spec = write(tmp_path, f"""
name: e2e
method: grid
seed: 11
metric: auc
params: {{data: {csv_file}, last: 3}}
space:
  trainer: [GLM, XGBoost]
  calibration: [none, platt]
""")
    r = run_evo("sweep", str(spec), "--plan", home=home)
    assert r.returncode == 0, r.stderr
    assert "4 configurations" in r.stdout and "GLM" in r.stdout and "solo" in r.stdout
    before = r.stdout
    with Client(b.address) as c:
        assert not of(list(c.read_all(1)), "SweepSubmitted")  # --plan submitted nothing
    r = run_evo("sweep", str(spec), "--wait", home=home, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    sweep_id = lines[0]
    assert re.fullmatch(r"s\d+", sweep_id)
    assert "top 10 by auc" in r.stdout and "best: j" in r.stdout
    best = json.loads((home / "sweeps" / sweep_id / "best.json").read_text())
    with Client(b.address) as c:
        events = list(c.read_all(1))
    (done,) = of(events, "SweepCompleted")
    assert done.completed == 4 and done.best_job == best["job_id"]
    completed = {e.job_id: e for e in of(events, "JobCompleted")}
    assert max(completed.values(), key=lambda e: e.metrics["auc"]).job_id == best["job_id"]
    # the same plan again: now the history of these model types on the node says how long
    r = run_evo("sweep", str(spec), "--plan", home=home)
    assert r.returncode == 0, r.stderr
    assert "no estimate" in before and "estimated duration: unknown" in before
    assert re.search(r"solo +~\d+\.\ds a job, \d slot\(s\) \[model type (GLM|XGBoost) on solo "
                     r"\(2 runs\)\]", r.stdout), r.stdout
    assert re.search(r"estimated makespan: ~\d+s on \d slot\(s\) \(slot-seconds: solo \d+\)",
                     r.stdout), r.stdout
    started = of(events, "JobStarted")
    assert all(s.env["data"] == {str(csv_file): best_sha(csv_file)} for s in started)
    assert all(s.env["seed"] == 11 and "numpy" in s.env["packages"] for s in started)
    # per-season progress was streamed as the jobs ran
    assert {e.step for e in of(events, "Progress")} == {2022, 2023, 2024}

    out = tmp_path / "report"
    r = run_evo("report", sweep_id, "--out", str(out), home=home)
    assert r.returncode == 0, r.stderr
    tex = (out / "comparison.tex").read_text()
    assert_tabular(tex, columns=6, rows=4)
    assert tex.count(r"\textbf{") == 4  # one best value per metric
    for pdf in ("roc.pdf", "calibration.pdf"):
        raw = (out / pdf).read_bytes()
        assert raw.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", raw)) >= 1
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("job_id,model_type")
    assert len(list((out / "experiments").glob("*.json"))) == 4
    util = (out / "utilization.csv").read_text().splitlines()
    assert util[1].startswith("solo,2,")
    assert f"sweep e2e ({sweep_id})" in tex and tex.startswith("% Needs \\usepackage{booktabs}")
    summary = yaml.safe_load((out / "summary.yaml").read_text())  # the handoff
    assert summary["sweep_id"] == sweep_id and summary["name"] == "e2e"
    assert summary["models_trained"] == ["GLM", "XGBoost"] and summary["mode"] == "max"
    assert summary["experiments"] == {"total": 4, "completed": 4, "failed": 0, "cancelled": 0,
                                      "pruned": 0}
    assert summary["wall_time_s"] > 0 and summary["utilization"]["solo"]["experiments"] == 4
    assert summary["best"]["job_id"] == best["job_id"]
    assert summary["best"]["metrics"]["auc"] == best["metrics"]["auc"]
    files = summary["deliverables"]
    assert {"comparison.tex", "roc.pdf", "calibration.pdf", "utilization.csv"} <= set(files)
    assert all(Path(f).is_file() for f in files.values())

    r = run_evo("audit", best["job_id"], home=home, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match:" in r.stdout and "identical bit for bit" in r.stdout
    csv_file.write_text(csv_file.read_text().replace("\n2024,", "\n2023,", 5))
    r = run_evo("audit", best["job_id"], home=home, timeout=120)
    assert r.returncode == 1
    assert "MISMATCH" in r.stdout and f"data {csv_file}: changed" in r.stdout


def best_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_tabular(tex: str, columns: int, rows: int) -> None:
    """A LaTeX tabular that parses: balanced environments, booktabs rules, one cell per column."""
    m = re.search(r"\\begin\{tabular\}\{([lcr]+)\}(.*?)\\end\{tabular\}", tex, re.S)
    assert m, tex
    assert len(m.group(1)) == columns
    body = m.group(2)
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    lines = [ln for ln in body.splitlines() if ln.strip().endswith(r"\\")]
    assert len(lines) == rows + 1  # the header and the rows
    for ln in lines:
        cells = re.split(r"(?<!\\)&", ln.strip()[:-2])
        assert len(cells) == columns, ln
    assert tex.count("{") == tex.count("}") + tex.count(r"\{") - tex.count(r"\}")


def test_a_bad_spec_submits_nothing_and_exits_2(cluster, tmp_path):
    home, b, node = cluster
    f = write(tmp_path, "name: bad\ntrainer: XGBoost\nspace: {max_depth: []}\n")
    r = run_evo("sweep", str(f), home=home)
    assert r.returncode == 2 and "$.space.max_depth: expected a non-empty list" in r.stderr
    assert str(f) in r.stderr
    with Client(b.address) as c:
        assert not list(c.read_all(1))
    r = run_evo("submit", "--trainer", "XGBoost", "--param", "max_depth=deep", home=home)
    assert r.returncode == 2 and "XGBoost params: Expected `int`, got `str` - at `$.max_depth`" in r.stderr
    r = run_evo("submit", "--trainer", "GLM", "--param", "data=nope.csv", home=home)
    assert r.returncode == 2 and "nope.csv" in r.stderr and "no such file" in r.stderr
    with Client(b.address) as c:
        assert not list(c.read_all(1))


def test_a_tpe_spec_makes_one_template_with_its_placeholders_kept(tmp_path):
    spec = load_sweep(write(tmp_path, "name: t\ncommand: [x, '{lr}', '{seed}']\nmethod: tpe\n"
                                      "samples: 5\nseed: 3\nspace: {lr: {low: 0.1, high: 1}}"))
    (template,) = job_specs(spec)
    assert template.command == ["x", "{lr}", "{seed}"] and template.seed == 3
    from evo.sweeps.spec import trial_spec

    trial = trial_spec(template, {"lr": 0.25})
    assert trial.command == ["x", "0.25", "3"] and trial.params == {"lr": 0.25}
    assert trial.name == "t lr=0.25"


def test_the_packaged_tpe_spec_is_a_learning_sweep_of_one_template():
    from evo.sweeps.spec import learning

    spec = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_tpe.yaml")
    (template,) = job_specs(spec)
    assert learning(spec) and spec.samples == 60 and spec.pruner == "asha"
    assert template.trainer == "XGBoost" and "max_depth" not in template.params
