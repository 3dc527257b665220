"""Built-in trainers by name: ``evo submit --trainer NAME`` and sweeps resolve here.

The name is also the job's default model type, which the cluster's routing rules know.
"""

from __future__ import annotations

from evo.errors import BadInput

# name -> "module:function", run in a warm worker on the node.
TRAINERS: dict[str, str] = {
    "GLM": "evo.trainers.experiment:glm",
    "RandomForest": "evo.trainers.experiment:random_forest",
    "XGBoost": "evo.trainers.experiment:xgboost",
    "MLP": "evo.trainers.experiment:mlp",
}

# name -> the parameters whose product is a trial's expected cost (sweeps start the longest
# first): trees times depth, epochs.
COST: dict[str, tuple[str, ...]] = {
    "RandomForest": ("n_estimators", "max_depth"),
    "XGBoost": ("n_estimators", "max_depth"),
    "MLP": ("epochs",),
}


def resolve_trainer(name: str) -> str:
    try:
        return TRAINERS[name]
    except KeyError:
        known = ", ".join(sorted(TRAINERS)) or "none in this version"
        raise BadInput(f"--trainer {name!r}: unknown trainer (known: {known})") from None
