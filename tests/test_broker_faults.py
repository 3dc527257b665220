"""Fault injection: garbage on the wire, oversized frames, kill -9 of the broker mid-load."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import msgspec
import pytest
import zmq

from evo.broker import protocol as p
from evo.cli.client import BrokerUnavailable, Client
from evo.events.log import SegmentLog
from evo.broker.state import fold
from evo.events.schema import JobSpec, JobSubmitted
from tests.fuzz import random_frame


def raw_dealer(address: str):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return ctx, s


def ask(s, frames, timeout_ms=5000):
    s.send_multipart(frames)
    assert s.poll(timeout_ms), "broker did not answer"
    return p.reply_decoder.decode(s.recv())


def test_bad_frames_get_error_replies_and_change_nothing(tbroker):
    b = tbroker()
    ctx, s = raw_dealer(b.address)
    try:
        r = ask(s, [b"\xc1\xc1garbage"])
        assert isinstance(r, p.Error) and r.code == "protocol"
        r = ask(s, [p.command_encoder.encode(p.Hello(req=7)), b"extra"])
        assert isinstance(r, p.Error) and "expected 1 frame, got 2" in r.message and r.req == 7
        r = ask(s, [msgspec.msgpack.encode({"cmd": "launch_missiles", "req": 9})])
        assert isinstance(r, p.Error) and r.req == 9 and "launch_missiles" in r.message
        r = ask(s, [msgspec.msgpack.encode({"cmd": "submit", "req": 3, "spec": {"command": "ls"}})])
        assert isinstance(r, p.Error) and "$.spec.command" in r.message
        r = ask(s, [msgspec.msgpack.encode([1, 2, 3])])
        assert isinstance(r, p.Error)
        r = ask(s, [b""])
        assert isinstance(r, p.Error)
    finally:
        s.close(0)
        ctx.term()
    with b.client() as c:
        assert c.status().last_seq == 0
        assert c.submit(["ok"]) == "j1"


def test_oversized_message_disconnects_only_that_peer(tbroker):
    b = tbroker()
    ctx, s = raw_dealer(b.address)
    try:
        s.send(b"\x00" * (p.MAX_MESSAGE_BYTES + 10))
        assert not s.poll(500), "an oversized message must get no reply"
    finally:
        s.close(0)
        ctx.term()
    with b.client() as c:
        assert c.submit(["still", "serving"]) == "j1"


def _fuzz(address: str, rng: random.Random, n: int, deadline_s: float = 20.0) -> int:
    """Send up to ``n`` fuzzed frames to ``address``, draining replies; how many were sent."""
    ctx, s = raw_dealer(address)
    sent = 0
    deadline = time.monotonic() + deadline_s
    try:
        while sent < n and time.monotonic() < deadline:
            s.send_multipart(random_frame(rng))
            sent += 1
            if sent % 200 == 0:  # drain replies now and then
                while s.poll(50):
                    s.recv()
    finally:
        s.close(0)
        ctx.term()
    return sent


def test_fuzz_of_random_frames_leaves_the_broker_serving(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit(["before", "fuzz"])
        queries = c.hello().query_endpoint
    rng = random.Random(1234)
    assert _fuzz(b.address, rng, 3000) >= 1000
    assert _fuzz(queries, rng, 1000) >= 300
    with b.client() as c:
        j = c.submit(["after", "fuzz"])
        events, head = c.read(1, limit=100_000)
        # the projection still follows, and answers
        assert c.sql(f"SELECT count(*) AS n FROM jobs WHERE job_id = '{j}'").to_pylist() == [{"n": 1}]
    # every appended event is a valid, decodable, folded event; the broker still serves
    assert events[-1].job_id == j and head == events[-1].seq
    assert fold(events).last_seq == head
    assert b.thread.is_alive() and b.broker.follower.is_alive()


def test_kill9_of_broker_while_4_clients_submit_loses_no_acknowledged_submit(pbroker, tmp_path):
    home = tmp_path / "home"
    acked: dict[str, str] = {}  # key -> job id, for every acknowledged submit
    lock = threading.Lock()
    rounds = 4

    for rnd in range(rounds):
        b = pbroker(home)
        stop = threading.Event()

        def client_loop(cid: int, address: str = b.address, rnd: int = rnd) -> None:
            with Client(address, timeout_s=2.0) as c:
                i = 0
                try:
                    while not stop.is_set():
                        reqs = []
                        for _ in range(8):  # pipelined: some are in flight at the kill
                            key = f"r{rnd}-c{cid}-{i}"
                            i += 1
                            reqs.append((key, c.send(p.Submit(spec=JobSpec(command=["t", key], key=key)))))
                        for key, req in reqs:
                            reply = c.receive(req)
                            with lock:
                                acked[key] = reply.job_id
                except BrokerUnavailable:
                    return

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(0.3, 0.8))
        b.kill()
        stop.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive()

    b = pbroker(home)  # restart once more: recovery truncates any torn tail
    b.stop()
    with SegmentLog(home / "log", readonly=True) as lg:
        submitted = [e for e in lg.read_from(1) if isinstance(e, JobSubmitted)]
    by_key = Counter(e.spec.key for e in submitted)
    ids = {e.spec.key: e.job_id for e in submitted}
    assert len(acked) > 100, "the clients barely ran"
    missing = [k for k in acked if k not in ids]
    assert not missing, f"acknowledged but lost: {missing[:5]}"
    assert all(by_key[k] == 1 for k in by_key), "a submit was recorded twice"
    assert all(ids[k] == acked[k] for k in acked), "job id changed across a restart"


def test_idempotency_key_survives_a_restart(pbroker, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    with Client(b.address) as c:
        first = c.submit(["train"], key="exp-42")
    b.kill()
    b = pbroker(home)
    with Client(b.address) as c:
        again = c.submit_reply(["train"], key="exp-42")
        assert again.job_id == first and again.duplicate
        assert c.status().last_seq == 1
    b.stop()
