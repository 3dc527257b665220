"""Names that may become paths: checkpoint paths, artifact names (and what the next parts store).

One rule, used at submit, by the node and by the broker: a name is relative, names something
inside its folder (no ``..`` part, not absolute), and holds no NUL byte (the OS would cut it
there, or refuse it). Symlinks are the node's to check, since only it sees the files.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath


def nul_error(value: str, where: str) -> str | None:
    """Why ``value`` cannot be an argument or a name (a NUL byte), or None."""
    if "\x00" in value:
        return f"{where}: a NUL byte at position {value.index(chr(0))}"
    return None


def relative_error(name: str, where: str) -> str | None:
    """Why ``name`` cannot name a file inside its folder, or None."""
    if not name:
        return f"{where}: an empty name"
    bad = nul_error(name, where)
    if bad:
        return bad
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute():
        return f"{where}: {name!r} is absolute; give a path inside the folder"
    if ".." in path.parts:
        return f"{where}: {name!r} climbs out of its folder (..)"
    return None


def inside(folder: str | os.PathLike[str], name: str) -> str | None:
    """``name`` as a path relative to ``folder`` once symlinks are followed (an absolute name
    inside ``folder`` is made relative), or None when it leads outside."""
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, name))
    if target != root and not target.startswith(root + os.sep):
        return None
    return os.path.relpath(target, root)
