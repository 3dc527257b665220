"""The code's shape: imports static tools can follow, and dependencies that point one way."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FOLDERS = ("events", "broker", "nodes", "projections", "sweeps", "trainers", "cli", "configs")


def _imports_at_module_level() -> dict[str, set[str]]:
    """evo's parts (a subpackage, or a module of evo/) -> the parts their modules import when
    loaded (imports inside functions are deferred on purpose, and not counted)."""
    files = [(f"evo.{f.stem}", f) for f in (ROOT / "evo").glob("*.py") if f.stem != "__init__"]
    files += [(f"evo.{d}", f) for d in FOLDERS for f in (ROOT / d).rglob("*.py")]
    out: dict[str, set[str]] = {}
    for part, f in files:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                target = node.module
            elif isinstance(node, ast.Import):
                target = node.names[0].name
            else:
                continue
            if target.startswith("evo."):
                other = ".".join(target.split(".")[:2])
                if other != part:
                    out.setdefault(part, set()).add(other)
    return out


def test_every_top_level_folder_is_linked_into_the_package():
    for d in FOLDERS:
        link = ROOT / "evo" / d
        assert link.is_symlink() and link.resolve() == (ROOT / d).resolve(), d


def test_the_parts_import_each_other_one_way():
    deps = _imports_at_module_level()

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        for n in deps.get(a, ()):
            if n == b or (n not in seen and (seen.add(n) or reaches(n, b, seen))):
                return True
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in deps for b in deps[a] if reaches(b, a, set())})
    assert cycles == [], cycles
    assert "evo.cli" not in {d for ds in deps.values() for d in ds}  # nothing depends on the CLI
    assert deps.get("evo.projections", set()) <= {"evo.direction", "evo.errors", "evo.events"}
