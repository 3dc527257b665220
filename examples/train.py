"""An ordinary training script, as a user brings one: argparse, a model trained for some
epochs, progress reported with evo.report. It runs the same without evo (reporting is then a
no-op). Used by configs/sweeps/command_example.yaml.

    python train.py --alpha 0.001 --epochs 8 --seed 1
"""

import argparse

import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import train_test_split

import evo

ap = argparse.ArgumentParser()
ap.add_argument("--alpha", type=float, default=1e-4)
ap.add_argument("--epochs", type=int, default=8)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

X, y = make_classification(n_samples=4000, n_features=20, n_informative=6, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
model = SGDClassifier(loss="log_loss", alpha=args.alpha, random_state=args.seed)
for epoch in range(1, args.epochs + 1):
    model.partial_fit(X_train, y_train, classes=np.array([0, 1]))
    p = model.predict_proba(X_test)[:, 1]
    # the last value reported of each metric is the job's final one
    evo.report(step=epoch, loss=log_loss(y_test, p), auc=roc_auc_score(y_test, p))
    print(f"epoch {epoch}/{args.epochs} done")
