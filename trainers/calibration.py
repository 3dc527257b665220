"""Probability calibration: Platt scaling and isotonic regression.

A calibrator is fitted on forecasts the model made for games it was not trained on, and only on
seasons before the one it will be applied to (see cv.py), so it never sees the test season.
"""

from __future__ import annotations

import numpy as np

METHODS = ("none", "platt", "isotonic")
_CLIP = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), _CLIP, 1 - _CLIP)
    return np.log(p / (1 - p))


class Calibrator:
    def __init__(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"calibration {method!r}: expected one of {', '.join(METHODS)}")
        self.method = method
        self._model = None

    def fit(self, p: np.ndarray, y: np.ndarray) -> Calibrator:
        # scikit-learn's models are imported when used: its isotonic module alone (scipy) takes
        # over a second to import, which every trial of a warm worker that starts would wait
        # for, calibrated or not
        if self.method == "platt":
            from sklearn.linear_model import LogisticRegression

            # A logistic regression on the logit of the forecast: p' = sigmoid(a * logit(p) + b).
            self._model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], y)
        elif self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            self._model = IsotonicRegression(y_min=_CLIP, y_max=1 - _CLIP,
                                             out_of_bounds="clip").fit(p, y)
        return self

    def transform(self, p: np.ndarray) -> np.ndarray:
        if self.method == "none" or self._model is None:
            return np.asarray(p, float)
        if self.method == "platt":
            return self._model.predict_proba(_logit(p)[:, None])[:, 1]
        return np.clip(self._model.predict(p), _CLIP, 1 - _CLIP)
