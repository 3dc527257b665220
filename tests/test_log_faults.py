"""Torn writes and corruption: one test per fault, after leveldb's log_test."""

from __future__ import annotations

import pytest

from evo.events.log import HEADER, CorruptLog, SegmentLog
from tests.test_log_contract import make_events


def write_log(path, n=5, **kw):
    with SegmentLog(path, **kw) as lg:
        for i in range(1, n + 1):
            lg.append(make_events(i, 1))
        return [p for p in lg.segments()]


def record_offsets(data: bytes):
    offs, off = [], 0
    while off < len(data):
        offs.append(off)
        length, _ = HEADER.unpack_from(data, off)
        off += HEADER.size + length
    return offs


def test_torn_tail_truncated_at_every_byte_of_the_last_record(tmp_path):
    seg = write_log(tmp_path / "ref")[0]
    data = seg.read_bytes()
    last = record_offsets(data)[-1]
    for cut in range(last, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(data[:cut])
        with SegmentLog(d) as lg:
            assert lg.last_seq == 4, cut
            if cut > last:
                assert len(lg.recovered) == 1
                msg = lg.recovered[0]
                assert f"{cut - last} bytes at offset {last}" in msg and seg.name in msg
            else:
                assert lg.recovered == []
            assert (d / seg.name).stat().st_size == last
            lg.append(make_events(5, 1))  # and the log goes on from there
        with SegmentLog(d, readonly=True) as lg:
            assert [e.seq for e in lg.read_from(1)] == [1, 2, 3, 4, 5]


def test_zero_filled_tail_is_torn_not_corrupt(tmp_path):
    seg = write_log(tmp_path / "log")[0]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\0" * 100)
    with SegmentLog(tmp_path / "log") as lg:
        assert lg.last_seq == 5
        assert "100 bytes" in lg.recovered[0]
    assert seg.stat().st_size == size


@pytest.mark.parametrize("where", ["payload", "crc", "length"])
def test_flipped_byte_mid_segment_is_corruption_naming_segment_and_offset(tmp_path, where):
    seg = write_log(tmp_path / "log", n=6)[0]
    data = bytearray(seg.read_bytes())
    off = record_offsets(bytes(data))[2]  # third record: seq 3; last good seq 2
    pos = {"payload": off + HEADER.size + 5, "crc": off + 5, "length": off + 1}[where]
    data[pos] ^= 0x41
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as exc:
        SegmentLog(tmp_path / "log")
    e = exc.value
    assert e.segment == seg.name and e.offset == off and e.last_good_seq == 2
    assert seg.name in str(e) and f"offset {off}" in str(e) and "last good seq 2" in str(e)
    assert seg.read_bytes() == bytes(data), "a corrupt log must not be modified"


def test_corruption_in_an_older_segment_is_reported_by_the_reader(tmp_path):
    segs = write_log(tmp_path / "log", n=20, segment_bytes=600)
    assert len(segs) > 2
    first = segs[0]
    data = bytearray(first.read_bytes())
    off = record_offsets(bytes(data))[1]
    data[off + HEADER.size + 3] ^= 0xFF
    first.write_bytes(bytes(data))
    with SegmentLog(tmp_path / "log", segment_bytes=600) as lg:  # tail is fine: opens
        assert lg.last_seq == 20
        with pytest.raises(CorruptLog, match=rf"{first.name} at offset {off} \(last good seq 1\)"):
            list(lg.read_from(1))
    with SegmentLog(tmp_path / "log", readonly=True) as lg:
        with pytest.raises(CorruptLog):
            list(lg.read_from(1))


def test_a_readonly_reader_stops_at_a_torn_tail_without_truncating(tmp_path):
    seg = write_log(tmp_path / "log")[0]
    with open(seg, "ab") as f:
        f.write(b"\x10\x00\x00\x00abc")
    size = seg.stat().st_size
    with SegmentLog(tmp_path / "log", readonly=True) as lg:
        assert [e.seq for e in lg.read_from(1)] == [1, 2, 3, 4, 5]
    assert seg.stat().st_size == size


def test_seq_out_of_order_on_disk_is_corruption(tmp_path):
    a = write_log(tmp_path / "a", n=3)[0]
    data = a.read_bytes()
    offs = record_offsets(data)
    # duplicate record 2 after record 2: seq 2 where 3 was expected, followed by valid records
    dup = data[offs[1]:offs[2]]
    a.write_bytes(data[:offs[2]] + dup + data[offs[2]:])
    with pytest.raises(CorruptLog, match="seq 2 where 3 was expected"):
        SegmentLog(tmp_path / "a")
