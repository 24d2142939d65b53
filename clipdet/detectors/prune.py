"""A fitted embedding pruner (Gaintseva et al. 2024): the components `fit --prune` removes, applied before the head.

Chosen by `clipdet.fit.prune.fit_pruner` on the references only; stored in the detector file as plain arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import DetectorFileError, UsageError

BASES = ("coord", "pca")


class Pruner:
    """Removes `removed` coordinates or projects out the rows of `components`, unit by unit."""

    def __init__(self, basis: str, dim: int, removed=None, components=None, info: dict | None = None):
        self.basis, self.dim = basis, int(dim)
        self.removed = np.asarray(removed if removed is not None else [], dtype=np.int64)
        self.components = (np.asarray(components, dtype=np.float64) if components is not None
                           else np.zeros((0, self.dim)))
        self.info = dict(info or {})

    def transform(self, X) -> np.ndarray:
        """`X` (n, U * dim) with the pruned components removed from each dim-wide unit (float32)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] % self.dim:
            raise UsageError(f"pruning expects rows made of {self.dim}-wide vectors, got shape {X.shape}")
        U = X.reshape(len(X), -1, self.dim).copy()
        if self.basis == "coord":
            U[:, :, self.removed] = 0.0
        elif len(self.components):
            C = self.components.astype(np.float32)
            U -= (U @ C.T) @ C
        return U.reshape(len(X), -1)

    def get_state(self) -> tuple[dict, dict]:
        """(JSON-able meta, arrays) for the detector file."""
        return ({"basis": self.basis, "dim": self.dim, "info": self.info},
                {"removed": self.removed, "components": self.components})

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> Pruner:
        """Rebuild from `get_state` output; DetectorFileError when it does not fit together."""
        try:
            basis, dim = str(meta["basis"]), int(meta["dim"])
            removed = np.asarray(arrays["removed"], dtype=np.int64)
            comps = np.asarray(arrays["components"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise DetectorFileError(f"malformed pruning state: {e}") from None
        if basis not in BASES or (removed.size and (removed.min() < 0 or removed.max() >= dim)) \
                or comps.ndim != 2 or (comps.size and comps.shape[1] != dim):
            raise DetectorFileError("malformed pruning state (basis, indices or directions out of range)")
        return cls(basis, dim, removed, comps, meta.get("info"))

    def describe(self) -> str:
        """One line: what was removed and the cross-validated AUC before and after."""
        what = (f"coordinates {', '.join(map(str, self.removed.tolist()))}" if self.basis == "coord"
                else f"{len(self.components)} principal direction(s)")
        i = self.info
        return (f"pruned {what}: {i.get('cv', 'cv')} AUC on the references {i.get('auc_before', float('nan')):.3f}"
                f" -> {i.get('auc_after', float('nan')):.3f}")
