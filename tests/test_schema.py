"""Schema evolution: a log written by schema v1 (checked in) must always decode and fold.

Rules (docs/events.md): fields only appended, new fields have defaults, types and tags never
change. The manifest in fixtures/schema_v1.json is what v1 looked like.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import msgspec
import pytest

from evo.broker.state import fold
from evo.events import schema as S
from evo.events.codec import EventDecodeError, decode, encode
from evo.events.log import SegmentLog

FIX = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "schema_v1.json").read_text())
CURRENT = {cls.__struct_config__.tag: cls for cls in S.AnyEvent.__args__}
STRUCTS = {"struct:" + c.__name__: c for c in (S.JobSpec, S.Resources, S.GpuInfo, S.GpuSample)}


def test_v1_log_decodes_and_folds(tmp_path):
    shutil.copytree(FIX / "v1_log", tmp_path / "log")
    with SegmentLog(tmp_path / "log", readonly=True) as lg:
        events = list(lg.read_from(1))
    expected = json.loads((FIX / "v1_events.json").read_text())
    assert len(events) == len(expected) == 23
    for ev, exp in zip(events, expected):
        got = msgspec.to_builtins(ev)
        for field, value in exp.items():  # every v1 field reads back as written
            assert _within(value, got[field]), (ev.seq, field)
    state = fold(events)
    assert state.jobs["j3"].state == "completed"
    assert state.jobs["j18"].state == "cancelled"
    assert state.keys == {"k-1": "j3"}


def _within(old, new) -> bool:  # noqa: ANN001
    """``new`` holds ``old``: nested structs may have grown fields (with defaults) since v1."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _within(v, new[k]) for k, v in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_within(o, n) for o, n in zip(old, new))
    return old == new


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_schema_only_grows(name):
    cls = CURRENT.get(name) or STRUCTS.get(name)
    assert cls is not None, f"{name} was removed or its tag changed"
    hints = typing.get_type_hints(cls)
    old = MANIFEST[name]
    for field, typ in old.items():
        assert field in cls.__struct_fields__, f"{name}.{field} was removed or renamed"
        assert str(hints[field]) == typ, f"{name}.{field} changed type: {typ} -> {hints[field]}"
    fields = cls.__struct_fields__
    # events are msgpack maps, so position is not the contract; relative order still is kept
    assert [f for f in fields if f in old] == list(old), f"{name}: fields were reordered"
    n_defaults = len(cls.__struct_defaults__)
    required = fields[: len(fields) - n_defaults]
    for field in fields:
        if field not in old:
            assert field not in required, f"{name}.{field} is new and has no default"


def test_every_event_type_is_in_the_union_with_its_class_name_as_tag():
    for tag, cls in CURRENT.items():
        assert tag == cls.__name__


def test_unknown_event_type_fails_loudly():
    raw = msgspec.msgpack.encode({"type": "JobTeleported", "seq": 1, "job_id": "j1"})
    with pytest.raises(EventDecodeError, match="JobTeleported"):
        decode(raw, where="test")


def test_round_trip_of_every_fixture_event():
    with SegmentLog(FIX / "v1_log", readonly=True) as lg:
        for ev in lg.read_from(1):
            assert decode(encode(ev)) == ev
