"""A synthetic but legal history for tests and benchmarks, made by the real Desk.

Nodes join, sweeps of jobs are submitted, nodes lease and run them, report progress and
results; some attempts fail and are retried, some jobs are cancelled, and now and then a node
goes silent, loses its leases (NodeLost, LeaseExpired, RetryScheduled) and joins again. The
same seed gives the same events.
"""

from __future__ import annotations

import random
from typing import Any

from evo.broker import protocol as p
from evo.broker.desk import Desk
from evo.events.schema import Event, GpuInfo, GpuSample, JobSpec, Resources

NODES = [
    p.Join(node="laptop", hostname="laptop", cpus=8, mem_gb=16, labels=["cpu"], slots=4,
           heartbeat_s=2.0),
    p.Join(node="gpu-1", hostname="ws", cpus=16, mem_gb=64, labels=["gpu"], slots=2,
           gpus=[GpuInfo(index=0, name="RTX", vram_gb=24)], heartbeat_s=2.0),
]
MODELS = ["GLM", "RandomForest", "XGBoost", "MLP"]


def generate(n_events: int, seed: int = 0, sweep_size: int = 24,
             util_every: int = 1, first_sweep: int = 0) -> list[Event]:
    """``util_every`` k: a node's heartbeat carries a utilization sample every k-th round
    (samples are most of a history's events; fewer of them, more jobs per event).
    ``first_sweep`` N: the first sweep has N jobs (its trials run beside the later sweeps')."""
    rng = random.Random(seed)
    rounds = 0
    desk = Desk()
    events: list[Event] = []
    now, mono = 1_700_000_000.0, 0.0
    sweeps = 0

    def run(cmd: p.Command) -> p.Reply | None:
        out = desk.handle(cmd, now, cause="gen", mono=mono)
        events.extend(out.events)
        return out.reply

    for j in NODES:
        run(j)
    while len(events) < n_events:
        # a sweep of jobs, some with a priority, submitted as `evo sweep` does
        sweeps += 1
        model = rng.choice(MODELS)
        jobs = [JobSpec(callable="evo.trainers.builtin:train", model_type=model,
                        params={"max_depth": rng.choice([3, 5, 7, 9]),
                                "learning_rate": rng.choice([0.01, 0.05, 0.1]), "i": i},
                        seed=i, priority=rng.choice([0, 0, 0, 1]),
                        resources=Resources(cpus=1, gpus=1 if model == "XGBoost" else 0,
                                            vram_gb=2.0 if model == "XGBoost" else 0.0))
                for i in range(first_sweep if sweeps == 1 and first_sweep else sweep_size)]
        accepted = run(p.SubmitSweep(name=f"{model.lower()}-grid", jobs=jobs,
                                     spec={"model_type": model, "metric": "auc"}))
        assert isinstance(accepted, p.SweepAccepted), accepted
        if sweeps % 7 == 0:  # now and then a job is held, and let go a little later
            held = accepted.job_ids[-1]
            run(p.Hold(target=held))
        # run until the queue is drained
        for _ in range(200):
            if not desk.state.queue and not any(n.running for n in desk.state.nodes.values()):
                break
            now += rng.uniform(0.5, 3.0)
            mono += 1.0
            rounds += 1
            sample = rounds % util_every == 0
            if sweeps % 7 == 0 and rng.random() < 0.2:
                run(p.Hold(target=held, release=True))
            if sweeps % 11 == 0:  # and a node is drained for a while
                run(p.Drain(node="gpu-1", resume=rng.random() < 0.3))
            for j in NODES:
                node = desk.state.nodes[j.node]
                if not node.alive:
                    run(p.Join(**{f: getattr(j, f) for f in j.__struct_fields__ if f != "req"}))
                    continue
                if rng.random() < 0.01:  # goes silent: its leases expire on the next tick
                    mono += 10.0
                    events.extend(desk.tick(now, mono).events)
                    continue
                for job_id in sorted(node.running):
                    job = desk.state.jobs[job_id]
                    ids: dict[str, Any] = {"node": j.node, "job_id": job_id,
                                           "lease_epoch": job.lease_epoch}
                    if job.state == "leased":
                        run(p.Report(report=p.StartedReport(pid=rng.randrange(1000, 9999)), **ids))
                        continue
                    r = rng.random()
                    if r < 0.5:
                        run(p.Report(report=p.ProgressReport(step=rng.randrange(100), metrics={
                            "loss": rng.uniform(0.3, 0.9)}), **ids))
                    elif r < 0.9:
                        run(p.Report(report=p.CompletedReport(duration_s=rng.uniform(1, 60), metrics={
                            "auc": rng.uniform(0.55, 0.75), "brier": rng.uniform(0.18, 0.26),
                            "log_loss": rng.uniform(0.55, 0.7), "roi": rng.uniform(-0.1, 0.1)}), **ids))
                    elif r < 0.97:
                        run(p.Report(report=p.FailedReport(error="CUDA out of memory", exit_code=1), **ids))
                    else:
                        run(p.Cancel(target=job_id, reason="enough"))
                        run(p.Report(report=p.CancelledReport(), **ids))
                util = {"cpu": rng.uniform(0, 100), "mem": rng.uniform(0, 100)}
                gpus = [GpuSample(index=0, util=rng.uniform(0, 100), vram_used_gb=rng.uniform(0, 24),
                                  vram_total_gb=24)] if j.gpus else []
                run(p.Heartbeat(node=j.node, running=[(x, desk.state.jobs[x].lease_epoch) for x in node.running],
                                util=util if sample else {}, gpus=gpus if sample else []))
                run(p.Ready(node=j.node))
            events.extend(desk.tick(now, mono).events)
    return events
