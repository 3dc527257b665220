"""One encoder and one decoder for events, created once (msgspec's perf advice).

Events are msgpack maps (not arrays) so that fields can be appended with defaults and old
records still decode. A relay message carries a batch as a msgpack array whose items are the
very bytes written to the log: ``pack_batch`` builds the array header by hand, so a batch is
encoded once per event, never twice.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from evo.errors import EvoError

from .schema import AnyEvent, Event
from .strict import free_form, friendly, json_value_error, strict_union

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyEvent)
_batch_decoder = msgspec.msgpack.Decoder(list[AnyEvent])


class _SeqOnly(msgspec.Struct):
    seq: int = 0


_seq_decoder = msgspec.msgpack.Decoder(_SeqOnly)


# msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
_BAD = (msgspec.DecodeError, UnicodeDecodeError)


class EventDecodeError(EvoError, ValueError):
    """Raised when bytes do not decode to a known event; the message says why and where."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | memoryview, *, where: str = "") -> Event:
    try:
        return _decoder.decode(data)
    except _BAD as exc:
        raise EventDecodeError(f"{where + ': ' if where else ''}undecodable event ({exc})") from exc


def decode_seq(data: bytes | memoryview) -> int:
    """The seq of an encoded event without building the whole event."""
    return _seq_decoder.decode(data).seq


def pack_batch(encoded: Sequence[bytes]) -> bytes:
    """A msgpack array of already-encoded events."""
    n = len(encoded)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 1 << 16:
        header = b"\xdc" + struct.pack(">H", n)
    else:
        header = b"\xdd" + struct.pack(">I", n)
    return header + b"".join(encoded)


def decode_many(encoded: Sequence[bytes], *, first: int = 0) -> list[Event]:
    """Each of ``encoded`` decoded (faster than packing them into one batch first); an
    undecodable one is named by its index and the seq it should have (``first + index``)."""
    try:
        return list(map(_decoder.decode, encoded))
    except _BAD:
        for i, data in enumerate(encoded):
            try:
                _decoder.decode(data)
            except _BAD as exc:
                raise EventDecodeError(f"event {i} of a batch from seq {first} (seq "
                                       f"{first + i}?): undecodable ({exc})") from exc
        raise


def decode_batch(data: bytes | memoryview) -> list[AnyEvent]:
    try:
        return _batch_decoder.decode(data)
    except _BAD as exc:
        raise EventDecodeError(f"undecodable event batch ({exc})") from exc


# --- what may be appended ---------------------------------------------------------------------

@functools.cache
def _strict() -> tuple[msgspec.msgpack.Decoder, dict[type, list[tuple[str, ...]]]]:
    """The strict decoder, and the free-form values of each event type (params, an
    environment, a sweep's spec): only these can hold what msgpack takes and JSON does not
    (bytes, None keys, NaN, extension types). Made at the first check: a client that only
    reads events never needs them (10 ms of every command's start)."""
    return (msgspec.msgpack.Decoder(strict_union(AnyEvent)),
            {cls: free_form(cls) for cls in AnyEvent.__args__})  # type: ignore[attr-defined]


MAX_EVENT_BYTES = 1 << 20  # an event is a record, not a payload: files go elsewhere


class InvalidEvent(ValueError):
    """Raised when an event does not fit the schema's rules; the message names the field path."""

    event: Any = None  # the event, when the desk knows which of a batch it was


def check(event: Event) -> bytes:
    """``event`` encoded, once it is known to decode back under the strict rules (types as
    declared, finite floats, 64-bit ints), to hold only JSON values where it is free-form (the
    projections read it as JSON) and to be at most MAX_EVENT_BYTES. Raises InvalidEvent naming
    the event and the field."""
    name = type(event).__name__
    try:
        raw = _encoder.encode(event)
    except (TypeError, OverflowError, ValueError) as exc:
        raise InvalidEvent(f"{name}: {exc}") from None
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"{name}: {len(raw):,} bytes encoded, over the limit of "
                           f"{MAX_EVENT_BYTES:,}")
    strict, free = _strict()
    try:
        strict.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"{name}: {friendly(str(exc))}") from None
    for path in free[type(event)]:
        value = event
        for attr in path:
            value = getattr(value, attr)
        if value and (bad := json_value_error(value, "$." + ".".join(path))):
            raise InvalidEvent(f"{name}: {bad}")
    return raw
