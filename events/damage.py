"""Damage in a log: found and named (``evo log check``), and the valid prefix saved
(``evo log salvage``).

The writer refuses a damaged log (log.py), which keeps the log from getting worse, but says only
what it met first. ``check`` reads every segment and names every problem, one line each: the
segment, the offset, the last good seq before it and what is wrong (a checksum mismatch, a
length past the end, seqs out of order, a segment missing between two others, a record that
does not decode, an event that does not fold into the state before it). After a bad record it
looks for the next good one (leveldb's reader reports what it dropped and reads on), so one
flipped byte does not hide the rest. A torn tail of the last segment is not damage: it is what
a crash mid-write leaves, and the broker cuts it off when it opens the log.

``salvage`` copies the longest prefix that is whole (from seq 1, contiguous, decodable, folding)
into a new home, byte for byte, so a user can go on from it knowingly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .codec import EventDecodeError, decode, decode_seq
from .log import HEADER, SegmentLog, _record_at, _Scan, _segment_name

RESYNC_MAX_RECORD = 4 << 20  # looking for the next record, longer ones are not considered
_MAP_HEADERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # an event is a msgpack map


@dataclass(frozen=True)
class Problem:
    segment: str
    offset: int
    last_good: int
    what: str

    def line(self) -> str:
        return f"{self.segment} offset {self.offset}: {self.what} (last good seq {self.last_good})"


@dataclass
class Checked:
    segments: int = 0
    events: int = 0  # records that read back
    last_seq: int = 0
    prefix: int = 0  # the last seq of the whole prefix: everything before the first problem
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is not damage (a torn tail)


def _resync(buf: bytes, off: int) -> int | None:
    """The offset of the next plausible good record after ``off``, or None."""
    view = memoryview(buf)
    n = len(buf)
    for p in range(off + 1, n - HEADER.size):
        if buf[p + HEADER.size] not in _MAP_HEADERS:
            continue
        length = int.from_bytes(buf[p:p + 4], "little")
        if length > RESYNC_MAX_RECORD or p + HEADER.size + length > n:
            continue
        rec = _record_at(view, p)
        if rec is not None:
            try:
                decode_seq(view[p + HEADER.size:rec[0]])
            except Exception:  # noqa: BLE001 - a checksum that matches garbage
                continue
            return p
    return None


def _why(buf: bytes, off: int) -> str:
    if len(buf) - off < HEADER.size:
        return "a short record header"
    length, _ = HEADER.unpack_from(buf, off)
    if off + HEADER.size + length > len(buf):
        return f"a record length of {length:,} bytes, past the end of the segment"
    return "a checksum mismatch"


def check(log_dir: Path, *, fold: bool = True) -> Checked:
    """Every problem of the log in ``log_dir`` (see the module's docstring)."""
    from evo.broker.state import BrokerState, IllegalTransition

    out = Checked()
    state = BrokerState() if fold else None
    firsts = sorted(int(p.stem) for p in log_dir.glob("*.seg") if p.stem.isdigit())
    out.segments = len(firsts)
    expected = 1
    good = 0  # the last seq of the whole prefix
    read = 0  # the last seq read back

    def problem(name: str, off: int, what: str) -> None:
        if not out.problems:
            out.prefix = good
        out.problems.append(Problem(name, off, read, what))

    for i, first in enumerate(firsts):
        name = _segment_name(first)
        if first > expected:
            problem(name, 0, f"events {expected}..{first - 1} are missing: no segment holds "
                             f"them (a segment was deleted?)")
        elif first < expected:
            problem(name, 0, f"it begins at seq {first}, which the segment before holds too")
        buf = (log_dir / name).read_bytes()
        off, seq_expected = 0, first
        skipped = False  # the last problem skipped bytes: a seq jump after it is the same damage
        while off < len(buf):
            rec = _record_at(buf, off)
            if rec is None:
                nxt = _resync(buf, off)
                if nxt is None:
                    rest = len(buf) - off
                    if i == len(firsts) - 1 and not out.problems:
                        out.notes.append(f"{name} offset {off}: a torn tail of {rest:,} bytes "
                                         f"(a write cut short; the broker truncates it when it "
                                         f"opens the log)")
                    else:
                        problem(name, off, f"{rest:,} bytes that are not a record ({_why(buf, off)})")
                    break
                problem(name, off, f"{nxt - off:,} bytes that are not a record ({_why(buf, off)})")
                off, skipped = nxt, True
                continue
            end, _ = rec
            payload = buf[off + HEADER.size:end]
            try:
                seq = decode_seq(payload)
            except Exception:  # noqa: BLE001 - a checksum that matches, over what is not an event
                problem(name, off, "a record whose checksum matches but is not an event")
                off = end
                continue
            if seq != seq_expected and skipped and seq > seq_expected:
                last = out.problems[-1]
                lost = f"seq {seq_expected}" if seq == seq_expected + 1 else \
                    f"seqs {seq_expected}..{seq - 1}"
                out.problems[-1] = Problem(last.segment, last.offset, last.last_good,
                                           f"{last.what}; {lost} lost in them")
            elif seq != seq_expected:
                problem(name, off, f"seq {seq} where {seq_expected} was expected")
            skipped = False
            try:
                ev = decode(payload, where=f"seq {seq}")
            except EventDecodeError as exc:
                problem(name, off, str(exc))
                ev = None
            if ev is not None and state is not None and not out.problems:
                try:
                    state.apply(ev)
                except (IllegalTransition, ValueError, KeyError) as exc:
                    problem(name, off, f"seq {seq} does not fold into the state before it ({exc})")
            out.events += 1
            out.last_seq = max(out.last_seq, seq)
            read = seq
            if not out.problems:
                good = seq
            seq_expected = seq + 1
            off = end
        expected = seq_expected
    if not out.problems:
        out.prefix = good
    return out


def projection_seq(home: Path) -> int | None:
    """The last seq the projection file says it applied, if there is one that opens."""
    path = home / "evo.duckdb"
    if not path.exists():
        return None
    try:
        import duckdb

        con = duckdb.connect(str(path), read_only=True)
        try:
            rows = con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchall()
        finally:
            con.close()
        return int(rows[0][0]) if rows else None
    except Exception:  # noqa: BLE001 - locked by a broker, or not a projection: no opinion
        return None


def _records(log_dir: Path, upto: int):  # noqa: ANN202 - an iterator of (seq, raw)
    """The records of seqs 1..``upto``, read segment by segment without opening the log as a
    writer would (which refuses damage anywhere in its last segment)."""
    for first in sorted(int(p.stem) for p in log_dir.glob("*.seg") if p.stem.isdigit()):
        if first > upto:
            return
        buf = (log_dir / _segment_name(first)).read_bytes()
        for seq, a, b in _Scan(_segment_name(first), buf, first):
            yield seq, buf[a:b]
            if seq >= upto:
                return


def salvage(log_dir: Path, to: Path, upto: int) -> int:
    """Copy the records of seqs 1..``upto`` of ``log_dir`` (its whole prefix, see ``check``)
    into a new log at ``to`` (which must not hold one), byte for byte, in fsynced batches;
    returns how many."""
    if to.exists() and any(to.iterdir()):
        raise FileExistsError(f"{to} is not empty; salvage writes a new log")
    dst = SegmentLog(to)
    try:
        batch: list = []
        raws: list[bytes] = []
        n = 0
        for seq, raw in _records(log_dir, upto):
            batch.append(decode(raw))
            raws.append(raw)
            if len(batch) >= 4096:
                dst.append(batch, raws)
                n += len(batch)
                batch, raws = [], []
        if batch:
            dst.append(batch, raws)
            n += len(batch)
        os.sync()
        return n
    finally:
        dst.close()
