"""Snapshots of the broker's state at a seq, so that a restart folds only the log's tail.

A snapshot is the folded state (``BrokerState``, msgpack through msgspec, which knows its
dataclasses and Structs; its jobs apart, see ``decode``) written to
``EVO_HOME/snapshots/state-<seq>.snap`` as one header line of JSON and the payload:

  * ``seq``: the last event folded into it;
  * ``sha256``: the payload's digest, checked before it is decoded (a torn or flipped file
    is never used);
  * ``event``: the sha256 of the log's own record at ``seq``, checked against the log, so a
    snapshot from another log (salvaged, replaced, truncated) is never used with this one;
  * ``digest``: the state's replay digest (``state_digest``: its canonical encoding, sets
    and unordered maps sorted), which a test compares with the full fold's.

The log stays the only source of truth: a snapshot that fails any check is ignored (with a
warning) and the whole log is folded, as before snapshots; deleting the folder is always
safe. The broker encodes a snapshot in its loop (a copy-free encode: about 0.1 s at 1,000,000
events) and writes and fsyncs it in a thread; it keeps the newest two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import msgspec

from evo.events.log import EventLog

from .state import BrokerState, Job, kept_job

log = logging.getLogger("evo.broker")

FORMAT = 2  # 1: the state in one piece (its jobs decoded at once)
KEEP = 2
_encoder = msgspec.msgpack.Encoder()
_canonical = msgspec.msgpack.Encoder(order="deterministic")
# The payload is the state without its jobs, then the jobs, each decoded on its own and made
# what the fold holds (kept_job: a summary's spec shared) before the next: what a decode
# makes and drops is then reused at once, instead of a whole state of specs left as holes
# in the heap (the restore at 1,000,000 events: 332 MB and 2.0 s decoded whole, 228 MB and
# 0.85 s job by job).
_decoder = msgspec.msgpack.Decoder(tuple[BrokerState, dict[str, msgspec.Raw]])
_job = msgspec.msgpack.Decoder(Job)


def folder(home: Path) -> Path:
    return home / "snapshots"


def _derived_cleared(state: BrokerState) -> object:
    """The scheduler's queue index is derived, not state: it is left out (and rebuilt)."""
    index, state.order_index = state.order_index, None
    return index


def encode(state: BrokerState) -> bytes:
    index = _derived_cleared(state)
    jobs, state.jobs = state.jobs, {}
    try:
        return _encoder.encode((state, jobs))
    finally:
        state.order_index, state.jobs = index, jobs


def decode(data: bytes) -> BrokerState:
    state, raws = _decoder.decode(data)
    jobs = state.jobs
    for job_id, raw in raws.items():
        jobs[job_id] = kept_job(_job.decode(raw))
    return state


def state_digest(state: BrokerState) -> str:
    """The state's digest, independent of set order: equal for equal folds."""
    index = _derived_cleared(state)
    try:
        return hashlib.sha256(_canonical.encode(state)).hexdigest()
    finally:
        state.order_index = index


def _event_hash(log_: EventLog, seq: int) -> str:
    for at, raw in log_.read_raw_from(seq, limit=1):
        if at == seq:
            return hashlib.sha256(raw).hexdigest()
    return ""


def write(home: Path, state: BrokerState, log_: EventLog) -> Path:
    """Write the snapshot of ``state`` now (the Writer does it off the broker's loop)."""
    return _write(home, state.last_seq, encode(state), _event_hash(log_, state.last_seq))


def _write(home: Path, seq: int, data: bytes, event: str) -> Path:
    """Atomically: a temp file, fsync, rename, fsync of the folder; then all but the newest
    KEEP are dropped."""
    header = {"format": FORMAT, "seq": seq, "sha256": hashlib.sha256(data).hexdigest(),
              "event": event}
    d = folder(home)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"state-{seq:012d}.snap"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in sorted(d.glob("state-*.snap"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return final


class Mismatch(Exception):
    """The log's event at the snapshot's seq is not the one the snapshot was taken after."""


def load(home: Path, last_seq: int) -> tuple[BrokerState, str] | None:
    """The newest snapshot that passes its own checks and is not past the log's end (the
    log's last seq), with the hash of the event it was taken after (``fold_tail`` checks it
    against the log as it reads on), or None."""
    for path in sorted(folder(home).glob("state-*.snap"), reverse=True):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                data = f.read()
            seq = int(header["seq"])
            why = ""
            if header.get("format") != FORMAT:
                why = f"format {header.get('format')}, not {FORMAT}"
            elif seq > last_seq:
                why = f"it is at seq {seq}, past the log's end ({last_seq})"
            elif hashlib.sha256(data).hexdigest() != header["sha256"]:
                why = "its payload does not match its digest"
            if why:
                log.warning("snapshot %s not used: %s", path.name, why)
                continue
            state = decode(data)
            if state.last_seq != seq:
                raise ValueError(f"its state is at seq {state.last_seq}, its header says {seq}")
        except (OSError, ValueError, KeyError, msgspec.DecodeError) as exc:
            log.warning("snapshot %s not used: %s", path.name, exc)
            continue
        return state, str(header["event"])
    return None


def fold_tail(state: BrokerState, log_: EventLog, event: str) -> BrokerState:
    """Fold the log's events after the snapshot's seq onto it, in one read of the log that
    first checks the event at that seq is the one the snapshot was taken after."""
    from evo.events.codec import decode as decode_event

    at = state.last_seq
    first = True
    for seq, raw in log_.read_raw_from(at):
        if first:
            if seq != at or hashlib.sha256(raw).hexdigest() != event:
                raise Mismatch(f"the log's event {at} is not the one it was taken after")
            first = False
            continue
        state.apply(decode_event(raw))
    if first:
        raise Mismatch(f"the log has no event {at}")
    return state


def verify(home: Path, log_: EventLog) -> list[tuple[str, bool]]:
    """Each snapshot against the fold of the log up to its seq (`evo log check`): (what was
    found, whether it matches). Reads the log once."""
    from evo.events.codec import decode as decode_event

    snaps: list[tuple[Path, int, BrokerState | None, str]] = []
    for path in sorted(folder(home).glob("state-*.snap")):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                data = f.read()
            if hashlib.sha256(data).hexdigest() != header["sha256"]:
                snaps.append((path, int(header["seq"]), None, "its payload does not match "
                              "its digest"))
                continue
            snaps.append((path, int(header["seq"]), decode(data), ""))
        except (OSError, ValueError, KeyError, msgspec.DecodeError) as exc:
            snaps.append((path, 0, None, f"unreadable: {exc}"))
    out: list[tuple[str, bool]] = []
    todo = sorted((s for s in snaps if s[2] is not None), key=lambda s: s[1])
    out += [(f"snapshot {path.name}: {why}", False) for path, _, st, why in snaps if st is None]
    state = BrokerState()
    for seq, raw in log_.read_raw_from(1):
        if not todo:
            break
        state.apply(decode_event(raw))
        while todo and todo[0][1] == seq:
            path, at, snap, _ = todo.pop(0)
            assert snap is not None
            same = state_digest(snap) == state_digest(state)
            out.append((f"snapshot {path.name}: " + ("the same state as the log's fold to seq "
                        f"{at}" if same else f"differs from the log's fold to seq {at}: a "
                        "restart does not use it once the log's event there differs; delete it"),
                        same))
    out += [(f"snapshot {path.name}: at seq {at}, past the log's end (not used)", True)
            for path, at, _, _ in todo]
    return out


class Writer:
    """Writes snapshots off the broker's loop: one at a time, the newest wins."""

    def __init__(self, home: Path, log_: EventLog) -> None:
        self.home, self.log = home, log_
        self._thread: threading.Thread | None = None
        self.written = 0
        self.error = ""

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, state: BrokerState) -> bool:
        """Encode now (the state goes on changing), write in the background. False when the
        previous one is still being written."""
        if self.busy():
            return False
        payload = encode(state)
        seq = state.last_seq
        event = _event_hash(self.log, seq)  # the newest records are in the log's memory

        def run() -> None:
            try:
                _write(self.home, seq, payload, event)
                self.written = seq
            except OSError as exc:  # a full disk: no snapshot, nothing else changes
                self.error = f"snapshot at seq {seq} not written: {exc}"
                log.warning("%s", self.error)

        self._thread = threading.Thread(target=run, name="evo-snapshot", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
