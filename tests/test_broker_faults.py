"""Fault injection on the wire: garbage and oversized frames (the fuzz, kill -9 under load and
the rest of the fault suite are in test_fault_suite.py)."""

from __future__ import annotations

import msgspec
import zmq

from evo.broker import protocol as p
from evo.client import Client


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
