"""One experiment: a model, a calibration method and a dataset, validated walk-forward.

This is what a built-in trainer job runs (in a warm worker, or in-process for ``evo audit``).
Each scored season is reported as it finishes (``evo.report(step=season, ...)``: AUC, Brier,
log loss and ROI over the seasons scored so far, and the season's own ``season_auc``), and the
returned dict becomes the JobCompleted: overall metrics over every scored season as numbers,
and as artifacts the per-season table, the ROC curve, the calibration bins and the data
fingerprint, which is all ``evo report`` needs, so nothing has to be fetched from the node.
"""

from __future__ import annotations

import json
import os
import time

import msgspec
import numpy as np

from evo.errors import BadInput
from evo.job import report

from .calibration import Calibrator
from .cv import walk_forward
from .data import load
from .metrics import all_metrics, calibration_bins, roc_points
from .models import FIT, PARAMS, Common


def parse_params(trainer: str, params: dict) -> Common:
    cls = PARAMS.get(trainer)
    if cls is None:
        raise BadInput(f"unknown trainer {trainer!r} (known: {', '.join(PARAMS)})")
    try:
        return msgspec.convert(params, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{trainer} params: {exc}") from None


def job_seed(seed: int | None = None) -> int:
    if seed is not None:
        return int(seed)
    return int(os.environ.get("EVO_SEED", "0"))


def run(trainer: str, seed: int | None = None, **params) -> dict:
    p = parse_params(trainer, params)
    seed = job_seed(seed)
    t0 = time.perf_counter()
    ds = load(p.data, rows=p.rows, data_seed=p.data_seed, target=p.target, odds=p.odds)
    feats = ds.features(p.target, p.odds)
    X = np.column_stack([ds.columns[f] for f in feats]).astype(float)
    y = ds.columns[p.target].astype(float)
    oh, oa = (ds.columns[c].astype(float) for c in p.odds)
    seasons = ds.columns["season"].astype(int)
    fit = FIT[trainer]
    oos = np.full(len(y), np.nan)  # raw out-of-sample forecasts of earlier folds
    final = np.full(len(y), np.nan)  # calibrated forecasts of scored folds
    per_season: list[dict] = []
    device = "cpu"
    try:
        folds = list(walk_forward(seasons, p.min_train, p.warmup, p.last))
    except ValueError as exc:
        raise BadInput(f"{ds.source}: {exc}") from None
    for fold in folds:
        Xtr = X[fold.train]
        means = np.nanmean(Xtr, axis=0)
        Xtr = np.where(np.isnan(Xtr), means, Xtr)
        Xte = np.where(np.isnan(X[fold.test]), means, X[fold.test])
        predict, device = fit(p, Xtr, y[fold.train], seed, p.device)
        raw = predict(Xte)
        if fold.scored:
            seen = np.flatnonzero(~np.isnan(oos))  # earlier folds only: never this season
            cal = Calibrator(p.calibration).fit(oos[seen], y[seen])
            final[fold.test] = cal.transform(raw)
            m = all_metrics(y[fold.test], final[fold.test], oh[fold.test], oa[fold.test], p.edge)
            per_season.append({"season": fold.season, **m})
            # the metrics over every season scored so far, as the final ones are over all of
            # them (the last report's are the final values): a learning sweep's pruner and
            # the curves compare these; the season's own AUC comes along
            sofar = np.flatnonzero(~np.isnan(final))
            pooled = all_metrics(y[sofar], final[sofar], oh[sofar], oa[sofar], p.edge)
            per = {k: pooled[k] for k in ("auc", "brier", "logloss", "roi")}
            report(step=fold.season, season_auc=m["auc"], **per)  # type: ignore[arg-type]
        oos[fold.test] = raw
    scored = np.flatnonzero(~np.isnan(final))
    overall = all_metrics(y[scored], final[scored], oh[scored], oa[scored], p.edge)
    out: dict = {k: overall[k] for k in ("auc", "brier", "logloss", "roi", "bets", "profit")}
    out["n_test"] = overall["n"]
    out["seasons"] = float(len(per_season))
    out["train_s"] = round(time.perf_counter() - t0, 3)
    out["trainer"] = trainer
    out["calibration"] = p.calibration
    out["device"] = device
    out["data_sha256"] = ds.sha256
    out["data_source"] = ds.source
    out["per_season"] = json.dumps(per_season)
    out["roc"] = json.dumps(roc_points(y[scored], final[scored]))
    out["calibration_bins"] = json.dumps(calibration_bins(y[scored], final[scored]))
    return out


def glm(**params) -> dict:
    return run("GLM", **params)


def random_forest(**params) -> dict:
    return run("RandomForest", **params)


def xgboost(**params) -> dict:
    return run("XGBoost", **params)


def mlp(**params) -> dict:
    return run("MLP", **params)
