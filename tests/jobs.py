"""Callables that tests submit as jobs (nodes import them through PYTHONPATH)."""

import evo


def square(x: float, steps: int = 2) -> dict:
    for s in range(1, steps + 1):
        evo.report(step=s, partial=x * s)
    return {"y": x * x, "model": "square.json"}


def whoami(tag: str = "") -> dict:
    import os

    print(f"running {tag} in {os.getpid()}")
    return {"pid": os.getpid(), "cwd": os.getcwd(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def crash_once(flag: str) -> dict:
    """Dies by SIGKILL on the first attempt (the flag file remembers), succeeds after."""
    import os
    import pathlib
    import signal

    p = pathlib.Path(flag)
    if not p.exists():
        p.write_text("crashed")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"ok": 1}


def boom() -> None:
    raise ValueError("bad hyperparameter: depth=-1")


def chatty(lines: int = 3, delay: float = 0.0) -> dict:
    import sys
    import time

    for i in range(lines):
        print(f"line {i}", flush=True)
        print(f"warn {i}", file=sys.stderr, flush=True)
        time.sleep(delay)
    return {"lines": lines}


def keep(text: str) -> dict:
    """Writes into its checkpoint folder, which evo makes on first use."""
    import evo

    path = evo.checkpoint_dir() / "state.txt"
    path.write_text(text)
    return {"path": str(path)}


def huge(mb: int = 20) -> dict:
    """A result far over what one event may hold."""
    return {"blob": "x" * (mb << 20)}


def devices() -> dict:
    """What devices a warm worker's task sees, as a string artifact."""
    import json
    import os

    return {"seen": json.dumps([os.environ.get("CUDA_VISIBLE_DEVICES"),
                                os.environ.get("CUDA_DEVICE_ORDER")])}
