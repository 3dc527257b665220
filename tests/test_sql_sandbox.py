"""`evo sql` reads only the projections, by DuckDB's own rules, within a time and size limit."""

from __future__ import annotations

import msgspec
import pytest

from evo.broker import protocol as p
from tests.conftest import run_evo
from tests.test_broker_faults import ask, raw_dealer

HOSTILE = [
    ("EXPLAIN ANALYZE DROP TABLE jobs", "read-only"),
    ("DROP TABLE jobs", "read-only"),
    ("INSERT INTO meta VALUES ('x', 1)", "read-only"),
    ("CREATE TABLE x AS SELECT 1", "read-only"),
    ("SELECT * FROM read_csv('/etc/passwd', sep = ':')", "reads only the projections"),
    ("SELECT * FROM read_text('/etc/shadow')", "reads only the projections"),
    ("SELECT * FROM glob('/root/**')", "reads only the projections"),
    ("COPY jobs TO '/tmp/evo-stolen.csv'", "reads only the projections"),
    ("ATTACH '/tmp/evo-other.duckdb' AS other", "reads only the projections"),
    ("INSTALL httpfs", "reads only the projections"),
    ("LOAD httpfs", "Loading external extensions is disabled"),
    ("SET enable_external_access = true", "locked"),
    ("SET threads = 1", "locked"),
    ("SELECT 1; SELECT 2", "one SQL statement"),
]


@pytest.mark.parametrize("query, says", HOSTILE)
def test_a_query_that_writes_or_reaches_outside_is_refused_by_duckdb(tbroker, query, says):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
    r = run_evo("sql", query, "--broker", b.address, home=b.home)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    with b.client() as c:
        assert c.sql("SELECT count(*) AS n FROM jobs").to_pylist() == [{"n": 1}]


def test_what_a_query_detaches_is_put_back_and_the_follower_applies_on(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
        c.sql("DETACH _stage")
        c.sql("ATTACH ':memory:' AS extra")
        c.submit(["b"])  # applied before the next answer: it needs the staging database
        assert c.sql("SELECT count(*) AS n FROM jobs").to_pylist() == [{"n": 2}]
        names = {r["database_name"] for r in c.sql(
            "SELECT database_name FROM duckdb_databases() WHERE NOT internal").to_pylist()}
        assert "extra" not in names and "_stage" in names


def test_a_runaway_query_is_stopped_and_delays_no_other_query(tbroker, monkeypatch):
    monkeypatch.setenv("EVO_SQL_TIMEOUT_S", "3")
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
        endpoint = c.hello().query_endpoint
    (ctx, slow), (ctx2, quick) = raw_dealer(endpoint), raw_dealer(endpoint)
    try:
        slow.send(p.command_encoder.encode(p.Query(req=1, sql="SELECT count(*) FROM range(10000000000000)")))
        quick.send(p.command_encoder.encode(p.Query(req=2, sql="SELECT count(*) AS n FROM jobs")))
        assert quick.poll(30_000), "the quick query was not answered"
        answer = p.reply_decoder.decode(quick.recv())
        assert isinstance(answer, p.QueryResult)
        assert not slow.poll(0), "the runaway query ended first: it did not run beside"
        assert slow.poll(30_000), "the runaway query was never stopped"
        stopped = p.reply_decoder.decode(slow.recv())
        assert isinstance(stopped, p.Error) and "3 s time limit" in stopped.message
    finally:
        slow.close(0)
        quick.close(0)
        ctx.term()
        ctx2.term()


def test_a_result_past_the_size_limit_is_refused_not_built(tbroker, monkeypatch):
    monkeypatch.setenv("EVO_SQL_MAX_MB", "4")
    b = tbroker()
    r = run_evo("sql", "SELECT * FROM range(50000000)", "--broker", b.address, home=b.home)
    assert r.returncode == 2 and "passed 4 MiB at row" in r.stderr and "LIMIT" in r.stderr
    r = run_evo("sql", "SELECT * FROM range(1000)", "--format", "csv", "--broker", b.address,
                home=b.home)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1001


def test_without_a_broker_the_file_is_opened_read_only(tbroker, tmp_path):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
    b.stop()
    home = b.home
    for query, says in HOSTILE[:8]:
        r = run_evo("sql", query, home=home)
        assert r.returncode == 2 and says in r.stderr, (query, r.stderr)
    r = run_evo("sql", "SELECT count(*) AS n FROM jobs", "--format", "csv", home=home)
    assert r.stdout.splitlines() == ["n", "1"], r.stderr
    r = run_evo("sql", "SELECT * FROM read_text('/etc/passwd')", "--as-of", "1", home=home)
    assert r.returncode == 2 and "reads only the projections" in r.stderr


def test_query_frames_are_bounded_like_commands(tbroker):
    b = tbroker()
    with b.client() as c:
        endpoint = c.hello().query_endpoint
    ctx, s = raw_dealer(endpoint)
    try:
        r = ask(s, [msgspec.msgpack.encode({"cmd": "query", "req": 3, "sql": "x" * (2 << 20)})])
        assert isinstance(r, p.Error) and r.req == 3 and "$.sql" in r.message
        s.send(b"\x91" * (p.MAX_MESSAGE_BYTES + 10))
        assert not s.poll(500), "an oversized frame must get no answer"
    finally:
        s.close(0)
        ctx.term()
    with b.client() as c:  # only that peer was dropped
        assert c.sql("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_values_go_in_as_bind_parameters_never_into_the_text(tbroker):
    b = tbroker()
    hostile = "j1' OR '1'='1"
    with b.client() as c:
        j = c.submit(["a"])
        rows = c.sql("SELECT job_id FROM jobs WHERE job_id = ?", [hostile]).to_pylist()
        assert rows == []  # a value, not SQL: nothing matches
        assert c.sql("SELECT job_id FROM jobs WHERE job_id = ?", [j]).to_pylist() == [{"job_id": j}]
        assert c.sql("SELECT ? AS a, ? AS b", ["x", 3], as_of=1).to_pylist() == [{"a": "x", "b": 3}]
    r = run_evo("jobs", "--sweep", "s1' OR '1'='1", "--broker", b.address, home=b.home)
    assert r.returncode == 2 and "no sweep" in r.stderr
    r = run_evo("show", hostile, "--broker", b.address, home=b.home)
    assert r.returncode == 2 and "no job" in r.stderr
