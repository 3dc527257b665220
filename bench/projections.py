"""Projection speed at scale, in one run: apply, queries, full replay, and DuckDB's own ceiling.

A legal history of N events is made by the real Desk (projections/history.py; cached under
bench/out). Then:
  * apply: the events in batches of --batch into a fresh evo.duckdb file (events/s);
  * queries on the result: the leaderboard of one sweep and the queue (median of 20, ms);
  * full replay: from nothing, in one pass, as `evo replay` does (s);
  * ceiling: DuckDB inserting the same rows, already flattened in one Arrow table, into a
    plain table (rows/s): what a projection would cost with no JSON, no derived tables.

    python bench/projections.py [--events 1000000] [--batch 50000]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from evo.events.codec import encode  # noqa: E402
from evo.projections.history import generate  # noqa: E402
from evo.projections.store import Projection, replay  # noqa: E402


def history(n: int) -> list[bytes]:
    cache = ROOT / "bench" / "out" / f"history-{n}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    t0 = time.perf_counter()
    raws = [encode(e) for e in generate(n, seed=1)]
    print(f"generated {len(raws):,} events with the Desk in {time.perf_counter() - t0:.1f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(raws))
    return raws


def timed(fn, n: int = 20) -> float:  # noqa: ANN001
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=50_000)
    a = ap.parse_args()
    raws = history(a.events)
    n = len(raws)
    tmp = Path(tempfile.mkdtemp(dir=ROOT / "bench" / "out"))
    try:
        proj = Projection(tmp / "evo.duckdb")
        t0 = time.perf_counter()
        for i in range(0, n, a.batch):
            proj.apply(raws[i:i + a.batch])
        apply_s = time.perf_counter() - t0
        sweep = proj.con.execute("SELECT sweep_id FROM sweeps ORDER BY jobs DESC, sweep_id LIMIT 1").fetchall()[0][0]
        lb = timed(lambda: proj.query(
            f"SELECT * FROM leaderboard WHERE sweep_id = '{sweep}' AND metric = 'auc' ORDER BY rank LIMIT 10"))
        qq = timed(lambda: proj.query("SELECT * FROM queue LIMIT 50"))
        jobs = proj.con.execute("SELECT count(*) FROM jobs").fetchall()[0][0]
        live = proj.digest()[0]
        proj.close()
        t0 = time.perf_counter()
        full = replay(raws, tmp / "replay.duckdb")
        replay_s = time.perf_counter() - t0
        same = full.digest()[0] == live
        # ceiling: the same rows, already flat in Arrow, into a plain DuckDB table
        flat = full.con.sql("SELECT * FROM events").to_arrow_table()
        full.close()
        con = duckdb.connect(str(tmp / "ceiling.duckdb"))
        con.execute("CREATE TABLE events AS SELECT * FROM flat LIMIT 0")
        t0 = time.perf_counter()
        for batch in flat.to_batches(a.batch):
            con.execute("INSERT INTO events SELECT * FROM batch")
        ceil_s = time.perf_counter() - t0
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n:,} events, {jobs:,} jobs, batches of {a.batch:,}")
    print(f"apply        {apply_s:6.2f} s  {n / apply_s:10,.0f} events/s   (target >= 300,000/s)")
    print(f"ceiling      {ceil_s:6.2f} s  {n / ceil_s:10,.0f} rows/s     DuckDB Arrow insert of "
          f"the flat rows; apply/ceiling = {ceil_s / apply_s:.2f}")
    print(f"leaderboard  {lb:6.1f} ms (median of 20)   (target <= 50 ms)")
    print(f"queue        {qq:6.1f} ms (median of 20)   (target <= 50 ms)")
    print(f"replay       {replay_s:6.2f} s  from nothing   (target <= 10 s); digest equals "
          f"the incremental apply: {same}")


if __name__ == "__main__":
    main()
