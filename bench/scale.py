"""A broker at scale, in one run: restarts over long logs, and many nodes on a long queue.

1. Restart (``--restart 100000,1000000``): a legal history of N events made by the real Desk
   (broker/history.py, cached under bench/out) is written as a log; then `evo broker` is
   started on it, twice: cold (no snapshot, no projection: the follower builds evo.duckdb
   from nothing in the background) and warm (after a clean stop, which leaves a snapshot of
   the state and an up-to-date projection). Printed: the time from start to the first
   answered `evo status`, the broker's RSS then and once the follower has caught up, beside
   the full fold of the same log in this process (decode + apply, no I/O: the floor a
   restart without a snapshot cannot beat); and a third time after a crash, with the newest
   snapshot SNAPSHOT_EVERY - 1 events behind the log (the most a kill -9 leaves to fold).
   Targets at 1,000,000 events: at most 2 s, at most 400 MB.
2. Load (``--nodes 8 --jobs 10000``): `evo broker`, then N light nodes (one thread each,
   speaking the real protocol through evo.Client: Join, Ready, Report, Heartbeat) against
   a queue of J jobs; each leased job is reported started and completed at once. Meanwhile a
   client sends `evo status`, `evo why` and a submit in turn. Printed: command latency p50
   and p99 (target p99 under 20 ms), leases per second, the broker's RSS.

    python bench/scale.py [--restart 100000,1000000] [--nodes 8] [--jobs 10000] [--skip-load]
                          [--util-every 4]

The histories are prefixes of one generated history of the largest size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.projections import history  # noqa: E402
from evo.broker import protocol as p  # noqa: E402
from evo.broker import snapshot  # noqa: E402
from evo.broker.server import SNAPSHOT_EVERY  # noqa: E402
from evo.broker.state import BrokerState  # noqa: E402
from evo.client import Client  # noqa: E402
from evo.events.codec import decode  # noqa: E402
from evo.events.log import SegmentLog  # noqa: E402

EVO = [sys.executable, "-m", "evo.cli.app"]


class Broker:
    def __init__(self, home: Path) -> None:
        self.home = home
        for name in ("broker.json",):
            (home / name).unlink(missing_ok=True)
        self.log = open(home / f"broker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "EVO_BROKER"}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([*EVO, "--home", str(home), "broker"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 600
        while True:
            try:
                info = json.loads((home / "broker.json").read_text())
                if info.get("pid") == self.proc.pid:
                    self.address = info["address"]
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / self.log.name).read_text())
            time.sleep(0.005)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def first_status(home: Path) -> tuple[Broker, float]:
    b = Broker(home)
    with Client(b.address, timeout_s=600) as c:
        c.status()
    return b, time.perf_counter() - b.t0


def caught_up(b: Broker, last_seq: int, timeout: float = 900) -> float:
    """Seconds until the projection has every event (the follower's catch-up)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    with Client(b.address, timeout_s=600) as c:
        while time.monotonic() < deadline:
            try:
                rows = c.sql("SELECT max(seq) AS s FROM events").to_pylist()
                if rows and rows[0]["s"] is not None and rows[0]["s"] >= last_seq:
                    return time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.2)
    return float("nan")


def write_log(home: Path, raws: list[bytes]) -> None:
    """``raws`` as EVO_HOME/log (no fsync: a benchmark's input, not a broker's output)."""
    log = SegmentLog(home / "log", sync=False)
    for i in range(0, len(raws), 10_000):
        batch = raws[i:i + 10_000]
        log.append([decode(r) for r in batch], batch)
    log.close()


def restart(n: int, whole: list[bytes]) -> None:
    raws = whole[:n]  # a prefix of a legal history is one
    t0 = time.perf_counter()
    state = BrokerState()
    for raw in raws:
        state.apply(decode(raw))
    fold_s = time.perf_counter() - t0
    jobs = len(state.jobs)
    del state
    home = Path(tempfile.mkdtemp(prefix="scale-", dir=ROOT / "bench" / "out"))
    try:
        write_log(home, raws)
        print(f"{n:,} events, {jobs:,} jobs; full fold in this process: {fold_s:.2f} s",
              flush=True)
        for run in ("cold", "warm", "crash"):
            if run == "crash":  # the worst a kill -9 leaves: the snapshot SNAPSHOT_EVERY back
                tail = min(SNAPSHOT_EVERY - 1, n // 2)
                for path in sorted((home / "snapshots").glob("*.snap")):
                    path.unlink()
                keep = n - tail
                st = BrokerState()
                for raw in raws[:keep]:
                    st.apply(decode(raw))
                snapshot._write(home, keep, snapshot.encode(st),
                                hashlib.sha256(raws[keep - 1]).hexdigest())
                del st
                run = f"after a crash ({tail:,} events past the snapshot)"
            b, took = first_status(home)
            rss = b.rss_mb()
            behind = caught_up(b, n)
            print(f"  {run}: first status {took:6.2f} s ({took / fold_s:.2f}x the full fold), "
                  f"RSS {rss:.0f} MB; projection caught up {behind:.1f} s later, RSS then "
                  f"{b.rss_mb():.0f} MB", flush=True)
            b.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def drive(address: str, n_nodes: int, n_jobs: int, out: str) -> None:
    """The light nodes, in a process of their own (so the client measured below does not
    wait for their threads): each leased job is reported started and completed at once."""
    stop = threading.Event()
    leased = [0] * n_nodes

    def node(k: int) -> None:
        name = f"n{k}"
        with Client(address, timeout_s=60) as c:
            c.request(p.Join(node=name, cpus=4, mem_gb=16, slots=4, heartbeat_s=5))
            while not stop.is_set() and sum(leased) < n_jobs:
                r = c.request(p.Ready(node=name, max_leases=4, wait_s=0.2))
                assert isinstance(r, p.Leases)
                for g in r.leases:
                    for body in (p.StartedReport(pid=1), p.CompletedReport(metrics={})):
                        c.request(p.Report(node=name, job_id=g.job_id,
                                           lease_epoch=g.lease_epoch, report=body))
                    leased[k] += 1

    threads = [threading.Thread(target=node, args=(k,), daemon=True) for k in range(n_nodes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    Path(out).write_text(json.dumps({"leased": sum(leased), "wall": time.perf_counter() - t0}))


def load(n_nodes: int, n_jobs: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="scale-load-", dir=ROOT / "bench" / "out"))
    b = Broker(home)
    try:
        from evo.client import make_spec

        with Client(b.address, timeout_s=60) as c:
            c.submit_many([make_spec(["true"], name=f"t{i}") for i in range(n_jobs)])
        out = home / "driver.json"
        driver = subprocess.Popen([sys.executable, __file__, "--drive", b.address,
                                   "--nodes", str(n_nodes), "--jobs", str(n_jobs),
                                   "--out", str(out)])
        lat: dict[str, list[float]] = {"status": [], "why": [], "submit": []}
        with Client(b.address, timeout_s=60) as c:
            # the broker's side of a submit: the job's files are sent once, before (what the
            # client spends collecting a folder is bench/cli.py's)
            extra = c.with_files([make_spec(["true"], name="extra")])[0]
            i = 0
            while driver.poll() is None:
                kind = ("status", "why", "submit")[i % 3]
                s = time.perf_counter()
                if kind == "status":
                    c.status()
                elif kind == "why":
                    c.request(p.Why(job_id=f"j{n_jobs - i % 1000}"))
                else:
                    c.request(p.Submit(spec=extra))
                lat[kind].append((time.perf_counter() - s) * 1000)
                i += 1
                time.sleep(0.005)
        done = json.loads(out.read_text())
        every = sorted(x for v in lat.values() for x in v)

        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(len(xs) * q))]

        per = ", ".join(f"{k} p50 {pct(v, 0.5):.1f} / p99 {pct(v, 0.99):.1f}"
                        for k, v in lat.items())
        print(f"{n_nodes} nodes, {n_jobs:,} queued jobs: command latency p50 "
              f"{pct(every, 0.5):.1f} ms, p99 {pct(every, 0.99):.1f} ms (target < 20 ms) over "
              f"{len(every)} commands ({per} ms); {done['leased'] / done['wall']:.0f} "
              f"leases/s ({done['leased']:,} jobs leased, started and completed in "
              f"{done['wall']:.1f} s); broker RSS {b.rss_mb():.0f} MB", flush=True)
    finally:
        b.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restart", default="100000,1000000")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--util-every", type=int, default=4,
                    help="a utilization sample every k-th heartbeat round of the history "
                         "(4: about 100,000 jobs in 1,000,000 events; 1: 56,000)")
    ap.add_argument("--drive", default="", help=argparse.SUPPRESS)  # the load's node process
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.drive:
        drive(a.drive, a.nodes, a.jobs, a.out)
        return
    sizes = [int(n) for n in a.restart.split(",") if n]
    if sizes:
        whole = history(max(max(sizes), 1_000_000), a.util_every)  # one history, cached, whatever the sizes
        for n in sizes:
            restart(n, whole)
    if not a.skip_load:
        load(a.nodes, a.jobs)


if __name__ == "__main__":
    main()
