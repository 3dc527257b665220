"""The 324-configuration XGBoost grid through evo, joblib and optuna, in one run.

The grid of configs/sweeps/xgboost_grid.yaml (max_depth x learning_rate x n_estimators x
subsample x colsample_bytree = 4 x 3 x 3 x 3 x 3) on the synthetic games data (5,000 rows),
each configuration validated walk-forward and scored on the last ``--last`` seasons
(default 4: 6 model fits per configuration), single-threaded, seed 42:

1. evo: `evo sweep` to a broker and one local node with 2 slots (real processes on loopback;
   every event fsynced), wall time from submit to SweepCompleted;
2. joblib.Parallel(n_jobs=2) over the same configurations (loky processes);
3. optuna with a GridSampler over the same space, n_jobs=2.

All three call the same trainer function, so the ratio is the cost of the orchestration.
It checks that the three agree on the best AUC.

    python bench/grid.py [--last 4] [--limit N] [--order written] [--evo-only]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import Cluster  # noqa: E402
from evo.client import Client  # noqa: E402
from evo.sweeps import job_specs, load_sweep  # noqa: E402
from evo.trainers.experiment import run  # noqa: E402


def trial(params: dict) -> float:
    return run("XGBoost", seed=42, **params)["auc"]


def timed_trial(params: dict) -> tuple[float, float, float]:
    """The AUC, the trial's time around the call, and the trainer's own ``train_s``."""
    t0 = time.perf_counter()
    out = run("XGBoost", seed=42, **params)
    return out["auc"], time.perf_counter() - t0, out["train_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--last", type=int, default=4, help="scored seasons per configuration")
    ap.add_argument("--limit", type=int, default=0, help="only the first N configurations")
    ap.add_argument("--order", choices=("longest_first", "written"), default="longest_first",
                    help="the order evo starts the trials in (the peers: as written)")
    ap.add_argument("--evo-only", action="store_true", help="skip joblib and optuna")
    a = ap.parse_args()
    spec = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_grid.yaml")
    spec.params["last"], spec.order = a.last, a.order
    written = load_sweep(ROOT / "configs" / "sweeps" / "xgboost_grid.yaml")
    written.params["last"], written.order = a.last, "written"
    jobs, peers = job_specs(spec), job_specs(written)
    if a.limit:  # the same configurations for all three: the first N as written
        keep = {repr(sorted(j.params.items())) for j in peers[: a.limit]}
        jobs = [j for j in jobs if repr(sorted(j.params.items())) in keep]
        peers = peers[: a.limit]
    # evo starts the longest expected first (the sweep's order); the peers run them as written
    configs = [dict(j.params) for j in peers]
    print(f"XGBoost grid: {len(configs)} configurations, 5,000 rows, last {a.last} seasons "
          f"scored, {os.cpu_count()} cores\n", flush=True)

    import psutil

    cl = Cluster(2)
    me = psutil.Process()

    def cpu() -> dict[str, float]:  # CPU seconds so far: the daemons, and this client's follow
        procs = {"broker": psutil.Process(cl.broker.pid), "node": psutil.Process(cl.node.pid),
                 "client": me}
        return {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}

    try:
        with Client(cl.address, timeout_s=60) as c:
            cpu0 = cpu()  # the daemons' start-up (imports, the first fold) is not the sweep's
            t0 = time.perf_counter()
            reply = c.submit_sweep("bench-grid", jobs, {"metric": "auc"})
            best_evo = None
            for ev in c.follow(reply.seq - len(jobs), idle_s=0.5):
                if type(ev).__name__ == "SweepCompleted" and ev.sweep_id == reply.sweep_id:
                    evo_wall = time.perf_counter() - t0
                    cpu1 = cpu()
                    best_evo = ev.best_job
                    done = ev.completed
                    break
            finished = [e for e in c.read_all(reply.seq - len(jobs))
                        if type(e).__name__ == "JobCompleted"]
            aucs = {e.job_id: e.metrics["auc"] for e in finished}
            busy = sum(e.duration_s for e in finished)  # slot-seconds the trials took
            inside = sum(e.metrics["train_s"] for e in finished)  # of it, in the trainer
    finally:
        cl.close()
    assert done == len(jobs), f"evo completed {done} of {len(jobs)}"
    used = {k: cpu1[k] - cpu0[k] for k in cpu1}
    print(f"evo     (broker + node, 2 slots)   {evo_wall:8.1f} s   best auc {aucs[best_evo]:.6f}",
          flush=True)
    print(f"        evo's CPU from submit to SweepCompleted: broker {used['broker']:.2f} s, node "
          f"daemon {used['node']:.2f} s, client following {used['client']:.2f} s: "
          f"{sum(used.values()) / len(jobs) * 324:.2f} s per 324 trials (target <= 1 s; "
          f"the daemons' start-up before it: {cpu0['broker']:.2f} s, {cpu0['node']:.2f} s)",
          flush=True)
    print(f"        trials took {busy:.1f} slot-s in all ({inside:.1f} in the trainer); idle or "
          f"lost {2 * evo_wall - busy:.1f} slot-s", flush=True)

    if a.evo_only:
        return
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    timed = Parallel(n_jobs=2)(delayed(timed_trial)(p) for p in configs)
    jl_wall = time.perf_counter() - t0
    jl = [auc for auc, _, _ in timed]
    jl_busy = sum(dt for _, dt, _ in timed)
    jl_inside = sum(t for _, _, t in timed)
    print(f"joblib  (n_jobs=2)                 {jl_wall:8.1f} s   best auc {max(jl):.6f}", flush=True)
    print(f"        trials took {jl_busy:.1f} slot-s in all ({jl_inside:.1f} in the trainer); idle "
          f"or lost {2 * jl_wall - jl_busy:.1f} slot-s", flush=True)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: sorted({c[k] for c in configs}) for k in spec.space}
    fixed = {k: v for k, v in configs[0].items() if k not in space}

    def objective(t: optuna.Trial) -> float:
        params = {**fixed, **{k: t.suggest_categorical(k, v) for k, v in space.items()}}
        return trial(params)

    n_grid = len(list(itertools.product(*space.values())))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler(space, seed=0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n_grid, n_jobs=2)
    op_wall = time.perf_counter() - t0
    print(f"optuna  (GridSampler, n_jobs=2)    {op_wall:8.1f} s   best auc {study.best_value:.6f}",
          flush=True)

    assert abs(max(jl) - aucs[best_evo]) < 1e-12, "evo and joblib disagree on the best AUC"
    faster = min(jl_wall, op_wall)
    print(f"\nevo / joblib {evo_wall / jl_wall:.3f}x   evo / optuna {evo_wall / op_wall:.3f}x   "
          f"evo / faster of the two {evo_wall / faster:.3f}x   (target <= 0.98x)")
    print(f"evo per configuration: {evo_wall / len(configs) * 1000:.0f} ms wall on 2 slots; "
          f"every one of its {len(configs) * 4 + 2}+ events fsynced")


if __name__ == "__main__":
    main()
