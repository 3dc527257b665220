"""Projection speed at scale, in one run: apply, queries, full replay, and DuckDB's own ceiling.

A legal history of N events is made by the real Desk (broker/history.py; cached under
bench/out). Then:
  * apply: the events into a fresh evo.duckdb as a follower catching up does (batches of
    --batch, staged in a thread while DuckDB folds the previous one, one checkpoint at the
    end) (events/s; the median of --runs runs, each into a new file);
  * live apply: the last --live events again, on a file caught up to just before them, in
    batches of --live-batch as the running broker's follower applies them (events/s, ms per
    batch); its digest must equal the first file's (incremental equals full);
  * queries on the result: the leaderboard of the largest sweep and the queue (median of 20);
  * full replay: from nothing, as `evo replay` does (s);
  * ceiling: DuckDB inserting the same rows, already flat in Arrow (the events table exactly,
    payload JSON included), into an events table of the same definition in batches of
    --batch, with a checkpoint at the end (rows/s): what storing the log costs with no
    parsing and no derived tables.

    python bench/projections.py [--events 1000000] [--batch 368640] [--runs 3]
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

from evo.events.codec import encode  # noqa: E402
from evo.broker.history import generate  # noqa: E402
from evo.projections.store import CATCH_UP_BATCH, Projection, replay  # noqa: E402


def history(n: int, util_every: int = 1, first_sweep: int = 0) -> list[bytes]:
    import hashlib

    made_by = hashlib.sha256((ROOT / "broker" / "history.py").read_bytes()).hexdigest()[:12]
    every = (f"-u{util_every}" if util_every != 1 else "") + (
        f"-s{first_sweep}" if first_sweep else "")
    cache = ROOT / "bench" / "out" / f"history-{n}{every}-{made_by}.pkl"  # a new generator, anew
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    t0 = time.perf_counter()
    raws = [encode(e) for e in generate(n, seed=1, util_every=util_every,
                                        first_sweep=first_sweep)]
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
    ap.add_argument("--batch", type=int, default=CATCH_UP_BATCH)
    ap.add_argument("--live", type=int, default=100_000)
    ap.add_argument("--live-batch", type=int, default=1_000)
    ap.add_argument("--runs", type=int, default=3, help="apply runs (the median is shown)")
    a = ap.parse_args()
    raws = history(a.events)
    n = len(raws)
    tmp = Path(tempfile.mkdtemp(dir=ROOT / "bench" / "out"))
    try:
        applies = []
        for r in range(a.runs):  # this VM's speed drifts by 10% over minutes: a median
            if r:
                proj.close()
                (tmp / "evo.duckdb").unlink()
            proj = Projection(tmp / "evo.duckdb")
            t0 = time.perf_counter()
            proj.catch_up(raws, a.batch)
            applies.append(time.perf_counter() - t0)
        apply_s = statistics.median(applies)
        sweep = proj.con.execute("SELECT sweep_id FROM sweeps ORDER BY jobs DESC, sweep_id "
                                 "LIMIT 1").fetchall()[0][0]
        lb = timed(lambda: proj.query(
            f"SELECT * FROM leaderboard WHERE sweep_id = '{sweep}' AND metric = 'auc' "
            "ORDER BY rank LIMIT 10"))
        qq = timed(lambda: proj.query("SELECT * FROM queue LIMIT 50"))
        jobs = proj.con.execute("SELECT count(*) FROM jobs").fetchall()[0][0]
        live = proj.digest()[0]
        proj.close()

        split = n - a.live
        inc = Projection(tmp / "live.duckdb")
        inc.catch_up(raws[:split], a.batch)
        t0 = time.perf_counter()
        for i in range(split, n, a.live_batch):
            inc.apply(raws[i:i + a.live_batch])
        live_s = time.perf_counter() - t0
        inc_same = inc.digest()[0] == live
        inc.close()

        t0 = time.perf_counter()
        full = replay(raws, tmp / "replay.duckdb")
        replay_s = time.perf_counter() - t0
        same = full.digest()[0] == live
        flat = full.con.sql("SELECT * FROM events ORDER BY seq").to_arrow_table()
        full.close()
        con = Projection(tmp / "ceiling.duckdb").con  # the same events table definition
        t0 = time.perf_counter()
        for batch in flat.to_batches(a.batch):
            con.execute("INSERT INTO events SELECT * FROM batch")
        con.execute("CHECKPOINT")
        ceil_s = time.perf_counter() - t0
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_live = n - split
    print(f"{n:,} events, {jobs:,} jobs; catch-up batches of {a.batch:,}")
    print(f"apply        {apply_s:6.2f} s  {n / apply_s:10,.0f} events/s   (target >= 300,000/s); "
          f"median of {len(applies)}: " + ", ".join(f"{x:.2f}" for x in applies) + " s")
    print(f"ceiling      {ceil_s:6.2f} s  {n / ceil_s:10,.0f} rows/s     DuckDB Arrow insert of "
          f"the flat events rows; apply/ceiling = {ceil_s / apply_s:.2f}")
    print(f"live apply   {live_s:6.2f} s  {n_live / live_s:10,.0f} events/s   last {n_live:,} "
          f"events in batches of {a.live_batch:,}: {live_s * 1000 * a.live_batch / n_live:.1f} "
          f"ms per batch; digest equals the catch-up: {inc_same}")
    print(f"leaderboard  {lb:6.1f} ms (median of 20)   (target <= 50 ms)")
    print(f"queue        {qq:6.1f} ms (median of 20)   (target <= 50 ms)")
    print(f"replay       {replay_s:6.2f} s  from nothing   (target <= 10 s); digest equals "
          f"the apply: {same}")


if __name__ == "__main__":
    main()
