"""Callables that tests submit as jobs (nodes import them through PYTHONPATH)."""

import evo


def square(x: float, steps: int = 2) -> dict:
    for s in range(1, steps + 1):
        evo.report(step=s, partial=x * s)
    return {"y": x * x, "model": "square.json"}
