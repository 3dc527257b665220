"""The environment an attempt ran in, recorded in JobStarted for reproducibility audits."""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

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


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the repository holding ``path``, or {} outside a repo."""
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


def fingerprint(spec: JobSpec, workdir: Path) -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable,
           "platform": platform.platform(), "packages": _packages(), "seed": spec.seed,
           "data": dict(spec.data)}
    code_dir = Path(spec.workdir) if spec.workdir else Path.cwd()
    git = git_state(code_dir)
    if git:
        env["git"] = git
    return env
