"""How long everyday commands take, beside a bare interpreter start, in one run.

A real broker (`evo broker`) in a temporary home; each command is run --runs times as a user
runs it (the `evo` entry point, a fresh process each time), alternating so that the machine's
drift touches all alike. The baseline is the same interpreter importing only what any client
needs (`python -c "import zmq, msgspec"`). Printed: p50 and p90 of each, and p50 / baseline.

    python bench/cli.py [--runs 21]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVO = str(Path(sys.executable).with_name("evo"))
COMMANDS = {
    "bare python (zmq, msgspec)": [sys.executable, "-c", "import zmq, msgspec"],
    "evo submit -- true": [EVO, "submit", "--", "true"],
    "evo status": [EVO, "status"],
    "evo sql 'SELECT 1'": [EVO, "sql", "SELECT 1"],
    "evo --version": [EVO, "--version"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="evo-bench-cli-"))
    env = {**os.environ, "EVO_HOME": str(home / ".evo")}
    env.pop("EVO_BROKER", None)
    # As a user's shell runs them: Python keeps its compiled modules (a session that turns
    # that off pays for compiling evo's own modules at every command, 30-50 ms here).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    broker = subprocess.Popen([EVO, "broker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (home / ".evo" / "broker.json").exists():
            if time.monotonic() > deadline or broker.poll() is not None:
                raise SystemExit("the broker did not start")
            time.sleep(0.05)
        for argv in COMMANDS.values():  # once unmeasured: the compiled modules are written
            subprocess.run(argv, env=env, cwd=home, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        times: dict[str, list[float]] = {k: [] for k in COMMANDS}
        for _ in range(args.runs):
            for name, argv in COMMANDS.items():
                t0 = time.perf_counter()
                subprocess.run(argv, env=env, cwd=home, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["bare python (zmq, msgspec)"])
        print(f"{args.runs} runs each, alternating; ms")
        for name, ts in times.items():
            p50 = statistics.median(ts) * 1000
            p90 = statistics.quantiles(ts, n=10)[-1] * 1000
            print(f"  {name:<28} p50 {p50:6.1f}  p90 {p90:6.1f}  p50/bare {p50 / 1000 / base:4.2f}")
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
