"""Events: the schema (one tagged union), the codec and the durable log."""

from .codec import EventDecodeError, decode, decode_batch, encode, pack_batch
from .schema import *  # noqa: F401,F403 - the catalogue is the public surface
from .schema import AnyEvent, Event, EVENT_TYPES, JobSpec, Resources

__all__ = ["AnyEvent", "Event", "EVENT_TYPES", "EventDecodeError", "JobSpec", "Resources",
           "decode", "decode_batch", "encode", "pack_batch"]
