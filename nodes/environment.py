"""The environment an attempt ran in, recorded in JobStarted for reproducibility audits."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from evo.content import git_output
from evo.events.schema import JobSpec

KEY_PACKAGES = ("evo", "numpy", "scikit-learn", "xgboost", "torch", "pandas", "msgspec", "pyzmq")


@lru_cache(maxsize=1)
def _packages() -> dict[str, str]:
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


_GIT_TTL_S = 5.0
_git_cache: dict[str, tuple[float, dict]] = {}


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the repository holding ``path``, or {} outside a repo.

    Two git calls cost milliseconds, more than a short trial, so the answer is reused for a few
    seconds per directory: a commit made within that window is seen by the next jobs after it.
    """
    key = str(path)
    now = time.monotonic()
    hit = _git_cache.get(key)
    if hit is not None and now - hit[0] < _GIT_TTL_S:
        return hit[1]
    state = _git_state(path)
    _git_cache[key] = (now, state)
    return state


def _git_state(path: Path) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {}


# What counts as a job's source, and how much of it is hashed (a folder of data is not code).
SOURCE_SUFFIXES = frozenset({".py", ".pyx", ".ipynb", ".r", ".jl", ".sh", ".m", ".lua", ".c",
                             ".cc", ".cpp", ".h", ".yaml", ".yml", ".toml", ".cfg", ".ini",
                             ".json"})
SKIP_DIRS = frozenset({".git", ".evo", ".evo-demo", ".venv", "venv", "env", "__pycache__",
                       "node_modules", ".mypy_cache", ".pytest_cache", ".tox", "build", "dist"})
MAX_FILES, MAX_BYTES = 2000, 32 << 20


def _run_git(path: Path, *args: str) -> bytes | None:
    return git_output(path, *args, timeout_s=10)


def _hash_files(root: Path, names: list[str], h) -> tuple[int, bool]:  # noqa: ANN001
    """Hash ``names`` (relative to ``root``, sorted) into ``h``; (files hashed, cut short)."""
    n = size = 0
    for name in sorted(names):
        path = root / name
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if n >= MAX_FILES or size + len(data) > MAX_BYTES:
            return n, True
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        n, size = n + 1, size + len(data)
    return n, False


def code_fingerprint(workdir: str | Path) -> dict[str, str]:
    """What code a job submitted from ``workdir`` runs, for the record (JobSubmitted) and for
    ``evo audit``: in a git tree, its commit and a sha256 of what differs from it (the diff of
    tracked files and the untracked source files); elsewhere a sha256 of the folder's source
    files. Bounded (MAX_FILES, MAX_BYTES; ``truncated`` says when the bound was hit)."""
    root = Path(workdir)
    h = hashlib.sha256()
    commit = _run_git(root, "rev-parse", "HEAD")
    if commit is not None:
        top = Path((_run_git(root, "rev-parse", "--show-toplevel") or b".").decode().strip())
        diff = _run_git(root, "diff", "HEAD", "--binary") or b""
        h.update(diff)
        untracked = (_run_git(root, "ls-files", "--others", "--exclude-standard", "-z") or b"")
        names = [n for n in untracked.decode(errors="replace").split("\0")
                 if n and Path(n).suffix.lower() in SOURCE_SUFFIXES]
        n, cut = _hash_files(top, names, h)
        out = {"git_commit": commit.decode().strip(), "changes_sha256": h.hexdigest()
               if diff or n else ""}
    else:
        names = []
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
            rel = Path(dirpath).relative_to(root)
            names += [str(rel / f) for f in files if Path(f).suffix.lower() in SOURCE_SUFFIXES]
            if len(names) > 4 * MAX_FILES:
                break
        n, cut = _hash_files(root, names, h)
        out = {"files_sha256": h.hexdigest(), "files": str(n)}
    if cut:
        out["truncated"] = f"over {MAX_FILES} files or {MAX_BYTES >> 20} MiB: hashed the first"
    return out


def code_changes(recorded: dict[str, str], now: dict[str, str]) -> str:
    """How the code a job recorded differs from ``now`` ("" when it does not)."""
    if recorded == now:
        return ""
    if recorded.get("git_commit") != now.get("git_commit"):
        return (f"git commit {recorded.get('git_commit', 'none')[:12]} -> "
                f"{now.get('git_commit', 'none')[:12]}")
    if "git_commit" in recorded:
        return "uncommitted changes differ from those when it was submitted"
    return "the folder's source files differ"


@lru_cache(maxsize=1)
def _platform() -> str:
    return platform.platform()


def fingerprint(spec: JobSpec, workdir: Path) -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable,
           "platform": _platform(), "packages": _packages(), "seed": spec.seed,
           "data": dict(spec.data)}
    code_dir = Path(spec.workdir) if spec.workdir else Path.cwd()
    git = git_state(code_dir)
    if git:
        env["git"] = git
    return env
