"""The fault suite's scenarios: each is a bounded test (tests/test_fault_suite.py) and a row of
``python bench/faults.py``'s table, with the same code; only the number of rounds differs.

Every row says how many rounds ran, how many submits were acknowledged, how many of those were
lost or recorded twice, what the check detected, how many times the broker crashed when it was
not meant to, and the broker's memory. A scenario never asserts; its caller does.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

from evo.broker import protocol as p
from evo.client import BrokerUnavailable, Client, CommandRejected
from evo.events.damage import check
from evo.events.log import CorruptLog, SegmentLog
from evo.events.codec import EventDecodeError
from evo.events.schema import JobCompleted, JobSpec, JobSubmitted, ReportRejected
from evo.projections.store import replay
from tests.conftest import ROOT, ProcBroker
from tests.fuzz import random_frame

TRACER = str(ROOT / "tests" / "fsync_tracer.py")


@dataclass
class Row:
    fault: str
    rounds: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    detected: str = "-"
    crashes: int = 0
    rss: str = "-"
    broken: int = 0  # invariants that failed (log check, projection digest, fold)

    def cells(self) -> list[str]:
        return [self.fault, f"{self.rounds:,}", f"{self.acknowledged:,}", f"{self.lost:,}",
                f"{self.duplicated:,}", self.detected, f"{self.crashes:,}", self.rss,
                "ok" if not self.broken else f"{self.broken} failed"]


HEADER = ["fault", "rounds", "acknowledged", "lost", "duplicated", "detected", "crashes",
          "broker RSS", "invariants"]


def _mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.NoSuchProcess:
        return 0.0


class KeyedLoad:
    """Client threads pipelining keyed submits to one broker until it stops answering. Every
    acknowledged (key, job id) is kept; ``query_every`` > 0 also queries the projection."""

    def __init__(self, address: str, tag: str, *, clients: int = 4, window: int = 8,
                 query_every: int = 0) -> None:
        self.address, self.tag, self.window, self.query_every = address, tag, window, query_every
        self.acked: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, cid: int) -> None:
        i = 0
        try:
            with Client(self.address, timeout_s=2.0) as c:
                while not self._stop.is_set():
                    reqs = []
                    for _ in range(self.window):  # pipelined: some are in flight at a crash
                        key = f"{self.tag}-c{cid}-{i}"
                        i += 1
                        reqs.append((key, c.send(p.Submit(spec=JobSpec(command=["t", key],
                                                                         key=key)))))
                    for key, req in reqs:
                        reply = c.receive(req)
                        with self._lock:
                            self.acked[key] = reply.job_id  # type: ignore[attr-defined]
                    if self.query_every and i % self.query_every < self.window:
                        c.query("SELECT count(*) FROM jobs", timeout_s=3.0)
        except (BrokerUnavailable, CommandRejected, OSError):
            return

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(15)


def _audit(home: Path, acked: dict[str, str]) -> tuple[int, int]:
    """(acknowledged but not in the log, recorded twice or under another id)."""
    with SegmentLog(home / "log", readonly=True) as lg:
        submitted = [e for e in lg.read_from(1) if isinstance(e, JobSubmitted)]
    counts = Counter(e.spec.key for e in submitted)
    ids = {e.spec.key: e.job_id for e in submitted}
    lost = sum(1 for k in acked if k not in ids)
    twice = sum(1 for k, n in counts.items() if n > 1) + sum(
        1 for k, j in acked.items() if k in ids and ids[k] != j)
    return lost, twice


def _invariants(home: Path, b: ProcBroker) -> int:
    """After a restart: the log checks whole, and the projection equals a replay of the log."""
    broken = 0
    found = check(home / "log")
    broken += bool(found.problems)
    with Client(b.address, timeout_s=30) as c:
        live = c.query(kind="digest")
    with SegmentLog(home / "log", readonly=True) as lg:
        fresh = replay((raw for s, raw in lg.read_raw_from(1) if s <= live.seq))
    broken += fresh.digest()[0] != live.digest
    fresh.close()
    return broken


# --- the broker killed ------------------------------------------------------------------------


def kill9_under_load(tmp: Path, rounds: int, rng: random.Random) -> Row:
    home = tmp / "kill9"
    row = Row("broker kill -9 at random points, 4 keyed clients", rounds=rounds)
    acked: dict[str, str] = {}
    peak = 0.0
    for r in range(rounds):
        b = ProcBroker(home)
        load = KeyedLoad(b.address, f"r{r}")
        time.sleep(rng.uniform(0.3, 0.8))  # a random point of the load, not a synchronisation
        peak = max(peak, _mb(b.proc.pid))
        b.kill()
        load.stop()
        acked.update(load.acked)
        b.logfile.close()
    b = ProcBroker(home)
    row.broken = _invariants(home, b)
    b.stop()
    row.acknowledged = len(acked)
    row.lost, row.duplicated = _audit(home, acked)
    row.rss = f"{peak:.0f} MB"
    return row


FAILPOINTS = {  # failpoint -> (hits to crash at, broker arguments, queries to drive applies)
    "log.after_write": ((5, 200), (), 0),
    "broker.before_ack": ((5, 200), (), 0),
    "log.rotate": ((2, 5), ("--segment-bytes", "20000"), 0),  # hit 1: the first segment
    "projection.apply": ((2, 8), (), 16),
}


def failpoint_crash(tmp: Path, point: str, rounds: int, rng: random.Random) -> Row:
    """The broker dies at a named failpoint under load; after a restart every acknowledged
    submit is there once, the log checks whole and the projection equals a replay."""
    (lo, hi), extra, queries = FAILPOINTS[point]
    row = Row(f"crash at failpoint {point}", rounds=rounds)
    fired = 0
    peak = 0.0
    for r in range(rounds):
        home = tmp / f"fp-{point}-{r}"
        b = ProcBroker(home, *extra, env={"EVO_FAILPOINT": f"{point}=crash@{rng.randint(lo, hi)}"})
        load = KeyedLoad(b.address, f"r{r}", query_every=queries)
        try:
            b.proc.wait(30)
            fired += b.proc.returncode == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            peak = max(peak, _mb(b.proc.pid))
            b.kill()
        load.stop()
        b.logfile.close()
        b = ProcBroker(home, *extra)
        row.broken += _invariants(home, b)
        b.stop()
        row.acknowledged += len(load.acked)
        lost, twice = _audit(home, load.acked)
        row.lost += lost
        row.duplicated += twice
    row.detected = f"fired {fired}/{rounds}"
    row.rss = f"{peak:.0f} MB" if peak else "-"
    return row


def _power_loss(home: Path, trace: Path) -> None:
    """Take from the log what was not synced when the power went: each segment is cut to its
    size at its last completed sync; a segment never synced is gone."""
    synced: dict[str, int] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            path, size = line.rsplit("\t", 1)
            synced[path] = int(size)  # the last sync decides (a cut-back shrinks the file)
    for seg in (home / "log").glob("*.seg"):
        size = synced.get(str(seg.resolve()))
        if size is None:
            seg.unlink()
        else:
            os.truncate(seg, min(size, seg.stat().st_size))


def power_loss(tmp: Path, rounds: int, rng: random.Random, *, sync: bool = True) -> Row:
    """kill -9 under load, then everything not fsynced dropped. With syncs off (``--no-sync``)
    the check must see acknowledged submits lost: it can fail."""
    row = Row("power loss: unsynced writes dropped" + ("" if sync else " (fsync switched off)"),
              rounds=rounds)
    losing = 0
    for r in range(rounds):
        home = tmp / f"power-{'sync' if sync else 'nosync'}-{r}"
        trace = tmp / f"trace-{'sync' if sync else 'nosync'}-{r}.txt"
        b = ProcBroker(home, *(() if sync else ("--no-sync",)),
                       prefix=[sys.executable, TRACER, str(trace)])
        load = KeyedLoad(b.address, f"r{r}")
        time.sleep(rng.uniform(0.3, 1.0))
        b.kill()
        load.stop()
        b.logfile.close()
        _power_loss(home, trace)
        b = ProcBroker(home)
        b.stop()
        lost, twice = _audit(home, load.acked)
        row.acknowledged += len(load.acked)
        row.lost += lost
        row.duplicated += twice
        losing += lost > 0
    row.detected = f"loss in {losing}/{rounds}"
    return row


# --- nodes ------------------------------------------------------------------------------------

def _until(c: Client, cond, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    """Wait until the log's events meet ``cond`` (a condition with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while not cond(list(c.read_all(1))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault suite: no {what} within {timeout_s:g}s")
        time.sleep(0.05)


MARK_JOB = ("import os, time; time.sleep({s}); "
            "fd = os.open({mark!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
            "os.write(fd, (os.environ['EVO_JOB_ID'] + '\\n').encode())")


def node_faults(tmp: Path, fault: str, jobs: int, rng: random.Random) -> Row:
    """Jobs that sleep, then append their id to a file (the side effect), while one fault hits:
    ``kill9`` (a node killed, then started again), ``sigstop`` (a node paused past its lease,
    then let go), ``broker`` (the broker killed while jobs run, then started again). Every job
    must complete exactly once; under kill9 and broker its side effect must happen once too
    (a paused node cannot stop its jobs, so under sigstop it may happen twice: not counted)."""
    from tests.test_nodes import NodeProc

    home = tmp / f"nodes-{fault}"
    mark = tmp / f"marks-{fault}.txt"
    names = {"kill9": "node kill -9 mid-job, then restarted",
             "sigstop": "node SIGSTOP past its lease, then SIGCONT",
             "broker": "broker kill -9 while jobs run, then restarted"}
    row = Row(names[fault], rounds=1)
    b = ProcBroker(home)
    nodes = [NodeProc(home, "a", "--slots", "2"), NodeProc(home, "b", "--slots", "2")]
    try:
        with Client(b.address) as c:
            # Long enough that the fault always comes seconds before a job's side effect: a
            # job killed right after its side effect but before its report would run again
            # (at least once), which is not what this row measures.
            ids = [c.submit([sys.executable, "-c", MARK_JOB.format(s=rng.uniform(2.5, 3.0),
                                                                     mark=str(mark))],
                            max_attempts=5) for _ in range(jobs)]
        row.acknowledged = len(ids)
        with Client(b.address) as c:  # the fault comes once every slot runs a job
            _until(c, lambda evs: sum(type(e).__name__ == "JobStarted" for e in evs)
                   >= min(jobs, 4), "every slot running a job")
        if fault == "kill9":
            nodes[0].kill()
            nodes[0] = NodeProc(home, "a", "--slots", "2")
        elif fault == "sigstop":
            nodes[1].signal(signal.SIGSTOP)
            with Client(b.address) as c:  # past its lease: the broker has lost it
                _until(c, lambda evs: any(type(e).__name__ == "NodeLost" and e.node == "b"
                                          for e in evs), "node b lost")
            nodes[1].signal(signal.SIGCONT)
        else:
            b.kill()
            b.logfile.close()
            b = ProcBroker(home)
        deadline = time.monotonic() + 120
        with Client(b.address) as c:
            while True:
                events = list(c.read_all(1))
                done = Counter(e.job_id for e in events if isinstance(e, JobCompleted))
                if all(done[j] for j in ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        row.lost = sum(1 for j in ids if not done[j])
        row.duplicated = sum(1 for j in ids if done[j] > 1)
        marks = Counter(mark.read_text().split()) if mark.exists() else Counter()
        twice = sum(1 for j in ids if marks[j] > 1)
        rejected = sum(isinstance(e, ReportRejected) for e in events)
        if fault == "sigstop":
            row.detected = f"{rejected} stale reports rejected; {twice} side effects twice"
        else:
            row.duplicated += twice
            row.detected = f"{twice} side effects twice"
        row.crashes = int(b.proc.poll() is not None)
    finally:
        for n in nodes:
            n.signal(signal.SIGCONT)
            n.kill()
        b.kill()
        b.logfile.close()
    return row


# --- hostile input ----------------------------------------------------------------------------


def fuzz(tmp: Path, frames: int, rng: random.Random) -> list[Row]:
    """``frames`` fuzzed frames at the command socket, then at the query socket."""
    b = ProcBroker(tmp / "fuzz")
    rows = []
    try:
        with Client(b.address) as c:
            c.submit(["before"])
            targets = [("command socket", b.address),
                       ("query socket", c.hello().query_endpoint)]
        import zmq

        for name, address in targets:
            before = _mb(b.proc.pid)
            ctx = zmq.Context()
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            answered = 0
            for i in range(frames):
                s.send_multipart(random_frame(rng))
                while s.poll(0):
                    s.recv()
                    answered += 1
                if i % 500 == 499:  # let it answer, so nothing piles up unboundedly
                    while s.poll(100):
                        s.recv()
                        answered += 1
            while s.poll(1000):
                s.recv()
                answered += 1
            s.close(0)
            ctx.term()
            alive = b.proc.poll() is None
            row = Row(f"{frames:,} fuzzed frames at the {name}", rounds=frames,
                      detected=f"{answered:,} answered", crashes=int(not alive),
                      rss=f"{before:.0f} -> {_mb(b.proc.pid):.0f} MB")
            if alive:
                with Client(b.address, timeout_s=10) as c:  # still serving, still following
                    j = c.submit(["after", name])
                    n = c.sql(f"SELECT count(*) AS n FROM jobs WHERE job_id = '{j}'").to_pylist()
                row.broken = int(n != [{"n": 1}])
            # a handler that raised (the state folded again) is a bug the fuzz found
            row.broken += b.output().count("the state is folded again") - sum(
                r.broken for r in rows if r.rounds)
            rows.append(row)
    finally:
        b.kill()
        b.logfile.close()
    return rows


def hostile_queries(tmp: Path, rng: random.Random) -> list[Row]:
    """A 50,000,000-row result and a runaway query, through a broker: each refused with its
    reason, the broker's memory bounded, the projection intact."""
    b = ProcBroker(tmp / "queries", env={"EVO_SQL_TIMEOUT_S": "3"})
    rows = []
    try:
        with Client(b.address, timeout_s=30) as c:
            c.submit(["a"])
            for name, sql in (("a 50,000,000-row result", "SELECT * FROM range(50000000)"),
                              ("a runaway query (3 s limit)",
                               "SELECT count(*) FROM range(10000000000000)")):
                before = _mb(b.proc.pid)
                t0 = time.perf_counter()
                try:
                    c.query(sql, timeout_s=60)
                    said = "answered!"
                except CommandRejected as exc:
                    said = str(exc).split(" and was stopped")[0].split(": add")[0][:60]
                row = Row(name, rounds=1, detected=f"{said} ({time.perf_counter() - t0:.1f} s)",
                          rss=f"{before:.0f} -> {_mb(b.proc.pid):.0f} MB",
                          crashes=int(b.proc.poll() is not None))
                n = c.sql("SELECT count(*) AS n FROM jobs").to_pylist()
                row.broken = int(n != [{"n": 1}] or said == "answered!")
                rows.append(row)
    finally:
        b.kill()
        b.logfile.close()
    return rows


def corruptions(tmp: Path, rounds: int, rng: random.Random) -> Row:
    """Random damage to segment files (a bit flipped, bytes zeroed, cut, inserted): reading
    gives a valid prefix or an error naming the place, and the check names it; never a crash."""
    import shutil

    ref = tmp / "corrupt-ref"
    with SegmentLog(ref, segment_bytes=4000) as lg:
        for i in range(1, 201):
            lg.append([JobSubmitted(seq=i, job_id=f"j{i}", spec=JobSpec(command=["x", str(i)]))])
    row = Row("random corruptions of segment files", rounds=rounds)
    named = prefix = 0
    for r in range(rounds):
        work = tmp / f"corrupt-{r}"
        shutil.copytree(ref, work)
        seg = rng.choice(sorted(work.glob("*.seg")))
        data = bytearray(seg.read_bytes())
        at = rng.randrange(len(data))
        how = rng.randrange(4)
        if how == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif how == 1:
            data[at:at + 300] = bytes(len(data[at:at + 300]))
        elif how == 2:
            del data[at:]
        else:
            data[at:at] = rng.randbytes(rng.randrange(1, 40))
        seg.write_bytes(bytes(data))
        try:
            with SegmentLog(work) as lg:
                seqs = [e.seq for e in lg.read_from(1)]
            prefix += 1
            row.broken += seqs != list(range(1, len(seqs) + 1))
        except (CorruptLog, EventDecodeError):
            named += 1
        except Exception:  # noqa: BLE001 - anything else is what this row counts
            row.crashes += 1
        try:
            check(work)
        except Exception:  # noqa: BLE001
            row.crashes += 1
        shutil.rmtree(work)
    row.detected = f"{named} named, {prefix} valid prefixes"
    return row
