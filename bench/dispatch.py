"""How fast evo turns queued jobs into finished ones, end to end, in one run.

A broker process and a node process (2 slots), both real daemons on loopback, as `evo broker`
and `evo node` start them. Every job is durable at each step (JobSubmitted, JobLeased,
JobStarted, JobCompleted: four fsynced events).

1. No-op callable jobs (``builtins:dict``: returns {} at once) through warm workers: jobs/s
   from the first submit to the last JobCompleted.
2. No-op command jobs (``true``): the same, paying a fork and exec per job.
3. 200 short trials (a fixed amount of CPU work each) through evo and through
   joblib.Parallel(n_jobs=2), the baseline: per-trial overhead = (evo wall - joblib wall) / 200;
   then the same trials as a sweep run by `evo sweep SPEC --wait` (a fresh CLI process, timed
   from outside, the cluster warm).

    python bench/dispatch.py [--jobs 3000] [--commands 300] [--trials 200] [--trial-ms 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.trials import spin  # noqa: E402
from evo.client import Client, make_spec  # noqa: E402
from evo.home import read_broker_file  # noqa: E402


def evo(*args: str) -> list[str]:
    return [sys.executable, "-m", "evo.cli.app", *args]


class Cluster:
    """A broker and one 2-slot node in a temporary home; stopped on exit."""

    def __init__(self, slots: int) -> None:
        out = ROOT / "bench" / "out"  # like ./.evo, on the project's disk
        out.mkdir(parents=True, exist_ok=True)
        self.home = Path(tempfile.mkdtemp(prefix="dispatch-", dir=out))
        env = dict(os.environ, EVO_HOME=str(self.home), PYTHONPATH=str(ROOT))
        self.log = open(self.home / "daemons.log", "wb")  # noqa: SIM115
        self.broker = subprocess.Popen(evo("broker"), env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while not (info := read_broker_file(self.home)) or info.get("pid") != self.broker.pid:
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)
        self.address = info["address"]
        self.node = subprocess.Popen(evo("node", "--name", "bench", "--slots", str(slots),
                                         "--cpus", str(slots)),
                                     env=env, stdout=self.log, stderr=self.log)
        with Client(self.address) as c:
            while not any(n["alive"] for n in c.status().nodes):
                time.sleep(0.05)
        self.settle(slots)

    def settle(self, slots: int, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
        """Wait until the node's warm workers have started and finished their imports: at
        least ``slots`` processes below the node, and no CPU spent by any of them for
        ``quiet_s`` (a search timed from here starts on warm workers, as a user's does)."""
        import psutil

        node = psutil.Process(self.node.pid)
        deadline = time.monotonic() + limit_s
        last, since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            kids = node.children(recursive=True)
            try:
                used = sum(sum(k.cpu_times()[:2]) for k in kids)
            except psutil.NoSuchProcess:
                continue
            if len(kids) >= slots and used == last:
                if time.monotonic() - since >= quiet_s:
                    return
            else:
                last, since = used, time.monotonic()
            time.sleep(0.05)

    def run(self, specs: list) -> tuple[float, int]:
        """Submit every spec (pipelined), wait for all to finish; (wall seconds, completed)."""
        with Client(self.address, timeout_s=30) as c:
            start_seq = c.hello().last_seq
            t0 = time.perf_counter()
            ids = set(c.submit_many(specs, window=256))
            finished = 0
            completed = 0
            for ev in c.follow(start_seq + 1, idle_s=0.2):
                name = type(ev).__name__
                if getattr(ev, "job_id", None) in ids and (
                        name in ("JobCompleted", "JobCancelled")
                        or (name == "JobFailed" and ev.final)):
                    finished += 1
                    completed += name == "JobCompleted"
                    if finished == len(ids):
                        break
            return time.perf_counter() - t0, completed

    def close(self) -> None:
        for proc in (self.node, self.broker):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def fs_cost(where: Path, n: int = 300) -> float:
    """Microseconds to make an attempt's folders and files (what every job costs the disk)."""
    d = Path(tempfile.mkdtemp(dir=where))
    t0 = time.perf_counter()
    for i in range(n):
        a = d / f"j{i}" / "attempt-1"
        a.mkdir(parents=True)
        (d / f"j{i}" / "checkpoints").mkdir()
        for name in ("stdout.log", "stderr.log"):
            open(a / name, "ab").close()
    cost = (time.perf_counter() - t0) / n * 1e6
    shutil.rmtree(d)
    return cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--commands", type=int, default=300)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--trial-ms", type=float, default=20.0)
    ap.add_argument("--slots", type=int, default=2)
    a = ap.parse_args()
    print(f"evo dispatch bench: {os.cpu_count()} cores, node with {a.slots} slots, "
          f"every event fsynced\n")
    cl = Cluster(a.slots)
    print(f"home {cl.home}: {fs_cost(cl.home):.0f} us to make one attempt's folders and files "
          f"(/tmp here: {fs_cost(Path(tempfile.gettempdir())):.0f} us)\n")
    try:
        noop = [make_spec(callable="builtins:dict") for _ in range(a.jobs)]
        wall, ok = cl.run(noop)
        print(f"no-op callables  {a.jobs:>6} jobs  {wall:7.2f} s  {ok / wall:8.0f} jobs/s"
              f"   (target >= 1000/s)")
        cmds = [make_spec(["true"]) for _ in range(a.commands)]
        wall, ok = cl.run(cmds)
        print(f"no-op commands   {a.commands:>6} jobs  {wall:7.2f} s  {ok / wall:8.0f} jobs/s")
        trials = [make_spec(callable="bench.trials:spin", params={"ms": a.trial_ms, "seed": i})
                  for i in range(a.trials)]
        evo_wall, ok = cl.run(trials)
        assert ok == a.trials, f"{a.trials - ok} trials did not complete"
        # The same trials as a user runs them: `evo sweep SPEC --wait`, a fresh CLI process
        # (its start, the repository's files hashed and offered to the store, following
        # the events to the leaderboard), timed from outside; the first run fills the store.
        spec = cl.home / "spin.yaml"
        spec.write_text(f"name: spin\ncallable: bench.trials:spin\nworkdir: {ROOT}\n"
                        f"metric: score\nparams:\n  ms: {a.trial_ms}\n"
                        f"space:\n  seed: {list(range(a.trials))}\n")
        env = dict(os.environ, EVO_HOME=str(cl.home), PYTHONPATH=str(ROOT))
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's shell runs it (bench/cli.py)
        cli_walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run(evo("sweep", str(spec), "--wait"), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cli_walls.append(time.perf_counter() - t0)
    finally:
        cl.close()
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    Parallel(n_jobs=2)(delayed(spin)(ms=a.trial_ms, seed=i) for i in range(a.trials))
    jl_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.trials):
        spin(ms=a.trial_ms, seed=i)
    serial = time.perf_counter() - t0
    over = (evo_wall - jl_wall) / a.trials * 1000
    print(f"\n{a.trials} trials of {a.trial_ms:g} ms CPU each (serial {serial:.2f} s):")
    print(f"  joblib n_jobs=2  {jl_wall:7.2f} s")
    print(f"  evo (2 slots)    {evo_wall:7.2f} s   ratio {evo_wall / jl_wall:.2f}x")
    print(f"  evo overhead per trial vs joblib: {over:+.2f} ms   (target <= 5 ms)")
    print(f"  `evo sweep --wait` (a fresh CLI) {cli_walls[1]:7.2f} s (its first run, filling the "
          f"store: {cli_walls[0]:.2f} s): {(cli_walls[1] - jl_wall) / a.trials * 1000:+.2f} ms "
          f"per trial vs joblib   (target <= 2 ms)")


if __name__ == "__main__":
    main()
