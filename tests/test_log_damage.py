"""A damaged log is diagnosed, not just refused: `evo log check` names every problem, the broker
refuses with one line, `evo log salvage` saves the valid prefix; a missing segment is named."""

from __future__ import annotations

import msgspec
import pytest
from crc32c import crc32c

from evo.broker.server import Broker, BrokerError
from evo.events.damage import check
from evo.events.log import SegmentLog
from evo.events.schema import JobSpec, JobSubmitted
from tests.conftest import run_evo
from tests.test_log_faults import record_offsets


def _home(tmp_path, n: int = 60, segment_bytes: int = 2000):
    home = tmp_path / "home"
    with SegmentLog(home / "log", segment_bytes=segment_bytes) as lg:
        for i in range(1, n + 1):
            lg.append([JobSubmitted(seq=i, job_id=f"j{i}", spec=JobSpec(command=["run", str(i)]))])
        return home, lg.segments()


def _refused(home) -> str:
    with pytest.raises(BrokerError) as exc:
        Broker(home, projections=False)
    return str(exc.value)


def test_a_flipped_byte_is_named_by_check_refused_by_the_broker_and_salvaged(tmp_path):
    home, segs = _home(tmp_path)
    seg = segs[1]
    data = bytearray(seg.read_bytes())
    offs = record_offsets(bytes(data))
    data[offs[3] + 12] ^= 0x40  # a payload byte of the 4th record of the 2nd segment
    seg.write_bytes(bytes(data))
    r = run_evo("log", "check", home=home)
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"{seg.name} offset {offs[3]}: ") and "checksum mismatch" in first
    good = int(seg.stem) + 2  # the last seq before the flipped record
    assert f"(last good seq {good})" in first and f"1..{good}" in r.stdout
    why = _refused(home)
    assert "\n" not in why and seg.name in why and "evo log check" in why and "salvage" in why
    r = run_evo("broker", home=home)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_evo("log", "salvage", "--to", str(tmp_path / "saved"), home=home)
    assert r.returncode == 0 and f"1..{good}" in r.stdout, r.stderr
    b = Broker(tmp_path / "saved", projections=False)  # the saved log opens and goes on
    try:
        assert b.desk.state.last_seq == good and b.log.last_seq == good
    finally:
        b.close()
    assert run_evo("log", "check", home=tmp_path / "saved").returncode == 0


def test_a_deleted_segment_is_named_as_missing_everywhere(tmp_path):
    home, segs = _home(tmp_path)
    lost = segs[2]
    lo, hi = int(lost.stem), int(segs[3].stem) - 1
    lost.unlink()
    r = run_evo("tail", home=home)  # no broker: read from the files
    assert r.returncode == 1 and f"events {lo}..{hi} are missing" in r.stderr
    assert r.stdout.count("JobSubmitted") == lo - 1  # what precedes the gap was shown
    r = run_evo("log", "check", home=home)
    assert r.returncode == 1 and f"events {lo}..{hi} are missing" in r.stdout
    assert "missing" in _refused(home)


def test_a_zeroed_block_and_an_undecodable_record_are_each_named(tmp_path):
    home, segs = _home(tmp_path, n=40, segment_bytes=1 << 20)
    seg = segs[0]
    data = bytearray(seg.read_bytes())
    offs = record_offsets(bytes(data))
    data[offs[10]:offs[13]] = bytes(offs[13] - offs[10])  # three records zeroed
    # a record with a good checksum whose event does not fit the schema (a float step)
    bad = msgspec.msgpack.encode({"type": "Progress", "seq": 30, "job_id": "j1",
                                  "lease_epoch": 1, "step": 0.5})
    lb = len(bad).to_bytes(4, "little")
    rec = lb + crc32c(bad, crc32c(lb)).to_bytes(4, "little") + bad
    data[offs[29]:offs[30]] = rec
    seg.write_bytes(bytes(data[:offs[29]] + rec + data[offs[30]:]))
    found = check(home / "log")
    whats = [p.what for p in found.problems]
    assert any("not a record" in w for w in whats) and found.problems[0].offset == offs[10]
    assert any("$.step" in w for w in whats), whats
    assert found.prefix == 10 and found.last_seq == 40


def test_a_torn_tail_is_not_damage(tmp_path):
    home, segs = _home(tmp_path, n=10, segment_bytes=1 << 20)
    with open(segs[-1], "ab") as f:
        f.write(b"\x20\x00\x00\x00garbage")
    r = run_evo("log", "check", home=home)
    assert r.returncode == 0 and "no damage" in r.stdout and "torn tail" in r.stdout


def test_damage_in_the_only_segment_is_salvaged_too(tmp_path):
    home, segs = _home(tmp_path, n=30, segment_bytes=1 << 20)
    (seg,) = segs
    data = bytearray(seg.read_bytes())
    offs = record_offsets(bytes(data))
    data[offs[20] + 10] ^= 0x01
    seg.write_bytes(bytes(data))
    r = run_evo("log", "salvage", "--to", str(tmp_path / "saved"), home=home)
    assert r.returncode == 0 and "1..20" in r.stdout, r.stderr
    with SegmentLog(tmp_path / "saved" / "log", readonly=True) as lg:
        assert [e.seq for e in lg.read_from(1)] == list(range(1, 21))
