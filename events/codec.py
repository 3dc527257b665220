"""One encoder and one decoder for events, created once (msgspec's perf advice).

Events are msgpack maps (not arrays) so that fields can be appended with defaults and old
records still decode. A relay message carries a batch as a msgpack array whose items are the
very bytes written to the log: ``pack_batch`` builds the array header by hand, so a batch is
encoded once per event, never twice.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgspec

from .schema import AnyEvent, Event

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyEvent)
_batch_decoder = msgspec.msgpack.Decoder(list[AnyEvent])


class _SeqOnly(msgspec.Struct):
    seq: int = 0


_seq_decoder = msgspec.msgpack.Decoder(_SeqOnly)


# msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
_BAD = (msgspec.DecodeError, UnicodeDecodeError)


class EventDecodeError(ValueError):
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


def decode_batch(data: bytes | memoryview) -> list[Event]:
    try:
        return _batch_decoder.decode(data)
    except _BAD as exc:
        raise EventDecodeError(f"undecodable event batch ({exc})") from exc
