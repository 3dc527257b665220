"""The built-in models and their hyperparameters.

Each trainer has a msgspec Struct of its parameters (types, bounds, defaults): a sweep spec is
checked against it before anything is submitted, and the job checks its params again when it
starts. ``fit(params, X, y, seed, device)`` returns a function from features to P(target = 1).
Every model is seeded and single-threaded by default, so the same data and seed give the same
forecasts bit for bit on a CPU, whatever else the machine is running.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
import numpy as np

from evo.job import stop_if_asked

Prob = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Pos = Annotated[float, msgspec.Meta(gt=0.0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Predict = Callable[[np.ndarray], np.ndarray]


class Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Parameters every built-in trainer takes: data, validation, calibration, betting."""

    data: str = "games"  # `games` (synthetic) or a CSV path
    rows: PosInt = 5000  # synthetic data only
    data_seed: int = 2024  # synthetic data only
    target: str = "home_win"
    odds: tuple[str, str] = ("odds_home", "odds_away")
    calibration: Literal["none", "platt", "isotonic"] = "none"
    min_train: PosInt = 4  # seasons used only for training before the first test season
    warmup: Annotated[int, msgspec.Meta(ge=1)] = 2  # folds that calibrate but are not scored
    last: int | None = None  # score only the last N seasons (quicker runs)
    edge: float = 0.05  # expected value a bet needs, per unit staked
    nthread: PosInt = 1
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class GLM(Common):
    C: Pos = 1.0  # inverse L2 strength


class RandomForest(Common):
    n_estimators: PosInt = 200
    max_depth: PosInt | None = 8
    min_samples_leaf: PosInt = 5
    max_features: Prob | Literal["sqrt", "log2"] = "sqrt"


class XGBoost(Common):
    max_depth: PosInt = 5
    learning_rate: Pos = 0.05
    n_estimators: PosInt = 300
    subsample: Prob = 0.8
    colsample_bytree: Prob = 0.8
    min_child_weight: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    reg_lambda: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0


class MLP(Common):
    hidden: list[PosInt] = msgspec.field(default_factory=lambda: [32, 16])
    epochs: PosInt = 30
    lr: Pos = 0.01
    batch_size: PosInt = 256
    weight_decay: Annotated[float, msgspec.Meta(ge=0.0)] = 1e-4


PARAMS: dict[str, type[Common]] = {"GLM": GLM, "RandomForest": RandomForest,
                                   "XGBoost": XGBoost, "MLP": MLP}


def gpu_given() -> bool:
    """Whether evo gave this job a GPU (CPU jobs get an empty CUDA_VISIBLE_DEVICES)."""
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())


def _standardize(X: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    return lambda Z: (Z - mu) / sd


def fit_glm(p: GLM, X, y, seed: int, device: str) -> tuple[Predict, str]:
    from sklearn.linear_model import LogisticRegression

    scale = _standardize(X)
    m = LogisticRegression(C=p.C, max_iter=2000, random_state=seed).fit(scale(X), y)
    return (lambda Z: m.predict_proba(scale(Z))[:, 1]), "cpu"


def fit_rf(p: RandomForest, X, y, seed: int, device: str) -> tuple[Predict, str]:
    from sklearn.ensemble import RandomForestClassifier

    m = RandomForestClassifier(n_estimators=p.n_estimators, max_depth=p.max_depth,
                               min_samples_leaf=p.min_samples_leaf, max_features=p.max_features,
                               random_state=seed, n_jobs=p.nthread).fit(X, y)
    return (lambda Z: m.predict_proba(Z)[:, 1]), "cpu"


def fit_xgb(p: XGBoost, X, y, seed: int, device: str) -> tuple[Predict, str]:
    import xgboost as xgb

    dev = "cuda" if device == "cuda" or (device == "auto" and gpu_given()) else "cpu"
    m = xgb.XGBClassifier(
        n_estimators=p.n_estimators, max_depth=p.max_depth, learning_rate=p.learning_rate,
        subsample=p.subsample, colsample_bytree=p.colsample_bytree,
        min_child_weight=p.min_child_weight, reg_lambda=p.reg_lambda, tree_method="hist",
        device=dev, n_jobs=p.nthread, random_state=seed, eval_metric="logloss",
        callbacks=[_stop_callback()] if _stoppable() else None)
    m.fit(X, y)
    if dev == "cuda":
        # predict from host arrays without a device copy warning
        m.set_params(device="cpu")
    return (lambda Z: m.predict_proba(Z)[:, 1]), dev


def fit_mlp(p: MLP, X, y, seed: int, device: str) -> tuple[Predict, str]:
    try:
        import torch
    except ImportError:
        raise RuntimeError("the MLP trainer needs torch: pip install 'evo[nn]'") from None
    if device == "auto":
        if gpu_given() and torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    torch.manual_seed(seed)
    torch.set_num_threads(p.nthread)
    scale = _standardize(X)
    dev = torch.device(device)
    layers: list = []
    width = X.shape[1]
    for h in p.hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, 1))
    net = torch.nn.Sequential(*layers).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    Xt = torch.tensor(scale(X), dtype=torch.float32, device=dev)
    yt = torch.tensor(y, dtype=torch.float32, device=dev)[:, None]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(p.epochs):
        stop_if_asked()  # a pruned or cancelled trial ends here, its worker kept warm
        perm = torch.randperm(len(Xt), generator=gen).to(dev)
        for i in range(0, len(Xt), p.batch_size):
            b = perm[i:i + p.batch_size]
            opt.zero_grad()
            loss_fn(net(Xt[b]), yt[b]).backward()
            opt.step()
    net.eval()

    def predict(Z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.tensor(scale(Z), dtype=torch.float32, device=dev)
            return torch.sigmoid(net(z)).cpu().numpy()[:, 0].astype(float)

    return predict, device


def _stoppable() -> bool:
    """Whether the job runs where evo may ask it to stop (a warm worker)."""
    from evo import job

    return job._stop_asked is not None


def _stop_callback():  # noqa: ANN202 - an xgboost TrainingCallback
    """Checks evo's stop request after every boosting round (in xgboost's Python loop, where
    raising is safe); it changes nothing in what is trained."""
    import xgboost as xgb

    class StopWhenAsked(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log) -> bool:  # noqa: ANN001
            stop_if_asked()
            return False

    return StopWhenAsked()


# each takes its own params class; called with the one PARAMS names for the same trainer
FIT: dict[str, Callable[..., tuple[Predict, str]]] = {
    "GLM": fit_glm, "RandomForest": fit_rf, "XGBoost": fit_xgb, "MLP": fit_mlp}
