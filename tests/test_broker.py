"""The broker over real ZeroMQ sockets on loopback, with a real segment log and fsyncs."""

from __future__ import annotations

import threading
import time

import pytest

from evo.broker.server import Broker, BrokerError
from evo.client import Client, CommandRejected
from evo.errors import BadInput
from evo.events.log import SegmentLog
from evo.events.schema import JobSpec


def test_submit_is_acknowledged_after_it_is_in_the_log(tbroker):
    b = tbroker()
    with b.client() as c:
        job = c.submit(["echo", "hi"], model_type="GLM", cpus=2, tags={"a": "b"})
        assert job == "j1"
        # acknowledged means durable: a second reader of the files sees it now
        with SegmentLog(b.home / "log", readonly=True) as lg:
            (ev,) = list(lg.read_from(1))
        assert ev.job_id == "j1" and ev.spec.model_type == "GLM"
        assert ev.spec.resources.cpus == 2 and ev.spec.tags == {"a": "b"}


def test_invalid_submit_appends_nothing_and_says_where(tbroker):
    b = tbroker()
    with b.client() as c:
        for bad, where in [
            (JobSpec(), "$.spec"),
            (JobSpec(command=["x"], callable="m:f"), "$.spec"),
            (JobSpec(command=[]), "$.spec.command"),
            (JobSpec(callable="nocolon"), "$.spec.callable"),
            (JobSpec(command=["x"], max_attempts=0), "$.spec.max_attempts"),
            (JobSpec(command=["x"], after=["j99"]), "$.spec.after[0]"),
        ]:
            with pytest.raises(CommandRejected) as exc:
                c.submit(bad)
            assert exc.value.code == "invalid" and where in str(exc.value)
        assert c.read(1)[1] == 0
        assert c.submit(["true"]) == "j1"


def test_idempotency_key_returns_the_original_job(tbroker):
    b = tbroker()
    with b.client() as c:
        first = c.submit_reply(["train"], key="exp-1")
        again = c.submit_reply(["train"], key="exp-1")
        assert again.job_id == first.job_id and again.duplicate and not first.duplicate
        with pytest.raises(CommandRejected, match="belongs to job j1 .* differs in command"):
            c.submit_reply(["train", "--other"], key="exp-1")  # a changed spec: refused
        # inside one pipelined batch too
        ids = c.submit_many([JobSpec(command=["x"], key="exp-2")] * 20, window=20)
        assert set(ids) == {ids[0]}
        assert c.read(1)[1] == 2


def test_cancel_queued_job_and_errors(tbroker):
    b = tbroker()
    with b.client() as c:
        j = c.submit(["sleep", "9"])
        assert c.cancel(j, "changed my mind") == [j]
        kinds = [type(e).__name__ for e in c.read(1)[0]]
        assert kinds == ["JobSubmitted", "CancelRequested", "JobCancelled"]
        with pytest.raises(CommandRejected, match="already cancelled"):
            c.cancel(j)
        with pytest.raises(CommandRejected, match="no job or sweep"):
            c.cancel("j404")
        st = c.status()
        assert st.jobs == {"cancelled": 1}


def test_state_is_rebuilt_from_the_log_on_restart(tbroker, tmp_path):
    home = tmp_path / "h"
    b = tbroker(home)
    with b.client() as c:
        ids = c.submit_many([JobSpec(command=["x", str(i)]) for i in range(50)])
        c.cancel(ids[0])
    b.stop()
    b2 = tbroker(home)
    with b2.client() as c:
        st = c.status()
        assert st.last_seq == 52
        assert st.jobs == {"queued": 49, "cancelled": 1}
        assert c.submit(["y"]) == "j51"  # ids count jobs, not events


def test_second_broker_on_the_same_home_is_refused(tbroker):
    b = tbroker()
    with pytest.raises(BrokerError, match="another broker holds"):
        Broker(b.home)


def test_non_loopback_bind_is_refused_without_keys(tmp_path):
    with pytest.raises(BadInput, match="a non-loopback bind needs keys.*evo keys init"):
        Broker(tmp_path / "h", "tcp://0.0.0.0:*")


def test_late_follower_sees_every_event_once_in_order(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit_many([JobSpec(command=["early", str(i)]) for i in range(300)])

    def producer():
        with b.client() as c:
            for i in range(20):
                c.submit_many([JobSpec(command=["live", str(i), str(k)]) for k in range(25)])
                time.sleep(0.01)

    seen = []
    with b.client() as c:
        t = threading.Thread(target=producer)
        t.start()
        for ev in c.follow(1, idle_s=0.2, until=time.monotonic() + 30):
            seen.append(ev.seq)
            if ev.seq == 800:
                break
        t.join()
    assert seen == list(range(1, 801))


def test_follower_fills_a_gap_when_the_relay_drops(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit(["a"])
        gen = c.follow(1, idle_s=0.2, until=time.monotonic() + 20)
        assert next(gen).seq == 1
        # Events committed while nobody listens reach the follower by Read, not the relay.
        with b.client() as c2:
            c2.submit_many([JobSpec(command=["b", str(i)]) for i in range(100)])
        got = [next(gen).seq for _ in range(100)]
        assert got == list(range(2, 102))
        gen.close()


def test_read_limit_and_head(tbroker):
    b = tbroker()
    with b.client() as c:
        c.submit_many([JobSpec(command=["x"]) for _ in range(30)])
        events, head = c.read(5, limit=10)
        assert [e.seq for e in events] == list(range(5, 15)) and head == 30
        assert list(e.seq for e in c.read_all(25)) == [25, 26, 27, 28, 29, 30]
