"""Built-in trainers: metrics against scikit-learn, calibration, walk-forward, determinism."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from evo.errors import BadInput
from evo.trainers import calibration, cv, data, experiment, metrics


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    for n in (7, 200, 5000):
        y = (rng.random(n) < 0.55).astype(float)
        p = np.clip(rng.random(n) * 0.6 + 0.2 * y, 0.001, 0.999)
        p[: n // 3] = np.round(p[: n // 3], 1)  # ties
        assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert metrics.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        assert metrics.logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)


def test_roi_bets_only_past_the_edge_and_counts_profit():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.70, 0.70, 0.50, 0.20])
    oh = np.array([2.0, 2.0, 1.9, 1.5])
    oa = np.array([2.0, 2.0, 2.1, 3.0])
    # ev home: 0.4, 0.4, -0.05, -0.7; ev away: -0.4, -0.4, 0.05, 1.4
    r, bets, profit = metrics.roi(y, p, oh, oa, edge=0.1)
    # bets: game 0 home (won +1), game 1 home (lost -1), game 3 away (won +2); game 2 skipped
    assert bets == 3 and profit == pytest.approx(2.0) and r == pytest.approx(2.0 / 3)
    assert metrics.roi(y, p, oh, oa, edge=5.0) == (0.0, 0, 0.0)


def test_calibration_lowers_the_brier_score_of_a_miscalibrated_model():
    rng = np.random.default_rng(11)
    n = 6000
    p_true = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p_true).astype(float)
    logit = np.log(p_true / (1 - p_true))
    p_bad = 1 / (1 + np.exp(-(2.5 * logit + 0.8)))  # overconfident and shifted
    fit, test = slice(0, n // 2), slice(n // 2, n)
    before = metrics.brier(y[test], p_bad[test])
    for method in ("platt", "isotonic"):
        cal = calibration.Calibrator(method).fit(p_bad[fit], y[fit])
        after = metrics.brier(y[test], cal.transform(p_bad[test]))
        assert after < before - 0.01, (method, before, after)
    none = calibration.Calibrator("none").fit(p_bad[fit], y[fit])
    assert np.array_equal(none.transform(p_bad[test]), p_bad[test])
    with pytest.raises(ValueError, match="expected one of none, platt, isotonic"):
        calibration.Calibrator("beta")


def test_walk_forward_never_trains_on_the_test_season():
    seasons = np.repeat(np.arange(2003, 2025), 10)
    rng = np.random.default_rng(0)
    seasons = seasons[rng.permutation(len(seasons))]  # order in the file must not matter
    folds = list(cv.walk_forward(seasons, min_train=4, warmup=2))
    assert [f.season for f in folds] == list(range(2007, 2025))
    assert [f.season for f in folds if f.scored] == list(range(2009, 2025))
    for f in folds:
        assert (seasons[f.train] < f.season).all()
        assert (seasons[f.test] == f.season).all()
        assert len(f.train) == 10 * (f.season - 2003)
    last = list(cv.walk_forward(seasons, min_train=4, warmup=2, last=3))
    assert [f.season for f in last if f.scored] == [2022, 2023, 2024]
    assert [f.season for f in last if not f.scored] == [2020, 2021]
    with pytest.raises(ValueError, match="at least 7 seasons"):
        list(cv.walk_forward(np.arange(2000, 2005), min_train=4, warmup=2))


def test_calibrators_see_only_forecasts_of_earlier_seasons(monkeypatch):
    ds = data.load("games", rows=1500)
    seasons = ds.columns["season"]
    seen: list[int] = []
    real = experiment.Calibrator

    class Spy(real):
        def fit(self, p, y):
            seen.append(len(p))
            return super().fit(p, y)

    monkeypatch.setattr(experiment, "Calibrator", Spy)
    out = experiment.run("GLM", seed=1, rows=1500, calibration="platt", last=4)
    scored = [s["season"] for s in __import__("json").loads(out["per_season"])]
    assert scored == [2021, 2022, 2023, 2024]
    # fitted on the out-of-sample forecasts of the folds before each scored season
    expected = [int(((seasons >= 2019) & (seasons < s)).sum()) for s in scored]
    assert seen == expected


def test_the_same_seed_gives_the_same_metrics_bit_for_bit():
    trainers = ["GLM", "RandomForest", "XGBoost"]
    if importlib.util.find_spec("torch") is not None:
        trainers.append("MLP")
    for t in trainers:
        kw = dict(rows=1500, last=3, calibration="isotonic", n_estimators=30) \
            if t in ("RandomForest", "XGBoost") else dict(rows=1500, last=3, calibration="isotonic")
        if t == "MLP":
            kw["epochs"] = 5
        a = experiment.run(t, seed=5, **kw)
        b = experiment.run(t, seed=5, **kw)
        nums = {k: v for k, v in a.items() if isinstance(v, float) and k != "train_s"}
        assert nums == {k: b[k] for k in nums}, t
        assert a["per_season"] == b["per_season"] and a["roc"] == b["roc"]
    # and a different seed changes a seeded model
    c = experiment.run("XGBoost", seed=6, rows=1500, last=3, n_estimators=30, subsample=0.7)
    d = experiment.run("XGBoost", seed=5, rows=1500, last=3, n_estimators=30, subsample=0.7)
    assert c["auc"] != d["auc"]


def test_games_data_is_deterministic_and_a_csv_round_trips(tmp_path):
    a, b = data.games(rows=800, seed=9), data.games(rows=800, seed=9)
    assert data.to_csv(a) == data.to_csv(b)
    assert data.to_csv(data.games(rows=800, seed=10)) != data.to_csv(a)
    assert sorted(set(a["season"].tolist())) == list(range(2003, 2025))
    assert ((a["odds_home"] > 1) & (a["odds_away"] > 1)).all()
    # the bookmaker's margin: implied probabilities sum to more than 1
    assert (1 / a["odds_home"] + 1 / a["odds_away"] > 1.0).all()
    f = tmp_path / "games.csv"
    f.write_bytes(data.to_csv(a))
    ds = data.load(str(f))
    assert ds.sha256 == data.sha256_file(f) and ds.rows == 800
    assert "elo_diff" in ds.features() and "odds_home" not in ds.features()
    out = experiment.run("GLM", seed=1, data=str(f), last=2)
    assert out["data_sha256"] == ds.sha256


def test_bad_data_and_params_are_named(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("season,home_win,odds_home\n2003,1,1.9\n")
    with pytest.raises(BadInput, match=r"bad.csv: missing column\(s\) odds_away"):
        data.load(str(f))
    f.write_text("season,home_win,odds_home,odds_away\n2003,yes,1.9,2.0\n")
    with pytest.raises(BadInput, match=r"bad.csv:2: column home_win: expected a number, got 'yes'"):
        data.load(str(f))
    with pytest.raises(BadInput, match="no such file"):
        data.load(str(tmp_path / "nope.csv"))
    with pytest.raises(BadInput, match=r"XGBoost params: Expected `int`, got `str` - at `\$.max_depth`"):
        experiment.run("XGBoost", max_depth="deep")
    with pytest.raises(BadInput, match="unknown trainer 'SVM'"):
        experiment.run("SVM")
