"""A learning sweep on real processes: a broker, a node with warm workers, the user's own
callable; the submitting CLI gone, and the broker killed with -9 in the middle of the sweep."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from evo.client import Client
from tests.conftest import run_evo, wait_until

OBJECTIVE = '''
import time
import evo

def train(x, depth):
    loss = 0.0
    for epoch in range(1, 7):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.04:  # a little work per epoch
            pass
        loss = (x - 0.5) ** 2 + 0.05 * depth + 1.0 / epoch
        evo.report(step=epoch, loss=loss)
    return {"loss": loss}
'''

SWEEP = '''
name: learn
callable: objective:train
method: tpe
samples: 16
seed: 11
metric: loss
pruner: asha
space:
  x: {low: -2.0, high: 2.0}
  depth: {low: 1, high: 6, int: true}
'''


def _events(address: str) -> list:
    with Client(address, timeout_s=10) as c:
        return list(c.read_all(1))


def _ended(events: list) -> Counter:
    return Counter(type(e).__name__ for e in events
                   if type(e).__name__ in ("JobCompleted", "JobPruned")
                   or (type(e).__name__ == "JobFailed" and e.final))


def test_a_tpe_sweep_survives_kill_9_of_the_broker_losing_and_repeating_nothing(
        pbroker, nodes, tmp_path: Path):
    home, user = tmp_path / "home", tmp_path / "user"
    user.mkdir()
    (user / "objective.py").write_text(OBJECTIVE)
    (user / "learn.yaml").write_text(SWEEP)
    b = pbroker(home)
    nodes(home, "n1", "--slots", "2")
    r = run_evo("sweep", "learn.yaml", home=home, cwd=user)  # no --wait: the CLI is gone
    assert r.returncode == 0, r.stderr
    sweep = r.stdout.strip()
    wait_until(lambda: sum(_ended(_events(b.address)).values()) >= 4, 60,
               "four trials to end")
    b.kill()  # kill -9, trials in flight
    b = pbroker(home)
    events = wait_until(lambda: (lambda evs: evs if any(
        type(e).__name__ == "SweepCompleted" for e in evs) else None)(_events(b.address)),
        120, "the sweep to complete after the restart")
    trials = [e for e in events if type(e).__name__ == "JobSubmitted"]
    assert len(trials) == 16  # none asked twice, none lost
    assert all(e.spec.sweep_id == sweep for e in trials)
    assert len({(e.spec.params["x"], e.spec.params["depth"]) for e in trials}) == 16
    ends = [e for e in events if type(e).__name__ in ("JobCompleted", "JobPruned")
            or (type(e).__name__ == "JobFailed" and e.final)]
    by_job = Counter(e.job_id for e in ends)
    assert set(by_job) == {e.job_id for e in trials} and set(by_job.values()) == {1}, by_job
    assert not any(type(e).__name__ == "JobFailed" and e.final for e in ends)
    (done,) = [e for e in events if type(e).__name__ == "SweepCompleted"]
    assert done.completed + done.pruned == 16 and done.pruned > 0, done
    audit = run_evo("audit", sweep, home=home)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "16 suggestions" in audit.stdout
    board = run_evo("leaderboard", sweep, home=home)
    assert board.returncode == 0, board.stderr
    assert f"16 trials asked: {done.completed} completed, {done.pruned} pruned (" in board.stdout
    assert "best loss (min) after trial" in board.stdout
    with_pruned = run_evo("leaderboard", sweep, "--pruned", "--top", "100", "--format", "csv",
                          home=home)
    assert with_pruned.stdout.count(",pruned,") == done.pruned, with_pruned.stdout
    report = run_evo("report", sweep, "--out", str(tmp_path / "report"), home=home)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "convergence.pdf").stat().st_size > 1000
    import yaml

    summary = yaml.safe_load((tmp_path / "report" / "summary.yaml").read_text())
    assert summary["experiments"]["pruned"] == done.pruned
    assert sum(summary["learning"]["pruned_at_resource"].values()) == done.pruned


def test_a_users_own_sampler_drives_a_study_through_the_client(pbroker, nodes, tmp_path: Path):
    import random

    home, user = tmp_path / "home", tmp_path / "user"
    user.mkdir()
    (user / "objective.py").write_text(OBJECTIVE)
    b = pbroker(home)
    nodes(home, "n1", "--slots", "2")
    rng = random.Random(5)

    def ask() -> dict:
        return {"x": rng.uniform(-2, 2), "depth": rng.randint(1, 6)}

    with Client(b.address) as c:
        study = c.study("mine", callable="objective:train", workdir=str(user), samples=8,
                        metric="loss", pruner="asha")
        asked = [study.submit(ask()) for _ in range(2)]
        told = []
        for trial in study.results(timeout_s=120):
            told.append(trial)
            if study.asked < study.samples:
                asked.append(study.submit(ask()))
        assert study.done and sorted(t.job_id for t in told) == sorted(asked)
        assert len(asked) == 8 and {t.state for t in told} <= {"completed", "pruned"}
        for t in told:  # the value it is told: final, or the last it reported when pruned
            curve = [(t.params["x"] - 0.5) ** 2 + 0.05 * t.params["depth"] + 1.0 / e
                     for e in range(1, 7)]
            assert t.value == curve[-1] if t.state == "completed" else t.value in curve[:-1], t
        best = study.best()
        completed = [t for t in told if t.state == "completed"]
        assert best is not None and best.value == min(t.value for t in completed)
        again = c.study("mine", samples=8, sweep_id=study.sweep_id)
        assert again.asked == 8 and [t.job_id for t in again.results(timeout_s=5)] == \
            [t.job_id for t in told]
        try:
            study.submit(ask())
        except Exception as exc:  # noqa: BLE001 - the broker's refusal
            assert "complete" in str(exc) or "takes 8 trials" in str(exc), exc
        else:
            raise AssertionError("a ninth trial was taken")


LOOPER = '''
import time
import evo

def forever():
    step = 0
    while True:  # stopped only by evo: evo.report raises evo.Stopped once it is asked
        step += 1
        time.sleep(0.02)
        evo.report(step=step, loss=1.0 / step)

def quick():
    return {"ok": 1.0}
'''


def test_a_stopped_warm_task_ends_at_its_next_report_and_its_worker_stays_warm(
        pbroker, nodes, tmp_path: Path):
    home, user = tmp_path / "home", tmp_path / "user"
    user.mkdir()
    (user / "looper.py").write_text(LOOPER)
    b = pbroker(home)
    nodes(home, "n1", "--slots", "1")
    with Client(b.address) as c:
        first = c.submit(callable="looper:forever", workdir=str(user))
        wait_until(lambda: any(type(e).__name__ == "Progress" and e.job_id == first
                               for e in c.read_all(1)), 60, "the loop to report")
        c.cancel(first)
        wait_until(lambda: any(type(e).__name__ == "JobCancelled" and e.job_id == first
                               for e in c.read_all(1)), 30, "the cancelled end")
        second = c.submit(callable="looper:quick", workdir=str(user))
        events = wait_until(lambda: (lambda evs: evs if any(
            type(e).__name__ == "JobCompleted" and e.job_id == second for e in evs) else None)(
            list(c.read_all(1))), 60, "the next job")
    pids = {e.job_id: e.pid for e in events if type(e).__name__ == "JobStarted"}
    assert pids[first] == pids[second] > 0  # the same warm worker ran both
