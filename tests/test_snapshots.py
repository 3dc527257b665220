"""Snapshots of the broker's state: a restart folds only the tail, and gets the same state as
the full fold; a snapshot that is damaged, foreign or past the log is never used."""

from __future__ import annotations

import logging

import pytest

from evo.broker import snapshot
from evo.broker.history import generate
from evo.broker.server import Broker
from evo.broker.state import fold
from evo.client import Client, CommandRejected, make_spec
from evo.events.log import SegmentLog
from tests.test_nodes import PY


def _history(home, n=3000):
    log = SegmentLog(home / "log", sync=False)
    events = generate(n, seed=3)
    log.append(events)
    log.close()
    return events


def test_a_restart_from_a_snapshot_folds_the_tail_to_the_state_of_the_full_fold(tmp_path):
    home = tmp_path / "home"
    events = _history(home)
    b = Broker(home, projections=False, sync=False)
    assert b.restored_from == 0  # no snapshot yet
    b.maybe_snapshot(force=True)
    at = b.desk.state.last_seq
    assert (snapshot.folder(home) / f"state-{at:012d}.snap").exists()
    b.close()
    # events after the snapshot: the next start folds them onto it
    b = Broker(home, projections=False, sync=False)
    assert b.restored_from == at
    with_tail = b.desk.state
    b.close()
    log = SegmentLog(home / "log", sync=False)
    log.append(generate(len(events) + 400, seed=3)[len(events):])
    log.close()
    b = Broker(home, projections=False, sync=False)
    assert b.restored_from == at and b.desk.state.last_seq > at
    full = fold(SegmentLog(home / "log", readonly=True).read_from(1))
    assert snapshot.state_digest(b.desk.state) == snapshot.state_digest(full)
    assert snapshot.state_digest(with_tail) != snapshot.state_digest(full)
    b.close()


def test_the_broker_snapshots_in_the_background_and_at_a_clean_stop(tbroker, tmp_path):
    home = tmp_path / "home"
    tb = tbroker(home, snapshot_every=50)
    with tb.client() as c:
        c.submit_many([make_spec([PY, "-c", "1"], name=f"t{i}") for i in range(60)])
        seq = c.hello().last_seq
    tb.broker.snapshots.join(10)
    # the loop, idle after the submits, wrote one in the background (or writes it now)
    from tests.conftest import wait_until

    wait_until(lambda: tb.broker.snapshots.written >= 50, 10, "a background snapshot")
    with tb.client() as c:
        c.submit([PY, "-c", "2"])
        last = c.hello().last_seq
    tb.stop()
    snaps = sorted(snapshot.folder(home).glob("state-*.snap"))
    assert snaps[-1].name == f"state-{last:012d}.snap" and last > seq
    b = Broker(home, projections=False)
    assert b.restored_from == last
    assert len(b.desk.state.jobs) == 61
    b.close()


def test_a_damaged_foreign_or_future_snapshot_is_not_used(tmp_path, caplog):
    home = tmp_path / "home"
    _history(home, 1500)
    b = Broker(home, projections=False, sync=False)
    b.maybe_snapshot(force=True)
    full = snapshot.state_digest(b.desk.state)
    b.close()
    (path,) = snapshot.folder(home).glob("state-*.snap")
    good = path.read_bytes()
    head, payload = good.split(b"\n", 1)

    def start_says(data: bytes, why: str) -> None:
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evo.broker"):
            b = Broker(home, projections=False, sync=False)
        try:
            assert b.restored_from == 0, "the snapshot was used"
            assert snapshot.state_digest(b.desk.state) == full  # the whole log, folded
            assert why in caplog.text, caplog.text
        finally:
            b.close()

    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0xFF
    start_says(head + b"\n" + bytes(flipped), "does not match its digest")
    start_says(good[: len(good) // 2], "does not match its digest")
    start_says(head.replace(b'"seq": ', b'"seq": 9') + b"\n" + payload, "past the log's end")
    # another log's snapshot at the same seq: the log's event there differs
    import json

    h = json.loads(head)
    h["event"] = "0" * 64
    start_says(json.dumps(h).encode() + b"\n" + payload, "is not the one it was taken after")
    path.write_bytes(good)
    b = Broker(home, projections=False, sync=False)
    assert b.restored_from > 0
    b.close()


def test_a_client_sees_the_same_answers_after_a_restart_from_a_snapshot(tbroker, tmp_path):
    home = tmp_path / "home"
    tb = tbroker(home)
    with tb.client() as c:
        ids = c.submit_many([make_spec([PY, "-c", "1"], name=f"t{i}") for i in range(5)])
        before = c.status()
    tb.stop()
    tb = tbroker(home)
    assert tb.broker.restored_from == before.last_seq
    with Client(tb.address) as c:
        after = c.status()
        assert after.jobs == before.jobs and [q["job_id"] for q in after.queued] == ids


def test_evo_log_check_compares_each_snapshot_with_the_fold_of_the_log(tmp_path):
    from tests.conftest import run_evo

    home = tmp_path / "home"
    _history(home, 1200)
    b = Broker(home, projections=False, sync=False)
    b.maybe_snapshot(force=True)
    b.close()
    r = run_evo("log", "check", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the same state as the log's fold to seq" in r.stdout
    # a snapshot that says another state at the same seq (a bug, or a hand-made file)
    (path,) = snapshot.folder(home).glob("state-*.snap")
    state = fold(SegmentLog(home / "log", readonly=True).read_from(1))
    next(iter(state.jobs.values())).error = "not what the log says"
    import hashlib
    import json

    data = snapshot.encode(state)
    head = json.loads(path.read_bytes().split(b"\n", 1)[0])
    head["sha256"] = hashlib.sha256(data).hexdigest()
    path.write_bytes(json.dumps(head).encode() + b"\n" + data)
    r = run_evo("log", "check", home=home)
    assert r.returncode == 1 and "differs from the log's fold to seq" in r.stdout, r.stdout


def test_completed_jobs_keep_a_summary_and_after_a_restart_retry_and_keys_read_the_log(
        tmp_path, tbroker):
    import msgspec

    from evo.broker import protocol as p
    from evo.broker.desk import Desk
    from evo.events.schema import JobSpec, JobSubmitted

    home = tmp_path / "home"
    desk, events, now = Desk(), [], 1000.0
    events += desk.handle(p.Join(node="n", cpus=4, mem_gb=8, slots=1), now, mono=0.0).events
    whole = [JobSpec(command=[PY, "-c", str(i)], key=f"k{i}", params={"i": i}) for i in range(3)]
    for spec in whole:
        events += desk.handle(p.Submit(spec=spec), now).events
        out = desk.handle(p.Ready(node="n", max_leases=1), now, mono=0.0)
        (grant,) = out.reply.leases
        events += out.events
        events += desk.handle(p.Report(node="n", job_id=grant.job_id, lease_epoch=grant.lease_epoch,
                                       report=p.CompletedReport(metrics={"loss": 0.1})),
                              now, mono=0.0).events
    log = SegmentLog(home / "log", sync=False)
    log.append(events)
    log.close()
    b = Broker(home, projections=False, sync=False)
    b.maybe_snapshot(force=True)
    b.close()
    tb = tbroker(home, projections=False)
    state = tb.broker.desk.state
    assert tb.broker.restored_from == state.last_seq
    assert {j.state for j in state.jobs.values()} == {"completed"}
    assert len({id(j.spec) for j in state.jobs.values()}) == 1  # one shared summary
    with tb.client() as c:
        dup = c.request(p.Submit(spec=whole[2]))
        assert dup.duplicate and dup.job_id == "j3"
        with pytest.raises(CommandRejected, match="differs in params"):
            c.request(p.Submit(spec=msgspec.structs.replace(whole[2], params={"i": 9})))
        retried = c.retry("j2")
        (sub,) = [e for e in c.read_all(retried.seq) if isinstance(e, JobSubmitted)]
    assert sub.job_id == retried.job_ids[0]
    assert sub.spec == msgspec.structs.replace(whole[1], key=None, retry_of="j2")
