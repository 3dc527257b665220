"""The fault suite at length: every scenario of tests/faultkit.py, with a row of figures each.

    python bench/faults.py [--rounds 20] [--fuzz 100000] [--quick]

Rows: kill -9 of the broker at random points under 4 keyed clients; a crash at each named
failpoint (written but not synced, synced but not acknowledged, mid segment rotation, mid
projection apply), each followed by a restart and the invariants (every acknowledged submit
once, the log checks whole, the projection equals a replay); a power loss that drops all that
was not fsynced, and the same with fsync switched off, where the check must see the loss;
a node killed, a node paused past its lease, the broker killed while jobs run; fuzzed frames at
the command and the query sockets; a 50,000,000-row query and a runaway one; random
corruptions of segment files. ``make test`` runs the
same scenarios with few rounds (tests/test_fault_suite.py).
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import faultkit  # noqa: E402

logging.getLogger("evo").setLevel(logging.ERROR)  # the scenarios damage logs on purpose


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="kill -9 rounds under load")
    ap.add_argument("--failpoint-rounds", type=int, default=5)
    ap.add_argument("--power-rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=20, help="jobs per node fault")
    ap.add_argument("--fuzz", type=int, default=100_000, help="frames per socket")
    ap.add_argument("--corruptions", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="the test suite's sizes")
    ap.add_argument("--seed", type=int, default=13)
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.failpoint_rounds, a.power_rounds, a.jobs, a.fuzz, a.corruptions = \
            4, 1, 1, 8, 2000, 40
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="evo-faults-"))
    rows: list[faultkit.Row] = []

    def run(what, *args, **kw):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = what(tmp, *args, rng=rng, **kw)
        for row in out if isinstance(out, list) else [out]:
            rows.append(row)
            print(f"  {row.fault}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    try:
        run(faultkit.kill9_under_load, a.rounds)
        for point in faultkit.FAILPOINTS:
            run(faultkit.failpoint_crash, point, a.failpoint_rounds)
        run(faultkit.power_loss, a.power_rounds)
        run(faultkit.power_loss, max(1, a.power_rounds // 2), sync=False)
        for fault in ("kill9", "sigstop", "broker"):
            run(faultkit.node_faults, fault, a.jobs)
        run(faultkit.fuzz, a.fuzz)
        run(faultkit.hostile_queries)
        run(faultkit.corruptions, a.corruptions)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cells = [faultkit.HEADER, *(r.cells() for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(faultkit.HEADER))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    bad = [r.fault for r in rows if (r.lost or r.duplicated or r.crashes or r.broken)
           and "fsync switched off" not in r.fault]
    print(f"\n{'all invariants held' if not bad else 'FAILED: ' + '; '.join(bad)} "
          "(the fsync-off row must lose acknowledged submits: that the check can fail)")
    if any("fsync switched off" in r.fault and not r.lost for r in rows):
        print("FAILED: with fsync off nothing was lost: the power-loss check cannot fail")
        sys.exit(1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
