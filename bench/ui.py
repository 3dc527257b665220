"""The web page at scale: each page's server time at 100,000 jobs and 1,000,000 events, beside
the same page's queries run directly in DuckDB, in one run.

A legal history made by the real Desk (broker/history.py, ``--util-every 4``: about 100,000
jobs in 1,000,000 events, cached under bench/out) is written as a log; `evo broker` starts on
it and builds its projection; `evo ui` serves it. Each page's JSON route is asked ``--runs``
times: the server's own time (its Server-Timing header: the queries through the broker's
projection endpoint, the Arrow answers, the JSON) and the wall time of the request. Then both
stop and the projection file is opened in this process, read-only, and each page's queries
(ui/queries.py) are run on it directly: the floor the page's server time cannot beat.
Target: every page at most 200 ms of server time (median).

    python bench/ui.py [--events 1000000] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.projections import history  # noqa: E402
from bench.scale import Broker, caught_up, write_log  # noqa: E402
from evo.client import Client  # noqa: E402
from evo.ui import queries as q  # noqa: E402

EVO = [sys.executable, "-m", "evo.cli.app"]
TARGET_MS = 200.0


def pages(sweep_id: str, big: str, job_id: str, metric: str
          ) -> dict[str, tuple[str, list[q.Q]]]:
    """Each page: its route, and the queries its handler runs (ui/app.py)."""
    none = {k: None for k in q.FILTERS}
    done = {**none, "state": "completed"}
    return {
        "overview": ("/api/overview", [q.node_summary(), q.cpu_series(), q.gpu_series()]),
        "jobs": ("/api/jobs", [q.jobs_page(none, 0), q.jobs_total(none), q.choices()]),
        "jobs, completed, page 1000": ("/api/jobs?state=completed&page=1000",
                                       [q.jobs_page(done, 1000), q.jobs_total(done), q.choices()]),
        "job": (f"/api/jobs/{job_id}", [q.job(job_id), q.attempts(job_id), q.curves([job_id]),
                                        q.checkpoints(job_id)]),
        "sweeps": ("/api/sweeps", [q.sweeps()]),
        "sweep": (f"/api/sweeps/{sweep_id}", [q.sweep(sweep_id), q.leaderboard(sweep_id, metric, 50),
                                              q.ranked(sweep_id, metric),
                                              q.convergence(sweep_id, metric),
                                              q.pruned_by_rung(sweep_id)]),
        "sweep of 10,000 trials, top 50": (
            f"/api/sweeps/{big}", [q.sweep(big), q.leaderboard(big, metric, 50),
                                   q.ranked(big, metric), q.convergence(big, metric),
                                   q.pruned_by_rung(big)]),
        "the same, top 1,000": (
            f"/api/sweeps/{big}?top=1000", [q.sweep(big), q.leaderboard(big, metric, 1000),
                                            q.ranked(big, metric), q.convergence(big, metric),
                                            q.pruned_by_rung(big)]),
        "events": ("/api/events", [q.events()]),
        "events, Progress": ("/api/events?type=Progress", [q.events("Progress")]),
    }


def get(url: str) -> tuple[float, float]:
    """(server ms from Server-Timing, wall ms)."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
        timing = r.headers.get("Server-Timing", "")
    wall = (time.perf_counter() - t0) * 1000
    return float(timing.split("dur=")[1]) if "dur=" in timing else float("nan"), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--big-sweep", type=int, default=10_000,
                    help="the history's first sweep has this many trials (the sweep page's worst case)")
    a = ap.parse_args()
    raws = history(max(a.events, 1_000_000), 4, first_sweep=a.big_sweep)[:a.events]
    home = Path(tempfile.mkdtemp(prefix="ui-", dir=ROOT / "bench" / "out"))
    ui = None
    try:
        write_log(home, raws)
        b = Broker(home)
        took = caught_up(b, len(raws))
        with Client(b.address, timeout_s=600) as c:
            n_jobs = c.sql("SELECT count(*) AS n FROM jobs").to_pylist()[0]["n"]
            # the sweep with the most ranked trials, one of the usual size, and the job
            # with the most progress reports
            big, metric, n_big = c.sql(
                "SELECT sweep_id, metric, count(*) FROM leaderboard GROUP BY ALL "
                "ORDER BY count(*) DESC, sweep_id LIMIT 1").to_pylist()[0].values()
            sweep_id = c.sql("SELECT sweep_id FROM sweeps WHERE jobs < 100 ORDER BY sweep_id "
                             "LIMIT 1").to_pylist()[0]["sweep_id"]
            job_id = c.sql("SELECT job_id FROM metrics WHERE kind = 'progress' GROUP BY job_id "
                           "ORDER BY count(*) DESC, job_id LIMIT 1").to_pylist()[0]["job_id"]
        print(f"{len(raws):,} events, {n_jobs:,} jobs; the broker's projection caught up in "
              f"{took:.1f} s; sweeps {sweep_id} and {big} ({n_big:,} ranked trials), job "
              f"{job_id}", flush=True)
        port = 8700 + os.getpid() % 200
        env = {**os.environ, "EVO_HOME": str(home)}
        env.pop("EVO_BROKER", None)
        ui = subprocess.Popen([*EVO, "ui", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert ui.stderr is not None
        line = ui.stderr.readline().decode()
        assert "evo ui:" in line, line
        base = f"http://127.0.0.1:{port}"
        plan = pages(sweep_id, big, job_id, metric)
        served: dict[str, tuple[float, float]] = {}
        for name, (route, _) in plan.items():
            get(base + route)  # once unmeasured: the server's first client and imports
            runs = [get(base + route) for _ in range(a.runs)]
            served[name] = (statistics.median(r[0] for r in runs),
                            statistics.median(r[1] for r in runs))
        ui.terminate()
        ui.wait(30)
        ui = None
        b.stop()
        import duckdb

        con = duckdb.connect(str(home / "evo.duckdb"), read_only=True)
        direct: dict[str, float] = {}
        for name, (_, queries) in plan.items():
            for sql, params in queries:  # once unmeasured, as above
                con.sql(sql, params=params or None).to_arrow_table()
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                for sql, params in queries:
                    con.sql(sql, params=params or None).to_arrow_table()
                times.append((time.perf_counter() - t0) * 1000)
            direct[name] = statistics.median(times)
        con.close()
        print(f"\nmedian of {a.runs} requests per page, ms (target: server time <= {TARGET_MS:.0f})")
        print("| page | server time | request wall | its queries in DuckDB directly | server / direct | target |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in plan:
            s, w = served[name]
            d = direct[name]
            print(f"| {name} | {s:.1f} | {w:.1f} | {d:.1f} | {s / d:.1f}x | "
                  f"{'met' if s <= TARGET_MS else 'NOT met'} |")
        print(json.dumps({"events": len(raws), "jobs": n_jobs, "served": served,
                          "direct": direct}))
    finally:
        if ui is not None:
            ui.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
