"""Pure timing rules: retry backoff and node liveness. Units are seconds; time is passed in."""

from __future__ import annotations

MISSED_HEARTBEATS = 3


def compute_backoff(attempt: int, *, base_s: float = 1.0, factor: float = 2.0,
                    max_s: float = 60.0) -> float:
    """Delay before retry number ``attempt + 1`` after attempt ``attempt`` (1-based) failed:
    base, 2x base, 4x base, ... capped at ``max_s``. Deterministic (no jitter) so a replayed
    log and a re-run agree; a handful of machines do not need thundering-herd protection."""
    return min(max_s, base_s * factor ** max(attempt - 1, 0))


def lost_after(last_seen: float, heartbeat_s: float) -> float:
    """When a node last seen at ``last_seen`` will have missed MISSED_HEARTBEATS heartbeats."""
    return last_seen + MISSED_HEARTBEATS * heartbeat_s


def is_lost(last_seen: float, now: float, heartbeat_s: float) -> bool:
    """A node is lost once it has missed MISSED_HEARTBEATS heartbeats."""
    return now > lost_after(last_seen, heartbeat_s)
