"""Trial functions the benches run both through evo and through the baselines."""

from __future__ import annotations

import time


def spin(ms: float = 20.0, seed: int = 0) -> dict:
    """Busy the CPU for about ``ms`` milliseconds (a short trial), return a score."""
    end = time.process_time() + ms / 1000.0
    x = seed
    while time.process_time() < end:
        for _ in range(1000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return {"score": x / 0x7FFFFFFF}
