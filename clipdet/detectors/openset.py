"""Open-set generator attribution: accept a predicted generator only when the image is close to it.

`OpenSetRule` is fitted on embeddings of fake reference images and their generator names. For
each reference it takes the leave-one-out maximum cosine similarity to the other references of
its own generator; the acceptance threshold is a low quantile of those values. At prediction
time, a row attributed to generator ``g`` keeps ``g`` only if its maximum cosine similarity to
``g``'s references reaches the threshold; otherwise it becomes ``"unknown"``. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from ..errors import DetectorFileError, UsageError

__all__ = ["OpenSetRule"]

_STATE_FORMAT = 1


def _normalize(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("embeddings must be finite")
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(n, np.finfo(np.float32).tiny)


class OpenSetRule:
    """Reject attributions to a generator whose references are all far from the image.

    Parameters: ``quantile`` (default 0.05) of the references' leave-one-out nearest-same-generator
    cosine similarities used as threshold; ``unknown_label`` (default "unknown"). Fitted:
    ``generators_`` (sorted names), ``references_`` (L2-normalised float32), ``reference_labels_``
    (indices into ``generators_``), ``loo_similarities_`` and ``threshold_``.
    """

    def __init__(self, quantile: float = 0.05, unknown_label: str = "unknown"):
        self.quantile = quantile
        self.unknown_label = unknown_label

    def fit(self, X, generators) -> OpenSetRule:
        """Fit on fake references ``X`` (n, d) and their generator names; returns self."""
        q = self.quantile
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not 0 <= q <= 1:
            raise ValueError(f"quantile must be a number in [0, 1], got {q!r}")
        R = _normalize(X)
        g = np.asarray(generators).ravel()
        if g.shape[0] != R.shape[0]:
            raise ValueError(f"X and generators differ in length: {R.shape[0]} vs {g.shape[0]}")
        names, labels = np.unique(g.astype(str), return_inverse=True)
        if self.unknown_label in names:
            raise UsageError(f"a generator may not be called {self.unknown_label!r}")
        loo = np.full(R.shape[0], np.nan)
        for c in range(names.size):
            members = np.flatnonzero(labels == c)
            if members.size < 2:
                continue
            S = R[members] @ R[members].T
            np.fill_diagonal(S, -np.inf)
            loo[members] = S.max(axis=1)
        valid = loo[np.isfinite(loo)]
        if valid.size == 0:
            raise UsageError("open-set attribution needs at least one generator with 2 or more references")
        self.generators_ = [str(n) for n in names]
        self.references_ = R
        self.reference_labels_ = labels.astype(np.int64)
        self.loo_similarities_ = loo
        self.threshold_ = float(np.quantile(valid, float(q)))
        return self

    def _check_fitted(self):
        if not hasattr(self, "threshold_"):
            raise UsageError("OpenSetRule is not fitted; call fit() first")

    def similarity(self, X, generators_pred) -> np.ndarray:
        """Max cosine similarity of each row to the references of its predicted generator (NaN if none)."""
        self._check_fitted()
        Q = _normalize(X)
        if Q.shape[1] != self.references_.shape[1]:
            raise ValueError(f"X has {Q.shape[1]} features, the rule was fitted on {self.references_.shape[1]}")
        pred = np.asarray(generators_pred).ravel().astype(str)
        if pred.shape[0] != Q.shape[0]:
            raise ValueError(f"X and generators_pred differ in length: {Q.shape[0]} vs {pred.shape[0]}")
        out = np.full(Q.shape[0], np.nan)
        for c, name in enumerate(self.generators_):
            rows = np.flatnonzero(pred == name)
            if rows.size:
                S = Q[rows] @ self.references_[self.reference_labels_ == c].T
                out[rows] = S.max(axis=1)
        return out

    def predict(self, X, generators_pred) -> np.ndarray:
        """The predicted generator, or ``unknown_label`` when the image is too far from its references.

        Labels the rule has no references for (e.g. "real") are returned unchanged.
        """
        sims = self.similarity(X, generators_pred)
        pred = np.asarray(generators_pred).ravel().astype(str).astype(object)
        known = np.isin(pred, self.generators_)
        reject = known & ~(sims >= self.threshold_)
        pred[reject] = self.unknown_label
        return pred

    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """``(meta, arrays)`` for saving without pickle (JSON-able meta, numpy arrays)."""
        self._check_fitted()
        meta = {
            "format": _STATE_FORMAT,
            "kind": "open_set_rule",
            "params": {"quantile": float(self.quantile), "unknown_label": str(self.unknown_label)},
            "generators": list(self.generators_),
            "threshold": self.threshold_,
        }
        arrays = {
            "references": np.ascontiguousarray(self.references_),
            "reference_labels": np.ascontiguousarray(self.reference_labels_),
            "loo_similarities": np.ascontiguousarray(self.loo_similarities_),
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> OpenSetRule:
        """Rebuild a fitted rule from `get_state` output; `DetectorFileError` if malformed."""
        try:
            if meta.get("kind") != "open_set_rule" or int(meta["format"]) > _STATE_FORMAT:
                raise DetectorFileError("not an open-set rule state of a supported format")
            rule = cls(**meta["params"])
            rule.generators_ = [str(g) for g in meta["generators"]]
            rule.threshold_ = float(meta["threshold"])
            refs = np.asarray(arrays["references"], dtype=np.float32)
            labels = np.asarray(arrays["reference_labels"]).astype(np.int64)
            loo = np.asarray(arrays["loo_similarities"], dtype=np.float64)
            if refs.ndim != 2 or labels.shape != (refs.shape[0],) or loo.shape != labels.shape:
                raise DetectorFileError("open-set rule arrays have inconsistent shapes")
            if labels.size and (labels.min() < 0 or labels.max() >= len(rule.generators_)):
                raise DetectorFileError("open-set rule reference labels point outside its generators")
        except DetectorFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DetectorFileError(f"malformed open-set rule state: {exc}") from exc
        rule.references_, rule.reference_labels_, rule.loo_similarities_ = refs, labels, loo
        return rule
