"""One contract for every log backend (in-memory and segment files)."""

from __future__ import annotations

import pytest

from evo.events.log import EventLog, MemoryLog, SegmentLog
from evo.events.schema import JobSpec, JobSubmitted, NodeJoined


def make_events(first: int, n: int):
    return [JobSubmitted(seq=first + i, time=float(first + i), job_id=f"j{first + i}",
                         spec=JobSpec(command=["echo", str(first + i)])) for i in range(n)]


@pytest.fixture(params=["memory", "segment", "segment-small"])
def make_log(request, tmp_path):
    logs: list[EventLog] = []

    def make() -> EventLog:
        if request.param == "memory":
            lg: EventLog = MemoryLog()
        elif request.param == "segment":
            lg = SegmentLog(tmp_path / "log")
        else:  # rotates every few records
            lg = SegmentLog(tmp_path / "log-small", segment_bytes=300)
        logs.append(lg)
        return lg

    yield make
    for lg in logs:
        lg.close()


def test_empty_log(make_log):
    lg = make_log()
    assert lg.last_seq == 0
    assert list(lg.read_from(1)) == []


def test_append_then_read_back_in_order(make_log):
    lg = make_log()
    lg.append(make_events(1, 10))
    lg.append(make_events(11, 5))
    assert lg.last_seq == 15
    got = list(lg.read_from(1))
    assert [e.seq for e in got] == list(range(1, 16))
    assert got[3] == make_events(4, 1)[0]


def test_read_from_middle_and_limit(make_log):
    lg = make_log()
    lg.append(make_events(1, 20))
    assert [e.seq for e in lg.read_from(7)] == list(range(7, 21))
    assert [e.seq for e in lg.read_from(7, limit=3)] == [7, 8, 9]
    assert [s for s, _ in lg.read_raw_from(20)] == [20]
    assert list(lg.read_from(21)) == []


def test_append_returns_the_encoded_bytes(make_log):
    lg = make_log()
    encoded = lg.append(make_events(1, 3))
    assert [raw for _, raw in lg.read_raw_from(1)] == encoded


def test_out_of_order_append_is_refused_and_writes_nothing(make_log):
    lg = make_log()
    lg.append(make_events(1, 2))
    with pytest.raises(ValueError, match="expected 3"):
        lg.append(make_events(4, 1))
    with pytest.raises(ValueError, match="expected 4"):
        lg.append(make_events(3, 1) + make_events(5, 1))
    assert lg.last_seq == 2
    assert [e.seq for e in lg.read_from(1)] == [1, 2]


def test_mixed_event_types_round_trip(make_log):
    lg = make_log()
    ev = NodeJoined(seq=1, time=1.0, node="gpu-1", cpus=16, mem_gb=64, labels=["gpu"])
    lg.append([ev])
    assert list(lg.read_from(1)) == [ev]


def test_segment_log_survives_reopen_and_keeps_appending(tmp_path):
    with SegmentLog(tmp_path / "log", segment_bytes=500) as lg:
        for i in range(1, 31, 3):  # a batch never splits across segments
            lg.append(make_events(i, 3))
        nseg = len(lg.segments())
    assert nseg > 1
    with SegmentLog(tmp_path / "log", segment_bytes=500) as lg:
        assert lg.last_seq == 30 and lg.recovered == []
        lg.append(make_events(31, 5))
    with SegmentLog(tmp_path / "log", readonly=True) as lg:
        assert [e.seq for e in lg.read_from(1)] == list(range(1, 36))
        assert [e.seq for e in lg.read_from(29)] == list(range(29, 36))


def test_rotation_names_segments_by_first_seq(tmp_path):
    with SegmentLog(tmp_path / "log", segment_bytes=200) as lg:
        for i in range(1, 11):
            lg.append(make_events(i, 1))
        names = [p.name for p in lg.segments()]
    firsts = [int(n.split(".")[0]) for n in names]
    assert firsts[0] == 1 and firsts == sorted(firsts) and len(firsts) > 2
