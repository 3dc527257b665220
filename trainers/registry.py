"""Built-in trainers by name: ``evo submit --trainer NAME`` resolves here to a callable."""

from __future__ import annotations

from evo.errors import BadInput

# name -> "module:function", run in a warm worker on the node.
TRAINERS: dict[str, str] = {}


def resolve_trainer(name: str) -> str:
    try:
        return TRAINERS[name]
    except KeyError:
        known = ", ".join(sorted(TRAINERS)) or "none in this version"
        raise BadInput(f"--trainer {name!r}: unknown trainer (known: {known})") from None
