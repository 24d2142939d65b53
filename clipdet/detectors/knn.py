"""FAISS nearest-neighbour head on cosine similarity (Ojha et al. 2023, UnivFD NN variant)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DetectorFileError, UsageError
from .base import HEADS, BaseHead, _validate, l2_normalize

__all__ = ["KNNHead"]


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise UsageError("the knn head needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


_GPU_RESOURCES: list = []  # one faiss.StandardGpuResources per process, created on first use


def _gpu_resources(faiss):
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


@HEADS.register("knn")
class KNNHead(BaseHead):
    """k nearest references by cosine similarity (FAISS inner product on L2-normalised rows).

    Binary decision = mean similarity to the ``k`` nearest fake (``classes_[1]``) references minus
    mean similarity to the ``k`` nearest real ones; multi-class decision = mean top-``k``
    similarity per class (``k`` is capped at each class' size). Parameters: ``k``, ``device``
    ("cpu" or "cuda"; cuda needs faiss built with GPU support), ``calibration_cv`` (folds for Platt
    scaling, 0 = fixed sigmoid), ``random_state`` (CV split only). The references are kept as float32
    ``references_`` with labels ``reference_labels_`` (indices into ``classes_``), in training order.
    """

    _head_name = "knn"
    _fixed_slope = 20.0  # cosine differences are small: 0.1 -> p = 0.88

    def __init__(self, k=1, device="cpu", calibration_cv=5, random_state=0):
        self.k = k
        self.device = device
        self.calibration_cv = calibration_cv
        self.random_state = random_state

    def _check_params(self):
        super()._check_params()
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def _fit_core(self, X, y_idx):
        self.references_ = l2_normalize(X, np.float32)
        self.reference_labels_ = np.asarray(y_idx, dtype=np.int64)
        self._indexes = self._make_indexes()

    # FAISS indexes are derived from references_: built at fit/load time, never copied or saved.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_indexes", None)
        state.pop("_class_rows", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._indexes = None
        if hasattr(self, "references_"):
            self._indexes = self._make_indexes()

    def _build(self, rows: np.ndarray):
        faiss = _faiss()
        index = faiss.IndexFlatIP(rows.shape[1])
        if self.device == "cuda":
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
                raise UsageError("device='cuda' needs faiss with GPU support and a GPU (pip install faiss-gpu)")
            index = faiss.index_cpu_to_gpu(_gpu_resources(faiss), 0, index)
        index.add(np.ascontiguousarray(rows, dtype=np.float32))
        return index

    def _make_indexes(self) -> dict:
        self._class_rows = [np.flatnonzero(self.reference_labels_ == c) for c in range(self.classes_.size)]
        return {
            "all": self._build(self.references_),
            "by_class": [self._build(self.references_[rows]) for rows in self._class_rows],
        }

    def _get_indexes(self) -> dict:
        if getattr(self, "_indexes", None) is None:
            self._indexes = self._make_indexes()
        return self._indexes

    def _class_scores(self, X) -> np.ndarray:
        Q = np.ascontiguousarray(l2_normalize(X, np.float32))
        idx = self._get_indexes()["by_class"]
        S = np.empty((Q.shape[0], self.classes_.size), dtype=np.float64)
        Q64 = Q.astype(np.float64)
        for c, index in enumerate(idx):
            k = int(min(self.k, index.ntotal))
            _, ids = index.search(Q, k)
            S[:, c] = self._exact_sims(Q64, self._class_rows[c][ids]).mean(axis=1)
        return S

    def _exact_sims(self, Q64: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
        # FAISS picks the neighbours; their similarities are recomputed row by row in float64 so a
        # score does not depend on the batch it was computed in (FAISS switches kernels by batch size).
        out = np.empty(ref_ids.shape, dtype=np.float64)
        step = max(1, (1 << 22) // max(1, ref_ids.shape[1] * Q64.shape[1]))  # ~32 MiB per chunk
        for i in range(0, Q64.shape[0], step):
            R = self.references_[ref_ids[i:i + step]].astype(np.float64)  # (rows, k, d)
            out[i:i + step] = np.einsum("nd,nkd->nk", Q64[i:i + step], R)
        return out

    def _decision(self, X):
        S = self._class_scores(X)
        return S[:, 1] - S[:, 0] if self.classes_.size == 2 else S

    def nearest(self, X) -> tuple[np.ndarray, np.ndarray]:
        """The single nearest reference of each row: (indices into the training rows, cosine sims)."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        X = _validate(self, X, reset=False)
        Q = np.ascontiguousarray(l2_normalize(X, np.float32))
        _, ids = self._get_indexes()["all"].search(Q, 1)
        ids = ids[:, 0].astype(np.int64)
        return ids, self._exact_sims(Q.astype(np.float64), ids[:, None])[:, 0]

    def _state_arrays(self):
        return {"references": self.references_, "reference_labels": self.reference_labels_}

    def _state_meta(self) -> dict[str, Any]:
        return {"n_references": int(self.references_.shape[0])}

    def _load_state(self, meta, arrays):
        refs = self._require(arrays, "references", (None, self.n_features_in_))
        labels = self._require(arrays, "reference_labels", (refs.shape[0],))
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.classes_.size):
            raise DetectorFileError("reference_labels point outside classes")
        self.references_ = refs.astype(np.float32)
        self.reference_labels_ = labels
        self._indexes = self._make_indexes()
