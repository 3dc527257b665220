"""Metrics of probability forecasts: AUC, Brier, log loss, betting ROI; curves for plots.

Pure numpy, so they are exact and cheap; tests check them against scikit-learn.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with ties counted half."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    y = np.asarray(y, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def roi(y: np.ndarray, p: np.ndarray, odds_home: np.ndarray, odds_away: np.ndarray,
        edge: float = 0.02) -> tuple[float, int, float]:
    """Flat one-unit stakes on the side whose expected value beats ``edge``.

    Expected value of a unit bet on home is p * odds_home - 1 (on away: (1 - p) * odds_away - 1);
    a game gets at most one bet, on the better side. Returns (profit / staked, bets, profit);
    ROI is 0 with no bets.
    """
    y = np.asarray(y, float)
    p = np.asarray(p, float)
    ev_home = p * odds_home - 1.0
    ev_away = (1.0 - p) * odds_away - 1.0
    home = (ev_home > edge) & (ev_home >= ev_away)
    away = (ev_away > edge) & ~home
    profit = np.where(home, np.where(y == 1, odds_home - 1.0, -1.0), 0.0).sum() \
        + np.where(away, np.where(y == 0, odds_away - 1.0, -1.0), 0.0).sum()
    bets = int(home.sum() + away.sum())
    return (float(profit / bets) if bets else 0.0), bets, float(profit)


def all_metrics(y, p, odds_home, odds_away, edge: float = 0.02) -> dict[str, float]:
    r, bets, profit = roi(y, p, odds_home, odds_away, edge)
    return {"auc": auc(y, p), "brier": brier(y, p), "logloss": logloss(y, p), "roi": r,
            "bets": float(bets), "profit": profit, "n": float(len(y))}


def roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 101) -> dict[str, list[float]]:
    """The ROC curve thinned to at most ``max_points`` points (enough to plot, small to store)."""
    y = np.asarray(y, float)
    order = np.argsort(-np.asarray(p, float), kind="mergesort")
    ys = y[order]
    tps = np.concatenate([[0.0], np.cumsum(ys)])
    fps = np.concatenate([[0.0], np.cumsum(1 - ys)])
    tpr = tps / max(tps[-1], 1.0)
    fpr = fps / max(fps[-1], 1.0)
    idx = np.unique(np.linspace(0, len(tpr) - 1, min(max_points, len(tpr))).round().astype(int))
    return {"fpr": [round(float(v), 5) for v in fpr[idx]],
            "tpr": [round(float(v), 5) for v in tpr[idx]]}


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Mean forecast, observed frequency and count per equal-width probability bin."""
    y = np.asarray(y, float)
    p = np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    mean_p, freq, count = [], [], []
    for b in range(bins):
        m = which == b
        if m.any():
            mean_p.append(round(float(p[m].mean()), 5))
            freq.append(round(float(y[m].mean()), 5))
            count.append(float(m.sum()))
    return {"mean_p": mean_p, "freq": freq, "count": count}
