"""Users' own code, submitted as a new user would: from its own folder, by relative paths,
reporting with evo.report and evo.result, as commands and as module:function callables."""

from __future__ import annotations

import json
import os
import sys
import textwrap

from evo.client import Client
from tests.conftest import run_evo
from tests.test_nodes import cluster, done, of, wait_for  # noqa: F401 - the fixture

TRAIN = textwrap.dedent("""
    import sys
    import evo
    lr = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    for epoch in range(1, 6):
        loss = 1.0 / (epoch * lr * 10)
        print(f"epoch {epoch}/5 loss={loss:.4f}")  # printed too: must not count twice
        evo.report(step=epoch, loss=loss, auc=0.5 + lr * epoch / 10)
""")

MODULE = textwrap.dedent("""
    import evo
    def train(x: float = 1.0) -> dict:
        evo.report(step=1, seen=x)
        return {"y": x * 3}
""")


def _project(tmp_path):
    d = tmp_path / "my-project"
    d.mkdir()
    (d / "train.py").write_text(TRAIN)
    (d / "mymod.py").write_text(MODULE)
    (d / "data.txt").write_text("relative data\n")
    return d


def _env() -> dict:
    e = dict(os.environ)
    e.pop("PYTHONPATH", None)  # the user's folder is not on any path: evo must find it
    return e


def test_a_script_submitted_by_a_relative_path_runs_where_it_was_submitted(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    proj = _project(tmp_path)
    r = run_evo("submit", "--", sys.executable, "train.py", "0.2", home=home, cwd=proj,
                env=_env())
    assert r.returncode == 0, r.stderr
    j = r.stdout.strip()
    with Client(b.address) as c:
        events = wait_for(c, done(j))
    (sub,) = of(events, "JobSubmitted", j)
    assert sub.spec.workdir == str(proj)
    steps = [e.step for e in of(events, "Progress", j)]
    assert steps == [1, 2, 3, 4, 5], "a job that calls evo.report has its prints parsed too"
    (fin,) = of(events, "JobCompleted", j)  # no evo.result: the last reported values
    assert fin.metrics == {"loss": 1.0 / (5 * 0.2 * 10), "auc": 0.5 + 0.2 * 5 / 10}


def test_a_module_function_is_imported_from_the_folder_it_was_submitted_from(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    proj = _project(tmp_path)
    ids = []
    for extra in ((), ("--isolate",)):
        r = run_evo("submit", "--callable", "mymod:train", "--param", "x=2", *extra,
                    home=home, cwd=proj, env=_env())
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    with Client(b.address) as c:
        events = wait_for(c, lambda evs: all(done(j)(evs) for j in ids))
    for j in ids:
        (fin,) = of(events, "JobCompleted", j)
        assert fin.metrics == {"y": 6.0}
    r = run_evo("audit", ids[0], home=home, cwd=tmp_path, env=_env())  # from elsewhere
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr


def test_a_workdir_missing_on_the_node_runs_in_a_copy_and_one_sent_without_files_fails_once(
        cluster, tmp_path):
    from evo.broker import protocol as p
    from evo.client import make_spec

    home, b, node = cluster
    gone = tmp_path / "elsewhere"
    gone.mkdir()
    r = run_evo("submit", "--workdir", str(gone), "--", "true", home=home)
    j = r.stdout.strip()
    with Client(b.address) as c:  # as an older client did: the spec names no files
        bare = c.request(p.Submit(spec=make_spec(["true"], workdir=str(gone)))).job_id  # type: ignore[attr-defined]
    gone.rmdir()  # as on a second machine that does not have the folder
    node("n1")
    with Client(b.address) as c:
        events = wait_for(c, lambda evs: done(j)(evs) and done(bare)(evs))
    assert of(events, "JobCompleted", j)  # its (empty) folder came with it
    fails = of(events, "JobFailed", bare)
    assert len(fails) == 1, [(e.error, e.final, e.retryable) for e in fails]
    (failed,) = fails
    assert failed.final and not failed.retryable and str(gone) in failed.error
    assert "submitted without its files" in failed.error
    assert len(of(events, "JobLeased", bare)) == 1, "retried although it cannot run there"


def test_evo_result_gives_a_command_job_its_final_metrics(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    code = ("import evo\nevo.report(step=1, loss=0.9)\nevo.result(auc=0.61, loss=0.4)\n"
            "evo.result(auc=0.62)\n")
    with Client(b.address) as c:
        j = c.submit([sys.executable, "-c", code])
        events = wait_for(c, done(j))
    (fin,) = of(events, "JobCompleted", j)
    assert fin.metrics == {"auc": 0.62, "loss": 0.4}


def test_a_command_sweep_ranks_by_the_last_reported_metric(cluster, tmp_path):
    home, b, node = cluster
    node("n1", "--slots", "2")
    proj = _project(tmp_path)
    spec = proj / "sweep.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: my-lr-search
        command: ["{sys.executable}", "train.py", "{{lr}}"]
        metric: loss
        space:
          lr: [0.1, 0.3, 0.2]
    """))
    r = run_evo("sweep", str(spec), "--wait", home=home, cwd=proj, env=_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = r.stdout.split()[0]
    best = json.loads((home / "sweeps" / sweep / "best.json").read_text())
    assert best["params"] == {"lr": 0.3}  # lowest final loss: loss is minimised
    r = run_evo("leaderboard", sweep, "--format", "json", home=home)  # the sweep's own metric
    order = [json.loads(line)["lr"] for line in r.stdout.splitlines()]
    assert order == ["0.3", "0.2", "0.1"], r.stdout
    # the sweep's mode rules its metric everywhere: best.json, the leaderboard, the report
    spec.write_text(spec.read_text().replace("name: my-lr-search", "name: most-loss")
                    .replace("metric: loss", "metric: loss\nmode: max"))
    r = run_evo("sweep", str(spec), "--wait", home=home, cwd=proj, env=_env(), timeout=120)
    sweep = r.stdout.split()[0]
    best = json.loads((home / "sweeps" / sweep / "best.json").read_text())
    assert best["params"] == {"lr": 0.1}
    r = run_evo("leaderboard", sweep, "--format", "json", home=home)
    order = [json.loads(line)["lr"] for line in r.stdout.splitlines()]
    assert order == ["0.1", "0.2", "0.3"], r.stdout
    run_evo("report", sweep, "--out", str(tmp_path / "rep"), home=home)
    rows = (tmp_path / "rep" / "comparison.csv").read_text().splitlines()
    assert rows[1].startswith(best["job_id"] + ","), rows
    import yaml

    summary = yaml.safe_load((tmp_path / "rep" / "summary.yaml").read_text())
    assert summary["best"]["job_id"] == best["job_id"] and summary["mode"] == "max"
    assert summary["models_trained"] == []  # a script of the user's: no model type


def test_a_sweep_whose_metric_nobody_reported_says_so_and_exits_1(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    proj = _project(tmp_path)
    spec = proj / "sweep.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: no-auc-here
        command: ["{sys.executable}", "-c", "import evo; evo.result(loss={{x}})"]
        space:
          x: [1, 2]
    """))
    r = run_evo("sweep", str(spec), "--wait", home=home, cwd=proj, env=_env(), timeout=120)
    assert r.returncode == 1
    assert "no completed job reported the sweep's metric 'auc' (they reported: loss)" in r.stderr
    assert not list((home / "sweeps").glob("*/best.json")) if (home / "sweeps").exists() else True
    out = tmp_path / "report"
    r = run_evo("report", r.stdout.split()[0], "--out", str(out), home=home)
    assert r.returncode == 0 and "roc.pdf not drawn" in r.stderr, r.stderr
    assert not (out / "roc.pdf").exists() and "loss" in (out / "comparison.csv").read_text()


def test_a_key_with_another_spec_is_refused_and_retry_runs_a_job_again(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    first = run_evo("submit", "--key", "exp-1", "--max-attempts", "1", "--", "false", home=home)
    j = first.stdout.strip()
    with Client(b.address) as c:
        wait_for(c, done(j))
    same = run_evo("submit", "--key", "exp-1", "--max-attempts", "1", "--", "false", home=home)
    assert same.returncode == 0 and same.stdout.strip() == j and "same spec" in same.stderr
    other = run_evo("submit", "--key", "exp-1", "--", "true", home=home)
    assert other.returncode == 2 and f"belongs to job {j} (failed)" in other.stderr
    assert "command" in other.stderr and f"evo retry {j}" in other.stderr
    again = run_evo("retry", j, home=home)
    assert again.returncode == 0, again.stderr
    new = again.stdout.strip()
    with Client(b.address) as c:
        events = wait_for(c, done(new))
    (sub,) = of(events, "JobSubmitted", new)
    assert sub.spec.retry_of == j and sub.spec.key is None and sub.spec.command == ["false"]
    running = run_evo("retry", "j999", home=home)
    assert running.returncode == 2 and "no job or sweep" in running.stderr


def test_retry_of_a_sweep_runs_its_failed_jobs_again_within_it(cluster, tmp_path):
    home, b, node = cluster
    node("n1", "--slots", "2")
    flag = tmp_path / "second-time"
    code = (f"import os, sys, evo\nx = int(sys.argv[1])\n"
            f"if x == 2 and not os.path.exists({str(flag)!r}): sys.exit(3)\n"
            "evo.result(auc=x / 10)\n")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: flaky
        command: ["{sys.executable}", "-c", {json.dumps(code)}, "{{x}}"]
        max_attempts: 1
        space:
          x: [1, 2]
    """))
    r = run_evo("sweep", str(spec), "--wait", home=home, cwd=tmp_path, timeout=120)
    sweep = r.stdout.split()[0]
    assert "best: " in r.stdout and "auc=0.1" in r.stdout, r.stdout + r.stderr
    flag.write_text("now it works")
    assert run_evo("retry", sweep, home=home).returncode == 2  # a sweep needs --failed
    r = run_evo("retry", sweep, "--failed", home=home)
    assert r.returncode == 0 and len(r.stdout.split()) == 1, r.stderr
    new = r.stdout.strip()
    with Client(b.address) as c:
        events = wait_for(c, lambda evs: done(new)(evs) and [
            e for e in of(evs, "SweepCompleted") if e.sweep_id == sweep and e.best_job == new])
    lb = run_evo("leaderboard", sweep, "--format", "json", home=home)
    rows = [json.loads(line) for line in lb.stdout.splitlines()]
    assert [row["job_id"] for row in rows] == [new, rows[1]["job_id"]] and rows[0]["auc"] == 0.2


def test_warm_workers_run_the_code_as_it_is_now_and_audit_sees_the_change(cluster, tmp_path):
    home, b, node = cluster
    node("n1", "--slots", "2")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helper.py").write_text("VERSION = 1\n")
    (proj / "trial.py").write_text("import helper\ndef run(i: int = 0) -> dict:\n"
                                   "    return {'version': helper.VERSION, 'i': i}\n")

    def sweep(tag: str) -> list[float]:
        spec = proj / f"{tag}.yaml"
        spec.write_text(f"name: {tag}\ncallable: trial:run\nmetric: version\n"
                        f"space:\n  i: [1, 2, 3, 4, 5, 6]\n")
        r = run_evo("sweep", str(spec), "--wait", home=home, cwd=proj, env=_env(), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = run_evo("sql", "SELECT j.metrics ->> 'version' AS v FROM jobs j JOIN sweeps s "
                       f"USING (sweep_id) WHERE s.name = '{tag}'", "--format", "csv",
                       home=home).stdout.split()[1:]
        return [float(v) for v in rows]

    assert sweep("before") == [1.0] * 6
    (proj / "helper.py").write_text("VERSION = 2\n")  # an edit while the workers are warm
    assert sweep("after") == [2.0] * 6, "a warm worker ran the old code"
    first = run_evo("sql", "SELECT job_id FROM jobs ORDER BY submitted_seq LIMIT 1",
                    "--format", "csv", home=home).stdout.split()[1]
    r = run_evo("audit", first, home=home, cwd=proj, env=_env())
    assert "code changed since it was submitted: helper.py changed, after.yaml added" in r.stdout
    assert r.returncode == 1  # version was 1, the re-run says 2


def test_jobs_show_and_version(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    proj = _project(tmp_path)
    r = run_evo("submit", "--name", "lr-0.2", "--", sys.executable, "train.py", "0.2",
                home=home, cwd=proj, env=_env())
    ok = r.stdout.strip()
    bad = run_evo("submit", "--max-attempts", "1", "--", "false", home=home).stdout.strip()
    # reports seen=1.0 at step 1, returns y=3.0: a completed job shows its final metrics
    fn = run_evo("submit", "--callable", "mymod:train", home=home, cwd=proj,
                 env=_env()).stdout.strip()
    with Client(b.address) as c:
        wait_for(c, lambda evs: done(ok)(evs) and done(bad)(evs) and done(fn)(evs))
    rows = [json.loads(line) for line in run_evo("jobs", "--json", home=home).stdout.splitlines()]
    assert [r["id"] for r in rows] == [fn, bad, ok]
    assert (rows[0]["step"], rows[0]["metrics"]) == (1, "y=3.0")
    rows = rows[1:]
    mine = rows[1]
    assert (mine["name"], mine["state"], mine["node"], mine["try"], mine["step"]) == (
        "lr-0.2", "completed", "n1", 1, 5)
    assert "auc=" in mine["metrics"] and mine["elapsed_s"] >= 0
    failed = run_evo("jobs", "--state", "failed", "--json", home=home).stdout.splitlines()
    assert [json.loads(line)["id"] for line in failed] == [bad]
    assert run_evo("jobs", "--state", "nope", home=home).returncode == 2
    doc = json.loads(run_evo("show", ok, "--json", home=home).stdout)
    assert doc["workdir"] == str(proj) and doc["code"]["files"] == "3"  # train.py, mymod.py, data.txt
    assert doc["attempts"][0]["outcome"] == "completed" and doc["metrics"]["loss"] > 0
    text = run_evo("show", bad, home=home).stdout
    assert "attempt 1 on n1: failed" in text and "exit 1" in text
    assert run_evo("show", "j999", home=home).returncode == 2
    st = json.loads(run_evo("status", "--json", home=home).stdout)
    assert [f["job_id"] for f in st["failed"]] == [bad] and "exit code 1" in st["failed"][0]["error"]
    assert "failed" in run_evo("status", home=home).stdout
    v = run_evo("--version")
    assert v.returncode == 0 and v.stdout.startswith("evo ")


def test_drain_and_resume_a_node_hold_and_release_a_job(cluster, tmp_path):
    home, b, node = cluster
    with Client(b.address) as c:
        held = c.submit([sys.executable, "-c", "print('held')"])
    assert run_evo("hold", held, home=home).stdout.strip() == f"held: {held}"
    node("n1", "--slots", "2")
    with Client(b.address) as c:
        long = c.submit([sys.executable, "-c", "import time; time.sleep(1.5)"])
        wait_for(c, lambda evs: of(evs, "JobStarted", long))
        r = run_evo("node", "drain", "n1", home=home)
        assert r.returncode == 0 and r.stdout.strip() == "drained: n1", r.stderr
        later = c.submit([sys.executable, "-c", "print('later')"])
        events = wait_for(c, done(long))  # what it runs, it finishes
        assert not of(events, "JobLeased", later) and not of(events, "JobLeased", held)
        why = run_evo("why", later, home=home).stdout
        assert "n1: drained, takes nothing new" in why
        assert "held (`evo release" in run_evo("why", held, home=home).stdout
        st = json.loads(run_evo("status", "--json", home=home).stdout)
        assert st["nodes"][0]["drained"] is True
        assert run_evo("node", "resume", "n1", home=home).stdout.strip() == "resumed: n1"
        wait_for(c, done(later))
        assert run_evo("release", held, home=home).stdout.strip() == f"released: {held}"
        events = wait_for(c, done(held))
    assert of(events, "JobCompleted", held) and of(events, "NodeDrained") and of(events, "NodeResumed")
    rows = run_evo("sql", "SELECT node, drained FROM nodes", "--format", "csv", home=home).stdout
    assert rows.split() == ["node,drained", "n1,False"]
    assert run_evo("node", "drain", "nope", home=home).returncode == 2
    assert run_evo("hold", long, home=home).returncode == 2  # it has completed


def test_a_cancelled_sweep_resumes_with_only_its_missing_configurations(cluster, tmp_path):
    home, b, node = cluster
    spec = tmp_path / "sweep.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: resumable
        command: ["{sys.executable}", "-c", "import evo; evo.result(auc={{x}} / 10)"]
        space:
          x: [1, 2, 3, 4]
    """))
    assert "no sweep named" in run_evo("sweep", str(spec), "--resume", home=home).stderr
    r = run_evo("sweep", str(spec), home=home, cwd=tmp_path)
    sweep = r.stdout.strip()
    with Client(b.address) as c:
        ids = [q["job_id"] for q in c.status().queued]  # nothing runs yet: no node
    first_two, last_two = ids[:2], ids[2:]
    for j in last_two:  # kept back while the first two run, then the rest is cancelled
        assert run_evo("hold", j, home=home).returncode == 0
    node("n1", "--slots", "2")
    state = f"SELECT state FROM sweeps WHERE sweep_id = '{sweep}'"
    with Client(b.address) as c:
        wait_for(c, lambda evs: all(done(j)(evs) for j in first_two))
        assert run_evo("sql", state, "--format", "csv", home=home).stdout.split()[1] == "running"
        assert run_evo("cancel", sweep, home=home).returncode == 0
        wait_for(c, lambda evs: of(evs, "SweepCompleted"))
    assert run_evo("sql", state, "--format", "csv", home=home).stdout.split()[1] == "cancelled"
    r = run_evo("sweep", str(spec), "--resume", "--wait", home=home, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[0] == sweep, r.stdout + r.stderr
    assert run_evo("sql", state, "--format", "csv", home=home).stdout.split()[1] == "completed"
    assert "2 configuration(s) not completed" in r.stderr and "auc=0.4" in r.stdout
    rows = run_evo("sql", f"SELECT params ->> 'x' AS x, state FROM jobs WHERE sweep_id = '{sweep}' "
                   "ORDER BY submitted_seq", "--format", "csv", home=home).stdout.split()[1:]
    assert rows == ["1,completed", "2,completed", "3,cancelled", "4,cancelled",
                    "3,completed", "4,completed"]
    again = run_evo("sweep", str(spec), "--resume", home=home, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to resume" in again.stderr


def test_the_packaged_command_and_callable_example_sweeps_run(cluster, tmp_path, monkeypatch):
    from tests.conftest import ROOT

    home, b, node = cluster
    # as in a shell with evo's virtualenv active: `python` in a command is that interpreter
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    node("n1", "--slots", "2")
    for name, metric in (("command_example", "loss"), ("callable_example", "auc")):
        spec = ROOT / "configs" / "sweeps" / f"{name}.yaml"
        r = run_evo("sweep", str(spec), "--wait", home=home, cwd=tmp_path, env=_env(),
                    timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        sweep = r.stdout.split()[0]
        best = json.loads((home / "sweeps" / sweep / "best.json").read_text())
        assert metric in best["metrics"], best


def test_small_things_users_hit(cluster, tmp_path):
    home, b, node = cluster
    node("n1", "--cpus", "2")
    r = run_evo("submit", "--model-type", "MyTransformer", "--", "true", home=home)
    assert r.returncode == 0 and "'MyTransformer' has no routing rule" in r.stderr
    r = run_evo("submit", "--cpus", "64", "--", "true", home=home)
    assert r.returncode == 2 and "no known machine fits this job: n1 has 2 CPUs" in r.stderr
    flag = tmp_path / "flag"
    code = (f"import os, sys\nif not os.path.exists({str(flag)!r}):\n"
            f"    open({str(flag)!r}, 'w').write('x'); sys.exit('first try fails')\n")
    j = run_evo("submit", "--", sys.executable, "-c", code, home=home).stdout.strip()
    with Client(b.address) as c:
        wait_for(c, done(j))
    why = run_evo("why", j, home=home).stdout.strip()
    assert why == f"{j} is completed after 2 attempts", why  # no stale error of attempt 1
    assert json.loads(run_evo("show", j, "--json", home=home).stdout)["error"] is None
    assert run_evo("logs", j, "--attempt", "5", home=home).returncode == 2
    for args in (("leaderboard", "s99"), ("report", "s99", "--out", str(tmp_path / "r")),
                 ("why", "j999"), ("cancel", "s99"), ("show", "j999"), ("retry", "j999"),
                 ("jobs", "--sweep", "s99"), ("hold", "s99"), ("logs", "j999")):
        r = run_evo(*args, home=home)
        assert r.returncode == 2 and ("s99" in r.stderr or "j999" in r.stderr), (args, r.stderr)
    # one print when not on a terminal (a pipe, a log), not a live view that never ends
    r = run_evo("status", "--watch", home=home)
    assert r.returncode == 0 and "jobs:" in r.stdout and "n1" in r.stdout, r.stdout
    for args in (("node", "--slots", "0"), ("sql", "SELECT 1", "--as-of", "-1")):
        r = run_evo(*args, home=home)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace: [\n")
    for args in (("sweep", str(bad)), ("sql", "SELEC")):  # libraries' multi-line messages
        r = run_evo(*args, home=home)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
    assert "not valid YAML at line 3, column 1" in run_evo("sweep", str(bad), home=home).stderr
    assert "<bool>" not in run_evo("sweep", "--help", home=home).stdout
    # a broker that stops cleanly closes DuckDB cleanly: no "nanobind: leaked ..." at its exit
    assert b.stop() == 0
    from pathlib import Path
    out = Path(b.logfile.name).read_text()
    assert "leaked" not in out and "broker at" in out, out[-2000:]
