"""Learning sweeps (method tpe, pruners asha and median) through the desk and the study, with
no processes: suggestions as events, pruning decisions as events, the study as a fold."""

from __future__ import annotations

import pytest

from evo.broker import protocol as p
from evo.broker.desk import Desk
from evo.broker.state import fold
from evo.events.schema import JobSpec
from evo.sweeps.study import Pruning, Study
from evo.sweeps.tpe import suggest

SPACE = {"x": {"low": -5.0, "high": 5.0}, "k": {"low": 1, "high": 8, "int": True},
         "opt": ["a", "b"]}


class Recording(Desk):
    """A desk that keeps every event it made: the log, as the broker would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list = []

    def handle(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        out = super().handle(*args, **kw)
        self.log += out.events
        return out

    def tick(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        out = super().tick(*args, **kw)
        self.log += out.events
        return out


def _spec(**over) -> dict:
    spec = {"name": "learn", "command": ["run", "{x}", "{k}", "{opt}"], "method": "tpe",
            "samples": 12, "seed": 7, "metric": "loss", "mode": "min", "space": SPACE}
    spec.update(over)
    return spec


def _submit(desk: Desk, now: float, **over) -> str:
    spec = _spec(**over)
    template = JobSpec(command=spec["command"], params={}, seed=spec["seed"], max_attempts=2)
    reply = desk.handle(p.SubmitSweep(name="learn", spec=spec, jobs=[template]), now).reply
    assert isinstance(reply, p.SweepAccepted), reply
    return reply.sweep_id


def _objective(params: dict) -> float:
    return (params["x"] - 1.0) ** 2 + 0.1 * params["k"] + (params["opt"] == "b")


def _run(desk: Desk, slots: int = 2, curve=None, now: float = 1000.0):  # noqa: ANN001
    """Drive the desk as a node would: Ready, Started, Progress, Completed; returns the order
    in which trials were leased and the events."""
    desk.handle(p.Join(node="n", cpus=8, mem_gb=8, slots=slots), now, mono=0.0)
    events = []
    running: dict[str, p.LeaseGrant] = {}
    for _ in range(200):
        out = desk.handle(p.Ready(node="n", max_leases=slots - len(running)), now, mono=0.0)
        events += out.events
        for g in out.reply.leases:
            running[g.job_id] = g
        if not running:
            break
        job_id, g = next(iter(running.items()))  # the oldest ends first
        params = desk.state.jobs[job_id].spec.params
        final = _objective(params)
        stopped = False
        for step in range(1, 10):
            value = curve(params, step) if curve else final
            out = desk.handle(p.Report(node="n", job_id=job_id, lease_epoch=g.lease_epoch,
                                       report=p.ProgressReport(step=step,
                                                               metrics={"loss": value})),
                              now, mono=0.0)
            events += out.events
            if out.reply.data.get("stop"):
                stopped = True
                break
        report = p.CancelledReport(reason="stopped") if stopped \
            else p.CompletedReport(metrics={"loss": final})
        out = desk.handle(p.Report(node="n", job_id=job_id, lease_epoch=g.lease_epoch,
                                   report=report), now, mono=0.0)
        events += out.events
        del running[job_id]
        now += 1
    return events


def test_a_tpe_sweep_asks_one_trial_per_free_slot_and_closes_after_its_samples():
    desk = Recording()
    sweep = _submit(desk, 1000.0)
    assert desk.state.sweeps[sweep].job_ids == []  # nothing is asked before a slot is free
    events = _run(desk, slots=2)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("JobSubmitted") == 12 and kinds.count("JobCompleted") == 12
    (done,) = [e for e in events if type(e).__name__ == "SweepCompleted"]
    assert done.completed == 12 and done.reason == "all 12 trials asked"
    # never more trials in flight than slots: each was asked when a slot could take it
    flight = peak = 0
    for e in events:
        flight += {"JobSubmitted": 1, "JobCompleted": -1}.get(type(e).__name__, 0)
        peak = max(peak, flight)
    assert peak == 2
    assert not desk.state.problems()


def test_the_same_recorded_results_give_the_same_suggestions():
    a, b = Recording(), Recording()
    _submit(a, 1000.0)
    _submit(b, 1000.0)
    ea, eb = _run(a), _run(b)
    pa = [e.spec.params for e in ea if type(e).__name__ == "JobSubmitted"]
    pb = [e.spec.params for e in eb if type(e).__name__ == "JobSubmitted"]
    assert pa == pb and len({repr(x) for x in pa}) == 12
    # and the fold of the log holds the study the desk had: the next suggestion agrees
    state = fold(a.log)
    (sweep,) = state.sweeps.values()
    assert sweep.study is not None and len(sweep.study.trials) == 12
    live = a.state.sweeps[sweep.sweep_id].study
    assert suggest(sweep.study, SPACE) == suggest(live, SPACE)
    # the command's placeholders are the suggested values
    first = next(e for e in ea if type(e).__name__ == "JobSubmitted")
    x, k, opt = first.spec.params["x"], first.spec.params["k"], first.spec.params["opt"]
    assert first.spec.command == ["run", str(x), str(k), opt] and isinstance(k, int)
    assert -5 <= x <= 5 and 1 <= k <= 8 and opt in ("a", "b")


def test_asha_prunes_and_a_pruned_trial_ends_pruned_told_with_its_last_value():
    desk = Recording()
    sweep = _submit(desk, 1000.0, pruner="asha", samples=20)
    # known curves: loss falls with the steps towards the trial's objective
    events = _run(desk, slots=1, curve=lambda params, step: _objective(params) + 4.0 / step)
    kinds = [type(e).__name__ for e in events]
    asked = [e for e in events if type(e).__name__ == "PruneRequested"]
    assert asked and kinds.count("JobPruned") == len(asked)
    assert {e.resource for e in asked} <= {1, 3, 9}  # the rungs: 1, 3, 9 values reported
    (done,) = [e for e in events if type(e).__name__ == "SweepCompleted"]
    assert done.pruned == len(asked) and done.completed + done.pruned == 20
    study = desk.state.sweeps[sweep].study
    for e in asked:
        trial = study.trials[e.job_id]
        assert trial.state == "pruned" and trial.value == trial.values[-1] == e.value
        assert desk.state.jobs[e.job_id].state == "pruned"
    why = desk.handle(p.Why(job_id=asked[0].job_id), 2000.0).reply.text
    assert why.startswith(f"{asked[0].job_id} is pruned by its sweep's pruner: rung ")
    assert not desk.state.problems()


def test_a_lost_lease_runs_the_trial_again_with_the_same_parameters():
    desk = Recording()
    sweep = _submit(desk, 1000.0, samples=2)
    desk.handle(p.Join(node="n", cpus=8, mem_gb=8, slots=1, heartbeat_s=1.0), 1000.0, mono=0.0)
    (g,) = desk.handle(p.Ready(node="n", max_leases=1), 1000.0, mono=0.0).reply.leases
    desk.handle(p.Report(node="n", job_id=g.job_id, lease_epoch=g.lease_epoch,
                         report=p.StartedReport(pid=1)), 1000.0, mono=0.0)
    out = desk.tick(1010.0, 10.0)
    assert [type(e).__name__ for e in out.events] == ["LeaseExpired", "RetryScheduled", "NodeLost"]
    desk.handle(p.Join(node="n", cpus=8, mem_gb=8, slots=1), 1020.0, mono=20.0)
    (again,) = desk.handle(p.Ready(node="n", max_leases=1), 1020.0, mono=20.0).reply.leases
    assert again.job_id == g.job_id and again.spec.params == g.spec.params
    assert len(desk.state.sweeps[sweep].job_ids) == 1  # no new trial asked in its place


def test_asha_decides_as_optunas_successive_halving_on_the_same_values():
    optuna = pytest.importorskip("optuna")
    import random

    rng = random.Random(3)
    curves = [[rng.random() + 0.1 * s for s in range(1, 10)] for _ in range(30)]
    ours = Study(metric="m", mode="max", samples=30,
                 pruning=Pruning(kind="asha", min_resource=1, reduction_factor=3))
    mine = []
    for i, curve in enumerate(curves):
        ours.asked(f"j{i}", {})
        for step, v in enumerate(curve, 1):
            why = ours.progress(f"j{i}", {"m": v})
            if why:
                ours.told_to_stop(f"j{i}", why)
                ours.ended(f"j{i}", "pruned")
                mine.append((i, step))
                break
        else:
            ours.ended(f"j{i}", "complete", {"m": curve[-1]})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=3))
    theirs = []
    for i, curve in enumerate(curves):
        t = study.ask()
        for step, v in enumerate(curve, 1):
            t.report(v, step)
            if t.should_prune():
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                theirs.append((i, step))
                break
        else:
            study.tell(t, curve[-1])
    assert mine == theirs and mine


def test_median_prunes_a_trial_worse_than_the_completed_median():
    s = Study(metric="loss", mode="min", samples=10, pruning=Pruning(kind="median",
                                                                     startup_trials=2))
    for i, v in enumerate((1.0, 2.0)):
        s.asked(f"j{i}", {})
        s.progress(f"j{i}", {"loss": v})
        s.ended(f"j{i}", "complete", {"loss": v})
    s.asked("j2", {})
    assert s.progress("j2", {"loss": 1.4}) == ""  # better than the median 1.5
    s.asked("j3", {})
    assert "median 1.5" in s.progress("j3", {"loss": 1.6})


def test_a_target_reached_stops_asking_and_a_time_budget_closes_at_the_tick():
    s = Study(metric="auc", mode="max", samples=100, target=0.8)
    s.asked("j1", {})
    s.ended("j1", "complete", {"auc": 0.81})
    assert "reached the target" in s.why_done(0.0)
    desk = Recording()
    sweep = _submit(desk, 1000.0, time_budget_s=5.0)
    out = desk.tick(1006.0, 6.0)  # no node came: the budget is spent with nothing asked
    (done,) = [e for e in out.events if type(e).__name__ == "SweepCompleted"]
    assert done.sweep_id == sweep and "time budget" in done.reason


def test_a_learning_sweep_with_a_bad_record_is_refused_with_the_path():
    desk = Recording()
    template = JobSpec(command=["run"])
    bad = _spec(space={"x": {"low": 3.0, "high": 1.0}})
    reply = desk.handle(p.SubmitSweep(name="learn", spec=bad, jobs=[template]), 1.0).reply
    assert reply.code == "invalid" and "$.spec.space.x" in reply.message
    assert desk.state.last_seq == 0


def test_the_audit_derives_every_decision_again_and_names_a_tampered_result():
    import msgspec

    from evo.broker.audit import audit_sweep
    from evo.events.schema import JobCompleted

    desk = Recording()
    sweep = _submit(desk, 1000.0, pruner="asha", samples=16)
    _run(desk, slots=2, curve=lambda params, step: _objective(params) + 4.0 / step)
    ok, lines = audit_sweep(desk.log, sweep)
    assert ok, lines
    assert "16 suggestions" in lines[0] and "matches the log" in lines[-1]
    # one trial's result changed in the log: what the sampler suggests after it changes too
    done = [i for i, e in enumerate(desk.log) if type(e) is JobCompleted]
    i = done[0]
    tampered = list(desk.log)
    tampered[i] = msgspec.structs.replace(tampered[i], metrics={"loss": -100.0})
    ok, lines = audit_sweep(tampered, sweep)
    assert not ok and "difference" in lines[1], lines
    assert "recorded {" in lines[2] and "derived {" in lines[2]
    # and a pruning decision that the pruner would not make is named
    pruned = next(i for i, e in enumerate(desk.log) if type(e).__name__ == "PruneRequested")
    forged = list(desk.log)
    forged[pruned] = msgspec.structs.replace(forged[pruned], resource=99)
    ok, lines = audit_sweep(forged, sweep)
    assert not ok and any("the pruner decides at" in line for line in lines), lines
    ok, lines = audit_sweep(desk.log, "s9")
    assert not ok and lines == ["no sweep 's9' in the log"]


def test_cancelling_a_study_completes_it_and_stops_its_trials():
    desk = Recording()
    sweep = _submit(desk, 1000.0, samples=10)
    desk.handle(p.Join(node="n", cpus=8, mem_gb=8, slots=2), 1000.0, mono=0.0)
    leases = desk.handle(p.Ready(node="n", max_leases=2), 1000.0, mono=0.0).reply.leases
    assert len(leases) == 2
    out = desk.handle(p.Cancel(target=sweep), 1001.0)
    kinds = [type(e).__name__ for e in out.events]
    assert kinds == ["CancelRequested", "CancelRequested", "SweepCompleted"]
    assert out.events[-1].reason == "cancelled"
    assert desk.handle(p.Ready(node="n", max_leases=2), 1001.0, mono=1.0).reply.cancel
    assert len(desk.state.sweeps[sweep].job_ids) == 2  # nothing more asked
