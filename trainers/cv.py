"""Walk-forward cross-validation by season.

For each test season s the model trains on seasons < s only and forecasts s. The forecasts the
earlier folds made (each out of sample) are what a calibrator for season s is fitted on: no
extra model fits, and nothing from season s or later reaches the calibrator.

The first ``min_train`` seasons are training only. The next ``warmup`` folds produce forecasts
that calibrate later folds but are not scored, so that every variant (uncalibrated, Platt,
isotonic) is scored on the same seasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fold:
    season: int
    train: np.ndarray  # row indices of seasons < season
    test: np.ndarray  # row indices of this season
    scored: bool  # False for warm-up folds


def walk_forward(seasons: np.ndarray, min_train: int = 4, warmup: int = 2,
                 last: int | None = None) -> Iterator[Fold]:
    """Folds in season order. ``last`` keeps only the last N scored seasons (warm-up included
    before them), for quicker runs."""
    seasons = np.asarray(seasons)
    years = np.unique(seasons)
    if len(years) < min_train + warmup + 1:
        raise ValueError(f"walk-forward needs at least {min_train + warmup + 1} seasons "
                         f"(min_train={min_train}, warmup={warmup}); the data has {len(years)}")
    tests = years[min_train:]
    first_scored = min_train + warmup
    if last is not None and last > 0:
        first_scored = max(first_scored, len(years) - last)
        tests = years[first_scored - warmup:]
    for s in tests:
        idx = np.flatnonzero(seasons == s)
        train = np.flatnonzero(seasons < s)
        yield Fold(int(s), train, idx, scored=bool(s >= years[first_scored]))
