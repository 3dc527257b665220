"""A trial as a function (``module:function``), run by evo's warm workers: its parameters
are keyword arguments, and the dict it returns is its result. Used by
configs/sweeps/callable_example.yaml."""

from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split


def run(n_estimators: int = 50, max_depth: int = 4, seed: int = 0) -> dict:
    X, y = make_classification(n_samples=3000, n_features=20, n_informative=6, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    model = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                   random_state=seed, n_jobs=1).fit(X_train, y_train)
    return {"auc": roc_auc_score(y_test, model.predict_proba(X_test)[:, 1]),
            "model": f"RandomForest({n_estimators}, depth {max_depth})"}
