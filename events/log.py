"""The durable event log: append-only segments of ``[length][crc32c][msgpack]`` records.

Layout (after leveldb's log format, without its blocks):
  * ``<dir>/<first seq, 20 digits>.seg``; a segment is rotated once it passes ``segment_bytes``.
    A batch is never split across segments, and a new segment and its directory are fsynced
    before the first record lands in it.
  * record = ``u32 length | u32 crc32c(length bytes + payload) | payload`` (little endian);
    the payload is one encoded event whose ``seq`` is exactly one more than the record before.
  * group commit: ``append(batch)`` writes the whole batch with one write and one fdatasync.

Recovery rules, applied when a writer opens the log:
  * a torn last record (a crash mid-write) is truncated, and ``recovered`` says how many bytes
    at which offset of which segment;
  * a bad record followed by any valid record is *corruption*, never a torn tail: CorruptLog
    names the segment, the offset and the last good seq, and nothing is truncated.
Readers (``read_from``) apply the same rule, except that they never truncate: at a torn tail
they stop, since a writer may still be writing it.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from crc32c import crc32c

from evo import failpoints
from evo.errors import EvoError

from .codec import decode, decode_seq, encode
from .schema import Event

log = logging.getLogger("evo.log")

HEADER = struct.Struct("<II")
MAX_RECORD = 64 << 20  # a record longer than this is corruption, not a big event
# Opening a log scans its last segment, and a restart from a snapshot reads on from inside one:
# segments of 16 MiB (about 100,000 events) bound both to a fraction of a second.
SEGMENT_BYTES = 16 << 20


class CorruptLog(EvoError):
    """Raised when a record in the middle of the log fails its checksum or breaks seq order,
    or a segment is missing between two others."""

    def __init__(self, segment: str, offset: int, last_good_seq: int, why: str) -> None:
        self.segment, self.offset, self.last_good_seq = segment, offset, last_good_seq
        super().__init__(
            f"corrupt event log: {why} in segment {segment} at offset {offset} "
            f"(last good seq {last_good_seq}); the log was not modified"
        )


class LogWriteError(OSError):
    """Raised when a batch could not be made durable (a full disk, an I/O error); none of the
    batch counts as written, and the log is as it was before the batch."""


class EventLog(ABC):
    """What the broker needs of a log; every backend passes tests/test_log_contract.py."""

    last_seq: int = 0
    broken: str = ""  # why appends are refused for good (the log's end is in doubt)

    @abstractmethod
    def append(self, events: Sequence[Event], encoded: Sequence[bytes] | None = None) -> list[bytes]:
        """Make the batch durable (one sync) and return each event's encoded bytes (the
        caller's ``encoded``, when it has them already). Raises LogWriteError, leaving the
        log as it was, when the batch cannot be made durable."""

    @abstractmethod
    def read_raw_from(self, seq: int, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield ``(seq, encoded event)`` from ``seq`` on, in order."""

    def read_from(self, seq: int = 1, limit: int | None = None) -> Iterator[Event]:
        for s, raw in self.read_raw_from(seq, limit):
            yield decode(raw, where=f"event {s}")

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass

    def _check_contiguous(self, events: Sequence[Event]) -> None:
        for i, ev in enumerate(events):
            if ev.seq != self.last_seq + 1 + i:
                raise ValueError(
                    f"append out of order: event {type(ev).__name__} has seq {ev.seq}, "
                    f"expected {self.last_seq + 1 + i}"
                )

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryLog(EventLog):
    """In-memory backend for fast unit tests: same contract, no durability."""

    def __init__(self) -> None:
        self._records: list[bytes] = []
        self.last_seq = 0
        self.recovered: list[str] = []

    def append(self, events: Sequence[Event], encoded: Sequence[bytes] | None = None) -> list[bytes]:
        self._check_contiguous(events)
        encoded = [encode(ev) for ev in events] if encoded is None else list(encoded)
        self._records.extend(encoded)
        self.last_seq += len(encoded)
        return encoded

    def read_raw_from(self, seq: int, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
        start = max(seq, 1)
        stop = self.last_seq if limit is None else min(self.last_seq, start + limit - 1)
        for s in range(start, stop + 1):
            yield s, self._records[s - 1]


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_at(buf: bytes | memoryview, off: int) -> tuple[int, int] | None:
    """(payload end, payload length) of a valid record at ``off``, or None."""
    if len(buf) - off < HEADER.size:
        return None
    length, crc = HEADER.unpack_from(buf, off)
    end = off + HEADER.size + length
    if length > MAX_RECORD or end > len(buf):
        return None
    if crc32c(buf[off + HEADER.size : end], crc32c(buf[off : off + 4])) != crc:
        return None
    return end, length


def _valid_record_after(buf: bytes | memoryview, off: int, after_seq: int) -> int | None:
    """Offset of the first valid record past ``off`` whose seq is beyond ``after_seq``."""
    for p in range(off + 1, len(buf) - HEADER.size + 1):
        rec = _record_at(buf, p)
        if rec is not None:
            try:
                if decode_seq(buf[p + HEADER.size : rec[0]]) > after_seq:
                    return p
            except Exception:  # noqa: BLE001 - a checksum match on garbage
                continue
    return None


class _Scan:
    """Walk one segment's bytes; stops at the end or at the first bad record."""

    def __init__(self, name: str, buf: bytes, first_seq: int) -> None:
        self.name, self.buf = name, buf
        self.expected = first_seq
        self.offset = 0
        self.bad: str | None = None  # why the record at ``offset`` is bad, if it is

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """Yield (seq, payload start, payload end) of each good record."""
        buf = memoryview(self.buf)
        while self.offset < len(buf):
            rec = _record_at(buf, self.offset)
            if rec is None:
                self.bad = self._why(buf)
                return
            end, _ = rec
            start = self.offset + HEADER.size
            try:
                seq = decode_seq(buf[start:end])
            except Exception:  # noqa: BLE001
                self.bad = "a record whose checksum matches but does not decode"
                return
            if seq != self.expected:
                self.bad = f"seq {seq} where {self.expected} was expected"
                return
            yield seq, start, end
            self.expected += 1
            self.offset = end

    def _why(self, buf: memoryview) -> str:
        if len(buf) - self.offset < HEADER.size:
            return "a short record header"
        length, _ = HEADER.unpack_from(buf, self.offset)
        if length > MAX_RECORD:
            return f"a record length of {length} bytes"
        if self.offset + HEADER.size + length > len(buf):
            return "a record that runs past the end of the segment"
        return "a checksum mismatch"

    def is_torn_tail(self) -> bool:
        """A bad record is a torn tail only when no valid record follows it."""
        return _valid_record_after(self.buf, self.offset, self.expected - 1) is None


class SegmentLog(EventLog):
    """The durable backend. One writer per directory (the broker holds a lock file)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = SEGMENT_BYTES,
        sync: bool = True,
        readonly: bool = False,
        cache_events: int = 65536,
    ) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.readonly = readonly
        self.recovered: list[str] = []
        # Recent records kept in memory so Read of a recent range (late joiners, gap fills)
        # costs no disk I/O.
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=cache_events)
        self._file: io.FileIO | None = None
        if not readonly:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._segments: list[int] = self._list_segments()
        self.last_seq = 0
        self._size = 0
        if self._segments:
            self._open_tail()
        elif not readonly:
            self._new_segment(1)

    # --- opening ------------------------------------------------------------------------------

    def _list_segments(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        firsts = []
        for p in self.dir.glob("*.seg"):
            try:
                firsts.append(int(p.stem))
            except ValueError:
                continue
        return sorted(firsts)

    def _path(self, first_seq: int) -> Path:
        return self.dir / _segment_name(first_seq)

    def _open_tail(self) -> None:
        first = self._segments[-1]
        path = self._path(first)
        buf = path.read_bytes()
        scan = _Scan(path.name, buf, first)
        last = first - 1
        for seq, _, _ in scan:
            last = seq
        if scan.bad is not None:
            if not scan.is_torn_tail():
                raise CorruptLog(path.name, scan.offset, last, scan.bad)
            torn = len(buf) - scan.offset
            msg = (
                f"truncated a torn tail of {torn} bytes at offset {scan.offset} of segment "
                f"{path.name} ({scan.bad}); last good seq {last}"
            )
            self.recovered.append(msg)
            if not self.readonly:
                log.warning(msg)
                with open(path, "r+b") as f:
                    f.truncate(scan.offset)
                    f.flush()
                    os.fsync(f.fileno())
        self.last_seq = last
        self._size = scan.offset
        if not self.readonly:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - held open for appends

    def _new_segment(self, first_seq: int) -> None:
        """Start ``<first_seq>.seg``; on an error the current segment stays the one written."""
        path = self._path(first_seq)
        new = open(path, "ab", buffering=0)  # noqa: SIM115 - held open for appends
        try:
            if self.sync:
                os.fsync(new.fileno())
            failpoints.hit("log.rotate")
            if self.sync:
                _fsync_dir(self.dir)
        except BaseException:
            new.close()
            if path.stat().st_size == 0:
                path.unlink(missing_ok=True)
            raise
        if self._file is not None:
            self._file.close()
        self._file = new
        self._segments.append(first_seq)
        self._size = 0

    # --- writing ------------------------------------------------------------------------------

    def append(self, events: Sequence[Event], encoded: Sequence[bytes] | None = None) -> list[bytes]:
        if self.readonly or self._file is None:
            raise RuntimeError(f"event log {self.dir} is open read-only")
        if self.broken:
            raise LogWriteError(self.broken)
        if not events:
            return []
        self._check_contiguous(events)
        encoded = [encode(ev) for ev in events] if encoded is None else list(encoded)
        parts = []
        for payload in encoded:
            n = len(payload)
            if n > MAX_RECORD:
                raise ValueError(f"event {events[0].seq} is {n} bytes; the limit is {MAX_RECORD}")
            lb = n.to_bytes(4, "little")
            parts.append(lb)
            parts.append(crc32c(payload, crc32c(lb)).to_bytes(4, "little"))
            parts.append(payload)
        data = b"".join(parts)
        try:
            if self._size >= self.segment_bytes:
                self._new_segment(events[0].seq)
        except OSError as exc:
            raise LogWriteError(f"{exc.strerror or exc} starting a new segment of the event "
                                f"log in {self.dir}") from exc
        start = self._size
        try:
            failpoints.hit("log.write")
            view = memoryview(data)
            while view:  # unbuffered writes may be short; finish them
                view = view[self._file.write(view):]
            failpoints.hit("log.after_write")
            if self.sync:
                failpoints.hit("log.fsync")
                os.fdatasync(self._file.fileno())
        except OSError as exc:
            # Nothing of the batch may count as durable, and nothing of it may be read back
            # after a restart: cut the segment back to where the batch began.
            self._cut(start)
            why = (f"{exc.strerror or exc} writing the event log in {self.dir} "
                   f"(segment {self._path(self._segments[-1]).name})")
            if self.broken:  # cut back it was not: after a restart it may read as written
                raise LogWriteError(f"{why}; it could not be cut back, so these commands may "
                                    "still be in the log after a restart (resubmit with the "
                                    "same --key to be sure)") from exc
            raise LogWriteError(why) from exc
        self._size += len(data)
        first = events[0].seq
        self._recent.extend(zip(range(first, first + len(encoded)), encoded))
        self.last_seq += len(encoded)
        return encoded

    def _cut(self, size: int) -> None:
        """Truncate the segment being written back to ``size`` bytes, durably."""
        assert self._file is not None
        try:
            os.ftruncate(self._file.fileno(), size)
            os.fsync(self._file.fileno())
        except OSError as exc:
            # The segment may now end in records no one was told about: refuse every
            # further append rather than write after them.
            self.broken = (f"the event log in {self.dir} could not be cut back after a failed "
                           f"write ({exc.strerror or exc}); restart the broker, which checks "
                           "the log as it opens it")

    # --- reading ------------------------------------------------------------------------------

    def read_raw_from(self, seq: int, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
        seq = max(seq, 1)
        remaining = limit if limit is not None else -1
        if self._recent and self._recent[0][0] <= seq and not self.readonly:
            start = seq - self._recent[0][0]
            for i in range(start, len(self._recent)):
                if remaining == 0:
                    return
                yield self._recent[i]
                remaining -= 1
            return
        segments = self._segments if not self.readonly else self._list_segments()
        idx = 0
        for i, first in enumerate(segments):
            if first <= seq:
                idx = i
        expected = None  # the seq the next segment must begin with
        for i in range(idx, len(segments)):
            first = segments[i]
            path = self._path(first)
            if (expected is None and seq < first) or (expected is not None and first != expected):
                want = seq if expected is None else expected
                raise CorruptLog(path.name, 0, want - 1,
                                 f"events {want}..{first - 1} are missing (no segment holds them)"
                                 if first > want else f"a segment that begins at seq {first}, "
                                 f"before {want}")
            buf = path.read_bytes()
            if not self.readonly and i == len(segments) - 1:
                buf = buf[: self._size]  # never past what is committed
            scan = _Scan(path.name, buf, first)
            for s, a, b in scan:
                if s < seq:
                    continue
                if remaining == 0:
                    return
                yield s, buf[a:b]
                remaining -= 1
            if scan.bad is not None:
                last_seg = i == len(segments) - 1
                if not (last_seg and scan.is_torn_tail()):
                    raise CorruptLog(path.name, scan.offset, scan.expected - 1, scan.bad)
                return
            expected = scan.expected

    def segments(self) -> list[Path]:
        return [self._path(f) for f in self._segments]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
