"""Projections: incremental apply equals replay, crash safety, old logs, SQL over the broker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evo.broker.state import fold
from evo.client import Client
from evo.events.codec import encode
from evo.events.log import SegmentLog
from evo.projections.files import open_projection
from evo.broker.history import generate
from evo.projections.schema import VERSION
from evo.projections.store import Projection, SqlError, as_of, replay
from tests.conftest import ROOT, run_evo

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def history():
    events = generate(6000, seed=7)
    return events, [encode(e) for e in events]


def test_history_has_what_the_projection_must_handle(history):
    names = {type(e).__name__ for e in history[0]}
    assert {"RetryScheduled", "JobCancelled", "NodeLost", "LeaseExpired", "SweepSubmitted",
            "JobFailed", "UtilizationSampled", "Progress", "SweepCompleted"} <= names
    # legal, as the desk makes it: a sweep completes once, after the last of its jobs ended
    ended, members = {}, {}
    for e in history[0]:
        kind = type(e).__name__
        if kind == "SweepSubmitted":
            assert e.job_ids
            members[e.sweep_id] = set(e.job_ids)
        elif kind in ("JobCompleted", "JobCancelled") or (kind == "JobFailed" and e.final):
            ended[e.job_id] = e.seq
        elif kind == "SweepCompleted":
            assert members[e.sweep_id] <= set(ended), e.sweep_id
            assert max(ended[j] for j in members.pop(e.sweep_id)) < e.seq


def test_incremental_apply_equals_full_replay_and_replay_is_stable(history):
    events, raws = history
    full = replay(raws)
    digest = full.digest()[0]
    assert replay(raws).digest()[0] == digest  # twice, the same
    rng = random.Random(3)
    inc = Projection()
    i = 0
    while i < len(raws):
        k = rng.choice([1, 2, 7, 50, 400])
        inc.apply(raws[i:i + k])
        i += k
    assert inc.digest() == full.digest()
    # the jobs table agrees with the broker's own fold
    state = fold(events)
    counts = dict(full.con.execute("SELECT state, count(*) FROM jobs GROUP BY 1").fetchall())
    assert counts == {k: v for k, v in state.counts.items() if v}
    for job_id, job in list(state.jobs.items())[:200]:
        row = full.con.execute("SELECT state, attempts, node FROM jobs WHERE job_id = ?",
                               [job_id]).fetchall()[0]
        assert row == (job.state, job.attempt, job.node), job_id


def test_final_metrics_are_every_completed_jobs_metrics(history):
    # Read from the metrics rows of each JobCompleted; must equal expanding jobs.metrics,
    # whatever the batches were.
    _, raws = history
    inc = Projection()
    for i in range(0, len(raws), 333):
        inc.apply(raws[i:i + 333])
    expanded = inc.con.execute("""
        SELECT j.job_id, m.key, CAST(m.value AS DOUBLE) FROM jobs j, json_each(j.metrics) m
        WHERE j.state = 'completed' ORDER BY 1, 2""").fetchall()
    table = inc.con.execute(
        "SELECT job_id, metric, value FROM final_metrics ORDER BY 1, 2").fetchall()
    assert len(table) > 100 and table == expanded
    best = inc.con.execute("SELECT sweep_id, job_id, value FROM leaderboard "
                           "WHERE metric = 'auc' AND rank = 1 ORDER BY 1 LIMIT 1").fetchall()[0]
    top = inc.con.execute("SELECT max(value) FROM final_metrics WHERE metric = 'auc' "
                          "AND sweep_id = ?", [best[0]]).fetchall()[0][0]
    assert best[2] == top


def test_a_file_of_an_older_schema_version_is_rebuilt_from_the_log(history, tmp_path):
    events, raws = history
    with SegmentLog(tmp_path / "log") as lg:
        lg.append(events[:2000])
    old = Projection(tmp_path / "evo.duckdb")  # as version 2 left it: final_metrics a table
    old.con.execute("DROP VIEW leaderboard; DROP VIEW final_metrics; "
                    "CREATE TABLE final_metrics (job_id VARCHAR, metric VARCHAR, value DOUBLE)")
    old.con.execute("UPDATE meta SET value = 2 WHERE key = 'version'")
    old.close()
    proj = open_projection(tmp_path)
    try:
        assert proj.version == VERSION and proj.last_seq == 2000
        assert proj.digest() == replay(raws[:2000]).digest()
    finally:
        proj.close()


def test_a_file_far_behind_is_caught_up_by_a_child_that_may_die_without_harm(
        history, tmp_path, monkeypatch):
    import evo.projections.files as files

    events, raws = history
    with SegmentLog(tmp_path / "log") as lg:
        lg.append(events[:2000])
    monkeypatch.setattr(files, "APART", 1500)
    monkeypatch.setenv("EVO_FAILPOINT", "projection.apply=crash")  # the child's: kill -9
    with pytest.raises(RuntimeError, match="up to seq 2000 failed: killed by signal 9"):
        open_projection(tmp_path)  # this process lives on: it was not the one that folded
    monkeypatch.delenv("EVO_FAILPOINT")
    proj = Projection(tmp_path / "evo.duckdb")
    assert proj.last_seq == 0  # the batch cut short is not in the file
    proj.close()
    stop = threading.Event()
    stop.set()  # a broker stopping while it catches up: the child is ended, not waited for
    with pytest.raises(RuntimeError, match="up to seq 2000: stopped"):
        open_projection(tmp_path, stop=stop)
    proj = open_projection(tmp_path)
    try:
        assert proj.last_seq == 2000 and proj.digest() == replay(raws[:2000]).digest()
    finally:
        proj.close()


def test_a_batch_past_2_gib_of_json_goes_in_with_64_bit_offsets(history, monkeypatch):
    import evo.projections.store as store
    _, raws = history
    want = replay(raws[:1500]).digest()
    monkeypatch.setattr(store, "LARGE_BATCH_BYTES", 0)
    assert store.to_arrow(raws[:10], 1).schema.field("payload").type.storage_type == "large_string"
    assert replay(raws[:1500], batch=500).digest() == want


def test_as_of_answers_from_the_state_at_that_seq(history):
    events, raws = history
    live = replay(raws)
    cut = len(raws) // 3
    past = as_of(live.con, cut)
    assert past.digest() == replay(raws[:cut]).digest()
    assert past.last_seq == cut


def test_a_gap_is_refused_and_nothing_is_applied(history):
    _, raws = history
    p = Projection()
    p.apply(raws[:10])
    with pytest.raises(Exception, match="do not follow on from seq 10"):
        p.apply(raws[11:20])
    with pytest.raises(Exception, match="event 1 of a batch from seq 11 has seq 13"):
        p.apply([raws[10], raws[12], raws[11]])  # the right count, out of order
    assert p.last_seq == 10
    assert p.con.execute("SELECT count(*) FROM events").fetchall()[0][0] == 10
    garbled = raws[12][:-3] + b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    with pytest.raises(Exception, match=r"event 2 of a batch from seq 11 \(seq 13\?\): undecod"):
        p.apply([raws[10], raws[11], garbled, raws[13]])
    assert p.last_seq == 10
    assert p.con.execute("SELECT count(*) FROM events").fetchall()[0][0] == 10


def test_catch_up_stops_at_a_gap_keeping_the_batches_before_it(history):
    _, raws = history
    p = Projection()
    holed = raws[:100] + raws[101:300]  # seq 101 missing
    with pytest.raises(Exception, match="from seq 102 do not follow on from seq 100"):
        p.catch_up(holed, batch=50)
    assert p.last_seq == 100  # two whole batches; the one with the hole is not applied
    assert p.con.execute("SELECT count(*), max(seq) FROM events").fetchall()[0] == (100, 100)
    assert p.catch_up(raws[100:300], batch=50) == 300  # and it carries on from there


def test_sql_is_read_only():
    p = Projection()
    with pytest.raises(SqlError, match="read-only.*Cannot write"):
        p.query("DELETE FROM jobs")
    with pytest.raises(SqlError, match="SQL error"):
        p.query("SELEC 1")
    assert p.query("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_a_v1_log_replays():
    with SegmentLog(FIX / "v1_log", readonly=True) as lg:
        raws = [raw for _, raw in lg.read_raw_from(1)]
    p = replay(raws)
    states = dict(p.con.execute("SELECT job_id, state FROM jobs").fetchall())
    assert states["j3"] == "completed" and states["j18"] == "cancelled"


APPLIER = """
import pickle, random, sys
from evo.projections.store import Projection
raws = pickle.load(open(sys.argv[1], "rb"))
p = Projection(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
i = p.last_seq
print("start", i, flush=True)
while i < len(raws):
    k = rng.choice([1, 5, 30, 200])
    p.apply(raws[i:i + k])
    i = p.last_seq
print("done", flush=True)
"""


def test_kill_9_of_the_applier_mid_apply_loses_and_doubles_nothing(history, tmp_path):
    import pickle

    _, raws = history
    data = tmp_path / "raws.pkl"
    data.write_bytes(pickle.dumps(raws))
    db = tmp_path / "p.duckdb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(11)
    seen = []
    for round_ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", APPLIER, str(data), str(db), str(round_)],
                                stdout=subprocess.PIPE, text=True, env=env)
        first = proc.stdout.readline()  # opened and reading: now kill it at a random moment
        seen.append(int(first.split()[1]))
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    done = subprocess.run([sys.executable, "-c", APPLIER, str(data), str(db), "99"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "done" in done.stdout, done.stderr
    assert seen == sorted(seen) and seen[-1] > 0  # progress survived the kills
    p = Projection(db)
    assert p.digest() == replay(raws).digest()


CATCHER = """
import os, pickle, sys, time
import evo.projections.store as store
raws = pickle.load(open(sys.argv[1], "rb"))
p = store.Projection(sys.argv[2])
if sys.argv[3] == "die-in-the-fold":  # the fold's last statement exits the process
    def die():
        os._exit(9)
    p.con.create_function("die", die, [], "INTEGER", side_effects=True)
    store._FOLD = [*store._FOLD, "SELECT die()"]
print("start", p.last_seq, flush=True)
p.catch_up(raws, batch=int(sys.argv[4]))
print("done", flush=True)
"""


def _catcher(data, db, mode, batch, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CATCHER, str(data), str(db), mode, str(batch)],
                            stdout=subprocess.PIPE, text=True, env=env, **kw)


def test_a_catch_up_killed_inside_a_batch_keeps_nothing_of_that_batch(history, tmp_path):
    import pickle

    _, raws = history
    data, db = tmp_path / "raws.pkl", tmp_path / "p.duckdb"
    data.write_bytes(pickle.dumps(raws))
    p = Projection(db)
    p.catch_up(raws[:1000])
    p.close()
    proc = _catcher(data, db, "die-in-the-fold", 2000)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 9 and "done" not in out
    peek = Projection(db, read_only=True)  # as the crash left it: the batch's one transaction
    assert peek.last_seq == 1000  # never committed, events and folds alike
    assert peek.con.execute("SELECT max(seq) FROM events").fetchall()[0][0] == 1000
    peek.close()
    p = Projection(db)
    p.catch_up(raws)
    assert p.digest() == replay(raws).digest()


def test_kill_9_of_a_catch_up_loses_and_doubles_nothing(history, tmp_path):
    import pickle

    _, raws = history
    data, db = tmp_path / "raws.pkl", tmp_path / "p.duckdb"
    data.write_bytes(pickle.dumps(raws))
    rng = random.Random(5)
    for _ in range(8):
        proc = _catcher(data, db, "run", 300)
        proc.stdout.readline()  # opened: now kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    proc = _catcher(data, db, "run", 300)
    out, _ = proc.communicate(timeout=120)
    assert "done" in out
    p = Projection(db)
    assert p.digest() == replay(raws).digest()


def test_sql_leaderboard_replay_through_a_broker(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    with Client(b.address) as c:
        ids = [c.submit(["true"], key=f"k{i}") for i in range(5)]
        # answers are never staler than what was acknowledged before the query
        rows = c.sql("SELECT job_id, state FROM jobs ORDER BY submitted_seq").to_pylist()
        assert [r["job_id"] for r in rows] == ids and {r["state"] for r in rows} == {"queued"}
        c.cancel(ids[0])
        assert c.sql(f"SELECT state FROM jobs WHERE job_id = '{ids[0]}'").to_pylist() == [
            {"state": "cancelled"}]
        head = c.hello().last_seq
    r = run_evo("sql", "SELECT count(*) AS n FROM jobs WHERE state = 'queued'", "--format", "csv",
                home=home)
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "4"], r.stderr
    r = run_evo("sql", "SELECT count(*) AS n FROM jobs", "--as-of", "2", "--format", "json", home=home)
    assert r.stdout.strip() == '{"n":2}'
    r = run_evo("sql", "DROP TABLE jobs", home=home)
    assert r.returncode == 2 and "evo sql is read-only" in r.stderr
    r = run_evo("sql", "SELECT nope FROM jobs", home=home)
    assert r.returncode == 2 and "Binder Error" in r.stderr
    out = tmp_path / "jobs.parquet"
    r = run_evo("sql", "SELECT * FROM jobs", "--out", str(out), home=home)
    assert r.returncode == 0 and out.stat().st_size > 0
    r = run_evo("replay", "--verify", home=home)
    assert r.returncode == 0 and f"at seq {head} matches" in r.stdout, r.stdout + r.stderr
    b.stop()
    # no broker: the CLI catches the file up from the log and answers the same
    r = run_evo("sql", "SELECT count(*) AS n FROM jobs", "--format", "csv", home=home)
    assert r.stdout.splitlines() == ["n", "5"], r.stderr
    # a projection that disagrees with the log is caught, naming the table
    import duckdb

    con = duckdb.connect(str(home / "evo.duckdb"))
    con.execute("UPDATE jobs SET state = 'completed' WHERE job_id = ?", [ids[1]])
    con.close()
    r = run_evo("replay", "--verify", home=home)
    assert r.returncode == 1 and "differs in jobs" in r.stderr, r.stdout + r.stderr
