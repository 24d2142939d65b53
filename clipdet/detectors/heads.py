"""Attention-head selection (Gaintseva et al. 2024): detect from the k most informative heads only.

Rows are the flattened direct contributions of ``n_units`` attention heads to the embedding
(`clipdet extract --heads N`: N blocks x H heads, block-major). Each head is scored by cross-validated
AUC on the training references alone — leave-one-generator-out when ``groups`` (the fakes'
generator names, passed by `clipdet fit`) name two or more generators, else stratified folds — with
a class-mean-difference direction per head (cheap and vectorised over all heads). The k best heads'
contributions, concatenated, then feed a logistic-regression linear probe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import HEADS
from .linear import LogisticHead

__all__ = ["HeadSelectionHead"]


@HEADS.register("heads")
class HeadSelectionHead(LogisticHead):
    """The k best attention heads by cross-validated AUC, then a linear probe (Gaintseva et al. 2024).

    Parameters: ``k`` (heads kept); ``n_units`` (heads per row, set from the cache's layout by
    `clipdet fit`); ``cv`` (stratified folds when the references name fewer than 2 generators);
    ``C``, ``class_weight``, ``max_iter``, ``tol`` of the logistic probe; ``calibration_cv``;
    ``random_state`` (CV splits). Reads features extracted with ``--heads``.
    """

    _head_name = "heads"
    needs = "heads"
    uses_groups = True

    def __init__(self, k=4, n_units=1, cv=5, C=1.0, class_weight="balanced", max_iter=1000, tol=1e-4,
                 calibration_cv=5, random_state=0):
        self.k = k
        self.n_units = n_units
        self.cv = cv
        super().__init__(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol,
                         calibration_cv=calibration_cv, random_state=random_state)

    def layout_params(self, layout: dict) -> dict:
        """``n_units`` from the feature layout (blocks x heads)."""
        return {"n_units": int(layout.get("units", 1))}

    def fit(self, X, y, groups=None):
        """Select heads (CV on these rows; `groups`: generator names for leave-one-generator-out), fit."""
        self._groups = None if groups is None else np.asarray(groups, dtype=object)
        try:
            return super().fit(X, y)
        finally:
            self._groups = None

    def _check_params(self):
        super()._check_params()
        for name, lo in (("k", 1), ("n_units", 1), ("cv", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

    def _units(self, X) -> np.ndarray:
        n, f = X.shape
        if f % self.n_units:
            raise ValueError(f"{f} features do not split into n_units={self.n_units} equal vectors")
        return np.asarray(X).reshape(n, self.n_units, f // self.n_units)

    def _select(self, X) -> np.ndarray:
        return self._units(X)[:, self.selected_].reshape(len(X), -1)

    def _fit_core(self, X, y_idx):
        from .refcv import centroid_direction, column_auc, reference_folds

        U = self._units(X)
        groups = getattr(self, "_groups", None)
        classes = [1] if self.classes_.size == 2 else range(self.classes_.size)
        total, n_scores = np.zeros(self.n_units), 0
        for c in classes:  # one-vs-rest for several classes
            yc = (y_idx == c).astype(np.int64)
            gens = groups if groups is not None and self.classes_.size == 2 else [""] * len(yc)
            folds, self.selection_cv_ = reference_folds(yc, gens, self._seed(), self.cv)
            if not folds:  # too few references to hold any out: score on the training rows
                folds, self.selection_cv_ = [(np.arange(len(yc)), np.arange(len(yc)))], "none (too few references)"
            for tr, te in folds:
                w = centroid_direction(U[tr], yc[tr])  # (units, dim)
                total += column_auc(np.einsum("nud,ud->nu", U[te], w), yc[te])
                n_scores += 1
        self.unit_auc_ = total / n_scores
        k = min(int(self.k), self.n_units)
        self.selected_ = np.sort(np.argsort(-self.unit_auc_, kind="stable")[:k]).astype(np.int64)
        super()._fit_core(self._select(X), y_idx)

    def _decision(self, X):
        return super()._decision(self._select(X))

    def describe_fit(self, layout: dict) -> list[str]:
        """The chosen heads as block.head with their cross-validated AUC."""
        from .features import unit_names

        names = unit_names(layout, self.selected_) if layout.get("kind") == "heads" else \
            [str(u) for u in self.selected_]
        best = ", ".join(f"{n} (AUC {self.unit_auc_[u]:.3f})" for n, u in zip(names, self.selected_))
        lines = [f"attention heads used (layer.head, {self.selection_cv_} AUC on the references): {best}"]
        if int(self.k) > len(self.selected_):
            lines.append(f"note: k={self.k} asked for, but the features hold {self.n_units} heads: all are used")
        return lines

    def _state_arrays(self):
        return {**super()._state_arrays(), "selected": self.selected_, "unit_auc": self.unit_auc_}

    def _state_meta(self) -> dict[str, Any]:
        return {**super()._state_meta(), "selection_cv": self.selection_cv_}

    def _load_state(self, meta, arrays):
        k = 1 if self.classes_.size == 2 else self.classes_.size
        sel = self._require(arrays, "selected", (None,)).astype(np.int64)
        if sel.size == 0 or sel.min() < 0 or sel.max() >= self.n_units or self.n_features_in_ % self.n_units:
            from ..errors import DetectorFileError

            raise DetectorFileError("head state: selected heads out of range")
        width = sel.size * (self.n_features_in_ // self.n_units)
        self.selected_ = sel
        self.unit_auc_ = self._require(arrays, "unit_auc", (self.n_units,)).astype(np.float64)
        self.coef_ = self._require(arrays, "coef", (k, width)).astype(np.float64)
        self.intercept_ = self._require(arrays, "intercept", (k,)).astype(np.float64)
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.selection_cv_ = str(meta.get("selection_cv", ""))
