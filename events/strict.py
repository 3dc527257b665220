"""What an event must be before it is appended: the schema, with every number in range.

The catalogue (schema.py) is what old logs decode against, so its types stay as they were
written: a float field takes NaN and a 64-bit unsigned int, because a log written before this
check may hold one and must still replay. What the broker *appends* obeys a stricter mirror of
the same catalogue, made here mechanically from it, so the rule is written once:

  * every float is finite (NaN and infinities are refused: JSON, which the projections read,
    has no way to write them, and a NaN metric cannot be ranked);
  * every int fits in 64 signed bits (the projections' BIGINT);
  * free-form values (``Any``: params, an environment, a sweep's spec) are JSON values: maps
    with string keys, lists, strings, booleans, null, finite numbers, 64-bit ints
    (``json_value_error``): what msgpack takes beyond that (bytes, extension types, None or
    list keys) would either stop the projections or reach them changed.

``Finite`` and ``Int64`` are also the wire protocol's number types, so a peer's bad number is
refused by the decoder that reads the command, with the field's path.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta

MAX_FLOAT = sys.float_info.max
Finite = Annotated[float, Meta(ge=-MAX_FLOAT, le=MAX_FLOAT, description="a finite number")]
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


def is_finite(value: object) -> bool:
    """The rule for one metric value: a real number (not a bool) that is neither NaN nor inf."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def friendly(message: str) -> str:
    """msgspec's wording of the Finite bounds, said the way a user would."""
    for bound in (f">= {-MAX_FLOAT!r}", f"<= {MAX_FLOAT!r}"):
        message = message.replace(f"`float` {bound}", "a finite number")
    return message


def _mirror(tp: Any, made: dict[type, type]) -> Any:
    """``tp`` with float -> Finite and int -> Int64, through lists, dicts, unions and Structs."""
    if tp is float:
        return Finite
    if tp is int:
        return Int64
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _strict_struct(tp, made)
    origin = typing.get_origin(tp)
    if origin is None:
        return tp  # str, bool, bytes, Any, None
    args = tuple(_mirror(a, made) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return Union[args]  # type: ignore[valid-type]
    if origin is Annotated:
        return tp
    return origin[args] if len(args) > 1 else origin[args[0]]


def _strict_struct(cls: type, made: dict[type, type]) -> type:
    if cls in made:
        return made[cls]
    fields = []
    for f in msgspec.structs.fields(cls):
        default = f.default
        if f.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=f.default_factory)
        tp = _mirror(f.type, made)
        fields.append((f.name, tp) if default is msgspec.NODEFAULT else (f.name, tp, default))
    cfg = cls.__struct_config__  # type: ignore[attr-defined] # a Struct class
    kw: dict[str, Any] = {"kw_only": True, "frozen": True,
                          "forbid_unknown_fields": cfg.forbid_unknown_fields}
    if cfg.tag is not None:
        kw.update(tag=cfg.tag, tag_field=cfg.tag_field)
    strict = msgspec.defstruct(f"Strict{cls.__name__}", fields, **kw)
    made[cls] = strict
    return strict


def json_value_error(value: Any, where: str) -> str | None:
    """Why ``value`` is not a JSON value (the path of the first offender), or None."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if not -(2**63) <= v < 2**63:
                return f"{at}: {v} does not fit in 64 bits"
        elif t is float:
            if not math.isfinite(v):
                return f"{at}: expected a finite number, got {v}"
        elif t is dict:
            for k, x in v.items():
                if type(k) is not str:
                    return f"{at}: a key of type {type(k).__name__} ({k!r}); keys are strings"
                stack.append((x, f"{at}.{k}"))
        elif t is list or t is tuple:
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
        else:
            return f"{at}: a {t.__name__} is not a JSON value"
    return None


def _has_any(tp: Any) -> bool:
    return tp is Any or any(_has_any(a) for a in typing.get_args(tp))


def free_form(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The attribute paths of ``cls`` (through nested Structs) whose type holds ``Any``."""
    out = []
    for f in msgspec.structs.fields(cls):
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            out += free_form(f.type, (*prefix, f.name))
        elif _has_any(f.type):
            out.append((*prefix, f.name))
    return out


def strict_union(union: Any) -> Any:
    """The strict mirror of a tagged union of Structs (see the module's rules)."""
    made: dict[type, type] = {}
    return Union[tuple(_strict_struct(c, made) for c in typing.get_args(union))]  # type: ignore[valid-type]
