"""Snapshots of the broker's state at a seq, so that a restart folds only the log's tail.

A snapshot is the folded state (``BrokerState``, msgpack through msgspec, which knows its
dataclasses and Structs) written to ``EVO_HOME/snapshots/state-<seq>.snap`` as one header
line of JSON and the payload:

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

from .state import BrokerState

log = logging.getLogger("evo.broker")

FORMAT = 1
KEEP = 2
_encoder = msgspec.msgpack.Encoder()
_canonical = msgspec.msgpack.Encoder(order="deterministic")
_decoder = msgspec.msgpack.Decoder(BrokerState)


def folder(home: Path) -> Path:
    return home / "snapshots"


def _derived_cleared(state: BrokerState) -> object:
    """The scheduler's queue index is derived, not state: it is left out (and rebuilt)."""
    index, state.order_index = state.order_index, None
    return index


def encode(state: BrokerState) -> bytes:
    index = _derived_cleared(state)
    try:
        return _encoder.encode(state)
    finally:
        state.order_index = index


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


def load(home: Path, log_: EventLog) -> BrokerState | None:
    """The newest snapshot that passes every check and is not past the log's end, or None."""
    last = log_.last_seq
    for path in sorted(folder(home).glob("state-*.snap"), reverse=True):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                data = f.read()
            seq = int(header["seq"])
            why = ""
            if header.get("format") != FORMAT:
                why = f"format {header.get('format')}, not {FORMAT}"
            elif seq > last:
                why = f"it is at seq {seq}, past the log's end ({last})"
            elif hashlib.sha256(data).hexdigest() != header["sha256"]:
                why = "its payload does not match its digest"
            elif _event_hash(log_, seq) != header["event"]:
                why = f"the log's event {seq} is not the one it was taken after"
            if why:
                log.warning("snapshot %s not used: %s", path.name, why)
                continue
            state = _decoder.decode(data)
        except (OSError, ValueError, KeyError, msgspec.DecodeError) as exc:
            log.warning("snapshot %s not used: %s", path.name, exc)
            continue
        return state
    return None


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
