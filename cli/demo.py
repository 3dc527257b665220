"""`make demo`: the multi-model comparison end to end, on real processes, in a fresh EVO_HOME.

1. start `evo broker` and `evo node` (a local node with 2 slots) as real processes;
2. `evo sweep configs/ensemble.yaml --plan`, then `--wait`: GLM, XGBoost, RandomForest and an MLP,
   each uncalibrated, with Platt and with isotonic calibration (12 experiments), validated
   walk-forward by season on the synthetic games data; the leaderboard and the best
   configuration at the end;
3. `evo report` (per-experiment JSON/CSV, comparison CSV, LaTeX table, ROC and calibration PDFs,
   utilization per node) and `evo audit` of the best experiment;
4. `evo replay --verify`: the projections rebuilt from the log match the live ones.

The MLP needs torch (the `nn` extra, which `make` installs); without it those three experiments
fail with a clear message and the other nine still compare.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HOME = Path(os.environ.get("EVO_DEMO_HOME", ".evo-demo")).absolute()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def evo(*args: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI with the demo's home; its output goes straight to the terminal."""
    env = dict(os.environ, EVO_HOME=str(HOME))
    env.pop("EVO_BROKER", None)
    r = subprocess.run([sys.executable, "-m", "evo.cli.app", *args], env=env, text=True,
                       stdout=None if show else subprocess.PIPE)
    if check and r.returncode != 0:
        raise SystemExit(f"evo {' '.join(args)} failed with exit {r.returncode}")
    return r


def daemon(*args: str) -> subprocess.Popen:
    log = open(HOME / f"{args[0]}.log", "ab")  # noqa: SIM115 - kept open for the daemon's life
    return subprocess.Popen([sys.executable, "-m", "evo.cli.app", "--home", str(HOME), *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_broker(proc: subprocess.Popen, home: Path = HOME, log: str = "broker.log",
                timeout_s: float = 30) -> None:
    """Until the broker ``proc`` has written its ``broker.json``; exits naming its log if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads((home / "broker.json").read_text()).get("pid") == proc.pid:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"broker exited: {(home / log).read_text()}")
        time.sleep(0.05)
    raise SystemExit("broker did not start")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        step(f"broker and a local node (2 slots) in {HOME}")
        broker = daemon("broker")
        procs.append(broker)
        wait_broker(broker)
        procs.append(daemon("node", "--name", "local", "--slots", "2"))
        from evo.client import Client

        with Client(home=HOME) as c:
            deadline = time.monotonic() + 30
            while not any(n["alive"] for n in c.status().nodes):
                if time.monotonic() > deadline:
                    raise SystemExit(f"node did not join: {(HOME / 'node.log').read_text()}")
                time.sleep(0.1)
        ensemble = str(CONFIGS / "ensemble.yaml")
        step("the plan: where each model type goes")
        evo("sweep", ensemble, "--plan")
        step("the comparison: 4 models x 3 calibrations, walk-forward by season")
        r = evo("sweep", ensemble, "--wait", show=False)
        print(r.stdout, end="", flush=True)
        sweep_id = r.stdout.splitlines()[0].strip()
        best = json.loads((HOME / "sweeps" / sweep_id / "best.json").read_text())
        step("the report")
        out = HOME / "report"
        evo("report", sweep_id, "--out", str(out), show=False)
        for name in ("comparison.csv", "comparison.tex", "roc.pdf", "calibration.pdf",
                     "utilization.csv", "summary.yaml"):
            print(f"    {out / name}")
        print(f"    {out / 'experiments'}/<job>.json|csv ({len(list((out / 'experiments').glob('*.json')))} experiments)")
        step(f"audit the best experiment ({best['job_id']}): re-run from its record, compare")
        evo("audit", best["job_id"])
        step("replay the log into fresh projections and compare with the live ones")
        evo("replay", "--verify")
        print(f"\ndone in {time.monotonic() - t0:.0f}s; explore with: "
              f"EVO_HOME={HOME} .venv/bin/evo sql \"SELECT * FROM leaderboard WHERE metric = 'auc'\"")
        print(f"or in a browser (http://127.0.0.1:8765/; Ctrl-C stops both): "
              f"(export EVO_HOME={HOME}; .venv/bin/evo broker & .venv/bin/evo ui; kill %1)")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
