"""Linear heads: linear SVM (Cozzolino et al. 2024) and logistic regression (UnivFD linear probe).

Both are fitted with scikit-learn and then reduced to plain arrays, ``coef_`` (k, d) and
``intercept_`` (k,), with ``k = 1`` for two classes: ``decision = X @ coef_.T + intercept_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import HEADS, BaseHead

__all__ = ["LinearSVMHead", "LogisticHead"]


class _LinearHead(BaseHead):
    """Common part of the linear heads: store coef_/intercept_ and score with one matmul."""

    def _class_weight_dict(self, y_idx):
        from sklearn.utils.class_weight import compute_class_weight

        if self.class_weight is None:
            return None
        cw = compute_class_weight(self.class_weight, classes=self.classes_, y=self.classes_[y_idx])
        return {i: float(w) for i, w in enumerate(cw)}

    def _fit_core(self, X, y_idx):
        est = self._make_estimator(self._class_weight_dict(y_idx))
        est.fit(X, y_idx)
        self.coef_ = np.asarray(est.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(est.intercept_, dtype=np.float64).ravel()
        self.n_iter_ = int(np.max(est.n_iter_))

    def _decision(self, X):
        d = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        return d[:, 0] if self.classes_.size == 2 else d

    def _state_arrays(self):
        return {"coef": self.coef_, "intercept": self.intercept_}

    def _state_meta(self) -> dict[str, Any]:
        return {"n_iter": self.n_iter_}

    def _load_state(self, meta, arrays):
        k = 1 if self.classes_.size == 2 else self.classes_.size
        self.coef_ = self._require(arrays, "coef", (k, self.n_features_in_)).astype(np.float64)
        self.intercept_ = self._require(arrays, "intercept", (k,)).astype(np.float64)
        self.n_iter_ = int(meta.get("n_iter", 0))


@HEADS.register("svm")
class LinearSVMHead(_LinearHead):
    """Linear SVM on embeddings (Cozzolino et al. 2024); one-vs-rest for several classes.

    Parameters: ``C`` (inverse regularisation), ``class_weight`` ("balanced", None or a dict by
    label), ``max_iter`` and ``tol`` of liblinear, ``calibration_cv`` (folds for Platt scaling,
    0 = fixed sigmoid), ``random_state`` (liblinear's shuffling and the CV split).
    """

    _head_name = "svm"
    _fixed_slope = 2.0  # margins of +-1 -> p = 0.88 / 0.12

    def __init__(self, C=1.0, class_weight="balanced", max_iter=10000, tol=1e-4, calibration_cv=5,
                 random_state=0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.calibration_cv = calibration_cv
        self.random_state = random_state

    def _make_estimator(self, class_weight):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=self.C, class_weight=class_weight, max_iter=self.max_iter, tol=self.tol,
                         dual="auto", random_state=self._seed())


@HEADS.register("logreg")
class LogisticHead(_LinearHead):
    """Logistic regression linear probe (Ojha et al. 2023, UnivFD); multinomial for several classes.

    Parameters: ``C`` (inverse L2 regularisation), ``class_weight``, ``max_iter`` and ``tol`` of
    L-BFGS, ``calibration_cv`` (folds for Platt scaling, 0 = fixed sigmoid on the logit),
    ``random_state`` (CV split).
    """

    _head_name = "logreg"
    _fixed_slope = 1.0  # the decision is already a logit

    def __init__(self, C=1.0, class_weight="balanced", max_iter=1000, tol=1e-4, calibration_cv=5,
                 random_state=0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.calibration_cv = calibration_cv
        self.random_state = random_state

    def _make_estimator(self, class_weight):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, class_weight=class_weight, max_iter=self.max_iter,
                                  tol=self.tol, random_state=self._seed())
