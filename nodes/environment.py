"""The environment an attempt ran in, recorded in JobStarted for reproducibility audits."""

from __future__ import annotations

import platform
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
    commit = git_output(path, "rev-parse", "HEAD", timeout_s=5)
    if commit is None:
        return {}
    dirty = git_output(path, "status", "--porcelain", "--untracked-files=no", timeout_s=5)
    return {"commit": commit.decode().strip(), "dirty": bool((dirty or b"").strip())}


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
