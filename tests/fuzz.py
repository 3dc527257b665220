"""Frames a hostile or broken peer might send, for the fuzz tests and bench/faults.py.

Each is a list of ZeroMQ frames: random bytes, truncated or bit-flipped real commands, deeply
nested msgpack, invalid UTF-8, every command with hostile field values (NaN, infinities, ints
past 64 bits signed, wrong types, NUL bytes, huge strings), and the wrong number of frames.
"""

from __future__ import annotations

import random

import msgspec

from evo.broker import protocol as p
from evo.events.schema import JobSpec

VALUES = [0, 1, -1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, float("inf"), float("-inf"),
          float("nan"), 1e308, "", "x", "j1", "\x00", "../../etc", "a" * 5000, b"\xff\xfe", True,
          False, None, [], {}, [1, [2, [3]]], {"k": {"k": 1}}, {"1": [None]}, [["a", 1]]]
COMMANDS = [c for c in p.AnyCommand.__args__]  # type: ignore[attr-defined]
REPORTS = [c.__struct_config__.tag for c in p.AnyReport.__args__]  # type: ignore[attr-defined]


def _value(rng: random.Random, depth: int = 0):  # noqa: ANN202 - anything msgpack can hold
    r = rng.random()
    if depth < 3 and r < 0.1:
        return {rng.choice(["kind", "metrics", "step", "x"]): _value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if depth < 3 and r < 0.15:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if r < 0.2:
        return {"kind": rng.choice(REPORTS), "step": rng.choice(VALUES),
                "metrics": {"loss": rng.choice(VALUES)}, "env": {"a": rng.choice(VALUES)},
                "path": rng.choice(VALUES), "artifacts": {rng.choice(["a", "../b"]): "x"}}
    return rng.choice(VALUES)


def _hostile_command(rng: random.Random) -> bytes:
    cls = rng.choice(COMMANDS)
    fields = {"cmd": cls.__struct_config__.tag, "req": rng.choice([1, 2, -1, 2**63 - 1])}
    for name in cls.__struct_fields__:
        if rng.random() < 0.8:
            fields[name] = _value(rng)
    if rng.random() < 0.3:
        fields["spec"] = {"command": rng.choice([["a"], ["a\x00"], "ls", []]),
                          "params": {"x": _value(rng)}, "priority": rng.choice(VALUES),
                          "resources": {"cpus": rng.choice(VALUES)}}
    return msgspec.msgpack.encode(fields)


def nested(depth: int, opener: bytes = b"\x91") -> bytes:
    return opener * depth + b"\x01"


def random_frame(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(9)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64))]
    if kind == 1:  # a real command with a byte flipped, or cut short
        raw = bytearray(p.command_encoder.encode(p.Submit(req=1, spec=JobSpec(
            command=["a", "b"], params={"lr": 0.1, "layers": [1, 2]}))))
        if rng.random() < 0.5:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        else:
            del raw[rng.randrange(len(raw)):]
        return [bytes(raw)]
    if kind == 2:  # too many or too few frames
        return [b"a"] * rng.choice([2, 3, 4]) if rng.random() < 0.5 else \
            [p.command_encoder.encode(p.Status(req=4)), b"x"]
    if kind == 3:  # nesting
        return [nested(rng.choice([33, 100, 1000, 20_000]), rng.choice([b"\x91", b"\x81\xa1k"]))]
    if kind == 4:  # invalid UTF-8 in a string
        return [b"\x82\xa3cmd" + rng.choice([b"\xa2\xff\xfe", b"\xa6submit"]) + b"\xa3req\xa1\xc3"]
    if kind == 5:  # valid msgpack of the wrong shape
        return [msgspec.msgpack.encode(_value(rng))]
    return [_hostile_command(rng)]
