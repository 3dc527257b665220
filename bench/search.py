"""How fast a learning sweep finds what the whole grid finds: evo's TPE + ASHA against the
324-configuration grid and against Optuna's own study, in one run.

1. The grid: configs/sweeps/xgboost_grid.yaml's 324 configurations, each validated
   walk-forward on the synthetic games data (5,000 rows) and scored on the last ``--last``
   seasons, run with joblib (n_jobs=2): its wall time and its best AUC.
2. evo: a ``method: tpe`` sweep with ``pruner: asha`` over the seed's space as ranges
   (max_depth 3-9, learning_rate 0.01-0.3 log, n_estimators 100-500, subsample and
   colsample_bytree 0.6-1.0), on a broker and one 2-slot node, ``target`` the grid's best AUC
   less 0.002: the wall time from submit to the first completed trial that reaches it.
3. Optuna: TPESampler (constant liar) + SuccessiveHalvingPruner (min_resource 1, reduction
   factor 3, as evo's asha) over the same space, n_jobs=2, the trainer's per-season reports
   as its intermediate values, stopped at the same target: the same wall time.

Each search gets the grid's 324 trials and the grid's wall time as its budget. The models of a
search seeded s are seeded s too, in all three (evo's trials get the sweep's seed as every
job of a sweep does), so evo and Optuna score a configuration alike; the grid's models are
seeded 42. Printed: each
time, its fraction of the grid's wall time (target: evo at most 0.25), the ratio of evo's to
Optuna's (target: at most 1.0), the trials each ran and pruned, and the best AUC each found.

    python bench/search.py [--last 4] [--seeds 1] [--grid-wall S --grid-best AUC]
    python bench/search.py --same-trials 24   # the orchestration alone, below

``--same-trials N`` separates the orchestration from the search: N fixed configurations, each
run up to its first scored season (what a trial pruned at the first rung runs), through evo
(a broker and a 2-slot node) and through two threads in one process as Optuna runs them:
the wall time of each, and the time inside the trainer against the slot time per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import Cluster  # noqa: E402
from evo.client import Client  # noqa: E402
from evo.sweeps import job_specs, load_sweep, record  # noqa: E402
from evo.trainers import experiment  # noqa: E402

GAP = 0.002
SPACE = """
  max_depth: {low: 3, high: 9, int: true}
  learning_rate: {low: 0.01, high: 0.3, log: true}
  n_estimators: {low: 100, high: 500, int: true}
  subsample: {low: 0.6, high: 1.0}
  colsample_bytree: {low: 0.6, high: 1.0}
"""


def grid_trial(params: dict) -> float:
    return experiment.run("XGBoost", seed=42, **params)["auc"]


def run_grid(last: int) -> tuple[float, float]:
    from joblib import Parallel, delayed

    spec = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_grid.yaml")
    spec.params["last"] = last
    configs = [dict(j.params) for j in job_specs(spec)]
    t0 = time.perf_counter()
    aucs = Parallel(n_jobs=2)(delayed(grid_trial)(c) for c in configs)
    return time.perf_counter() - t0, max(aucs)


def run_evo(last: int, seed: int, target: float, budget_s: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="search-"))
    path = folder / "search.yaml"
    path.write_text(f"""name: bench-search
trainer: XGBoost
method: tpe
samples: 324
seed: {seed}
metric: auc
pruner: asha
target: {target!r}
time_budget_s: {budget_s!r}
params:
  data: games
  calibration: none
  last: {last}
space:{SPACE}""")
    spec = load_sweep(path)
    template = job_specs(spec)
    cl = Cluster(2)
    import psutil

    daemons = [psutil.Process(cl.broker.pid), psutil.Process(cl.node.pid)]

    def cpu() -> float:  # the broker's and the node daemon's CPU seconds (not the workers')
        return sum(sum(proc.cpu_times()[:2]) for proc in daemons)

    try:
        with Client(cl.address, timeout_s=60) as c:
            cpu0 = cpu()
            t0 = time.perf_counter()
            reply = c.submit_sweep(spec.name, template, record(spec, path))
            reached = None
            best = float("-inf")
            started: dict[str, float] = {}
            busy, cost = 0.0, []  # slot-seconds the trials took; their depth x trees
            rungs: dict[int, int] = {}
            for ev in c.follow(reply.seq, idle_s=0.5):
                name = type(ev).__name__
                if name == "JobStarted":
                    started[ev.job_id] = ev.time
                if name == "PruneRequested":
                    rungs[ev.resource] = rungs.get(ev.resource, 0) + 1
                if name == "JobSubmitted":
                    cost.append(ev.spec.params["max_depth"] * ev.spec.params["n_estimators"])
                if name in ("JobCompleted", "JobPruned", "JobCancelled") \
                        and ev.job_id in started:
                    busy += ev.time - started.pop(ev.job_id)
                if name == "JobCompleted" and ev.job_id and "auc" in ev.metrics:
                    best = max(best, ev.metrics["auc"])
                    if reached is None and ev.metrics["auc"] >= target:
                        reached = time.perf_counter() - t0
                        c.cancel(reply.sweep_id, "the target is reached")
                if name == "SweepCompleted" and ev.sweep_id == reply.sweep_id:
                    done = ev
                    break
            wall = time.perf_counter() - t0
            used = cpu() - cpu0
    finally:
        cl.close()
    return {"reached": reached, "wall": wall, "trials": done.completed + done.pruned
            + done.cancelled + done.failed, "pruned": done.pruned, "best": best,
            "busy": busy, "cost": statistics.mean(cost) if cost else 0.0,
            "rungs": dict(sorted(rungs.items())), "daemons_cpu": used}


def run_optuna(last: int, seed: int, target: float, budget_s: float) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    here = threading.local()

    def report(step=None, metrics=None, **named):  # noqa: ANN001, ANN003, ANN202
        """The trainer's evo.report, as Optuna's trial.report (its resource: the count)."""
        trial = here.trial
        here.resource += 1
        trial.report(named["auc"], here.resource)
        if trial.should_prune():
            raise optuna.TrialPruned()

    experiment.report = report  # type: ignore[assignment] # the trainer reports to Optuna

    def objective(t: optuna.Trial) -> float:
        here.trial, here.resource = t, 0
        params = {"data": "games", "calibration": "none", "last": last,
                  "max_depth": t.suggest_int("max_depth", 3, 9),
                  "learning_rate": t.suggest_float("learning_rate", 0.01, 0.3, log=True),
                  "n_estimators": t.suggest_int("n_estimators", 100, 500),
                  "subsample": t.suggest_float("subsample", 0.6, 1.0),
                  "colsample_bytree": t.suggest_float("colsample_bytree", 0.6, 1.0)}
        # the model's seed is the search's, as evo's trials get the sweep's seed (EVO_SEED)
        return experiment.run("XGBoost", seed=seed, **params)["auc"]

    out: dict = {"reached": None}
    t0 = time.perf_counter()

    def stop_at_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.value is not None and trial.value >= target and out["reached"] is None:
            out["reached"] = time.perf_counter() - t0
            study.stop()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=optuna.pruners.SuccessiveHalvingPruner(
                                    min_resource=1, reduction_factor=3))
    study.optimize(objective, n_trials=324, n_jobs=2, timeout=budget_s,
                   callbacks=[stop_at_target])
    out["wall"] = time.perf_counter() - t0
    states = [t.state.name for t in study.trials]
    ended = [t for t in study.trials if t.datetime_complete is not None]
    out["busy"] = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in ended)
    rungs: dict[int, int] = {}
    for t in study.trials:
        if t.state.name == "PRUNED" and t.last_step is not None:
            rungs[t.last_step] = rungs.get(t.last_step, 0) + 1
    out["rungs"] = dict(sorted(rungs.items()))
    out["cost"] = statistics.mean(t.params["max_depth"] * t.params["n_estimators"]
                                  for t in study.trials if "n_estimators" in t.params)
    out.update(trials=len(states), pruned=states.count("PRUNED"),
               best=max((t.value for t in study.trials if t.value is not None
                         and t.state.name == "COMPLETE"), default=float("nan")))
    return out


def run_algorithm(last: int, seed: int, target: float, budget_s: float) -> dict:
    """evo's search alone: the same Study fold and TPE suggestion the broker uses, driven by
    two threads in this process as Optuna drives its study (no broker, node or workers). Set
    beside Optuna's row it says whether a gap is the algorithm or the orchestration."""
    from evo.sweeps.study import COMPLETE, PRUNED, Pruning, Study
    from evo.sweeps.tpe import suggest

    import yaml

    space = yaml.safe_load(SPACE)
    study = Study(metric="auc", mode="max", samples=324, seed=seed,
                  pruning=Pruning(kind="asha"))
    lock = threading.Lock()
    here = threading.local()
    done = threading.Event()

    class Pruned(Exception):
        pass

    def report(step=None, metrics=None, **named):  # noqa: ANN001, ANN003, ANN202
        with lock:
            why = study.progress(here.job, {"auc": named["auc"]})
            if why:
                study.told_to_stop(here.job, why)
        if why:
            raise Pruned()

    experiment.report = report  # type: ignore[assignment] # the trainer reports to the study
    out: dict = {"reached": None, "busy": 0.0}
    t0 = time.perf_counter()

    def worker() -> None:
        while not done.is_set() and time.perf_counter() - t0 < budget_s:
            with lock:
                if len(study.trials) >= 324:
                    return
                params = suggest(study, space)
                here.job = job = f"t{len(study.trials)}"
                study.asked(job, params)
            start = time.perf_counter()
            try:
                auc = experiment.run("XGBoost", seed=seed, data="games", calibration="none",
                                     last=last, **params)["auc"]
                with lock:
                    study.ended(job, COMPLETE, {"auc": auc})
                    if auc >= target and out["reached"] is None:
                        out["reached"] = time.perf_counter() - t0
                        done.set()
            except Pruned:
                with lock:
                    study.ended(job, PRUNED)
            with lock:
                out["busy"] += time.perf_counter() - start

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.perf_counter() - t0
    trials = list(study.trials.values())
    rungs: dict[int, int] = {}
    for t in trials:
        if t.state == PRUNED:
            rungs[len(t.values)] = rungs.get(len(t.values), 0) + 1
    out.update(trials=len(trials), pruned=sum(t.state == PRUNED for t in trials),
               rungs=dict(sorted(rungs.items())),
               cost=statistics.mean(t.params["max_depth"] * t.params["n_estimators"]
                                    for t in trials),
               best=max((t.value for t in trials if t.state == COMPLETE and t.value is not None),
                        default=float("nan")))
    return out


TOOLS = {"evo": run_evo, "algorithm": run_algorithm, "optuna": run_optuna}


SHORT = '''
import time
from evo.trainers import experiment


class Enough(Exception):
    pass


def first_season(**params):
    """The trainer up to its first scored season's report: a trial pruned at rung 0."""
    t0 = time.perf_counter()

    def report(step=None, **named):
        raise Enough()

    experiment.report = report
    try:
        experiment.run("XGBoost", seed=42, **params)
    except Enough:
        pass
    return {"inside_s": time.perf_counter() - t0}
'''


def run_same_trials(n: int, last: int) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    from evo.events.schema import JobSpec

    folder = Path(tempfile.mkdtemp(prefix="search-same-"))
    (folder / "short.py").write_text(SHORT)
    rng = random.Random(1)
    confs = [dict(data="games", calibration="none", last=last, max_depth=rng.randint(3, 9),
                  n_estimators=rng.randint(100, 500), learning_rate=0.1, subsample=0.8,
                  colsample_bytree=0.8) for _ in range(n)]
    cl = Cluster(2)
    try:
        with Client(cl.address, timeout_s=60) as c:
            specs = [JobSpec(callable="short:first_season", params=p, workdir=str(folder))
                     for p in confs]
            seq0 = c.hello().last_seq
            t0 = time.perf_counter()
            ids = c.submit_many(specs)
            starts: dict[str, float] = {}
            ends: dict[str, float] = {}
            inside: dict[str, float] = {}
            for ev in c.follow(seq0 + 1, idle_s=0.5):
                name = type(ev).__name__
                if name == "JobStarted":
                    starts[ev.job_id] = ev.time
                if name == "JobCompleted":
                    ends[ev.job_id], inside[ev.job_id] = ev.time, ev.metrics["inside_s"]
                    if len(ends) == len(ids):
                        break
            evo_wall = time.perf_counter() - t0
    finally:
        cl.close()
    busy = statistics.mean(ends[j] - starts[j] for j in ids)
    sys.path.insert(0, str(folder))
    import short  # type: ignore[import-not-found]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        res = list(ex.map(lambda p: short.first_season(**p), confs))
    th_wall = time.perf_counter() - t0
    th_inside = statistics.mean(r["inside_s"] for r in res)
    print(f"{n} fixed trials up to their first scored season, 2 slots:\n"
          f"evo      {evo_wall:6.2f} s; per trial {busy:.3f} slot-s, {statistics.mean(inside.values()):.3f}"
          f" of it in the trainer\n"
          f"threads  {th_wall:6.2f} s; per trial {th_inside:.3f} s in the trainer\n"
          f"evo / threads = {evo_wall / th_wall:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--last", type=int, default=4, help="scored seasons per configuration")
    ap.add_argument("--seeds", type=int, default=1, help="searches per tool (seeds 1..N)")
    ap.add_argument("--first-seed", type=int, default=1, help="seeds FIRST..FIRST+N-1")
    ap.add_argument("--grid-wall", type=float, default=0.0,
                    help="the grid's wall time from an earlier run (skips running it)")
    ap.add_argument("--grid-best", type=float, default=0.0, help="with --grid-wall")
    ap.add_argument("--same-trials", type=int, default=0,
                    help="only the orchestration: N fixed trials through evo and two threads")
    ap.add_argument("--tools", default="evo,optuna",
                    help="which searches, comma-separated: evo, algorithm (evo's study and "
                         "sampler in two threads, no orchestration), optuna")
    a = ap.parse_args()
    if a.same_trials:
        run_same_trials(a.same_trials, a.last)
        return
    print(f"XGBoost search: seed's space as ranges, 5,000 rows, last {a.last} seasons scored, "
          f"{os.cpu_count()} cores\n", flush=True)
    if a.grid_wall:
        grid_wall, grid_best = a.grid_wall, a.grid_best
        print(f"grid    (324 configurations, given)  {grid_wall:8.1f} s   best auc "
              f"{grid_best:.6f}", flush=True)
    else:
        grid_wall, grid_best = run_grid(a.last)
        print(f"grid    (324 configurations, joblib n_jobs=2)  {grid_wall:8.1f} s   best auc "
              f"{grid_best:.6f}", flush=True)
    target = grid_best - GAP
    print(f"target: auc >= {target:.6f} (the grid's best - {GAP}); budget: 324 trials or "
          f"{grid_wall:.0f} s\n", flush=True)
    tools = a.tools.split(",")
    rows: dict[str, list[dict]] = {tool: [] for tool in tools}
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        for tool in tools:
            r = TOOLS[tool](a.last, seed, target, grid_wall)
            rows[tool].append(r)
            when = f"{r['reached']:7.1f} s = {r['reached'] / grid_wall:.3f} of the grid" \
                if r["reached"] is not None else "  not reached in the budget"
            print(f"{tool:<7} seed {seed}: reached {when}; {r['trials']} trials "
                  f"({r['pruned']} pruned) in {r['wall']:.1f} s, best auc {r['best']:.6f}; "
                  f"{r['busy'] / max(r['trials'], 1):.2f} slot-s a trial, mean depth x trees "
                  f"{r['cost']:.0f}, pruned at resource {r['rungs']}"
                  + (f"; broker + node CPU {r['daemons_cpu']:.2f} s" if "daemons_cpu" in r else ""),
                  flush=True)

    def median(tool: str) -> float:
        return statistics.median(r["reached"] if r["reached"] is not None else float("inf")
                                 for r in rows[tool])

    for tool in rows:  # what a trial cost each: the sampler's choices, not the orchestration
        per = sum(r["busy"] for r in rows[tool]) / max(sum(r["trials"] for r in rows[tool]), 1)
        print(f"{tool}: {per:.3f} slot-s per trial over all seeds, mean depth x trees "
              f"{statistics.mean(r['cost'] for r in rows[tool]):.0f}", flush=True)
    print("\nmedian time to the target: " + ", ".join(
        f"{tool} {median(tool):.1f} s ({median(tool) / grid_wall:.3f} of the grid)"
        for tool in tools) + " (target: evo <= 0.25 of the grid)", flush=True)
    if "optuna" in rows:
        for tool in (t for t in tools if t != "optuna"):
            print(f"{tool} / optuna = {median(tool) / median('optuna'):.2f} (target: evo <= 1.0)",
                  flush=True)


if __name__ == "__main__":
    main()
