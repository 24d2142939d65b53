"""Multi-layer head in the style of RINE (Koutlis & Papadopoulos 2024): learned block importances.

Rows are the flattened CLS tokens of ``n_units`` transformer blocks (`clipdet extract --layers`). Each
token goes through one shared projection ``Linear(width, hidden) -> ReLU``; the projected tokens are
mixed with learned importance weights ``softmax(a)`` (one per block), then dropout and a linear output.
Training is the `mlp` head's (`mlp.train_network`: class-weighted or focal loss, SAM, AdamW, early
stopping, one seeded generator), and so are the parameters, plus ``n_units``.
"""

from __future__ import annotations

import numpy as np

from .base import HEADS
from .mlp import MLPHead, train_network

__all__ = ["LayersHead"]


@HEADS.register("layers")
class LayersHead(MLPHead):
    """Learned per-block importances over intermediate CLS tokens, a projection, a linear output (RINE).

    Parameters: those of the ``mlp`` head (``hidden_size`` is the projection width) and ``n_units``
    (blocks per row, set from the cache's layout by `clipdet fit`). Reads features extracted with
    ``--layers``.
    """

    _head_name = "layers"
    needs = "layers"

    def __init__(self, n_units=1, hidden_size=128, dropout=0.1, lr=3e-3, weight_decay=1e-4, max_epochs=100,
                 patience=10, batch_size=256, sam_rho=0.05, class_weight="balanced", focal_gamma=0.0,
                 validation_fraction=0.2, calibration_cv=5, random_state=0):
        self.n_units = n_units
        super().__init__(hidden_size=hidden_size, dropout=dropout, lr=lr, weight_decay=weight_decay,
                         max_epochs=max_epochs, patience=patience, batch_size=batch_size, sam_rho=sam_rho,
                         class_weight=class_weight, focal_gamma=focal_gamma,
                         validation_fraction=validation_fraction, calibration_cv=calibration_cv,
                         random_state=random_state)

    def layout_params(self, layout: dict) -> dict:
        """``n_units`` from the feature layout (number of stored blocks)."""
        return {"n_units": int(layout.get("units", 1))}

    def _check_params(self):
        super()._check_params()
        v = self.n_units
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"n_units must be an int >= 1, got {v!r}")

    def _width(self, n_features: int) -> int:
        if n_features % self.n_units:
            raise ValueError(f"{n_features} features do not split into n_units={self.n_units} equal tokens")
        return n_features // self.n_units

    def _train(self, X, y_idx):
        L, k, h = int(self.n_units), self.classes_.size, int(self.hidden_size)
        w = self._width(X.shape[1])

        def init(uniform):
            b1, b2 = 1.0 / np.sqrt(w), 1.0 / np.sqrt(h)
            return [uniform((w, h), b1), uniform((h,), b1), uniform((L,), 0.0), uniform((h, k), b2),
                    uniform((k,), b2)]

        def forward(params, xb, mask=None):
            import torch

            hid = torch.relu(xb.view(len(xb), L, w) @ params[0] + params[1])  # (n, L, h)
            z = torch.einsum("l,nlh->nh", torch.softmax(params[2], 0), hid)
            if mask is not None:
                z = z * mask
            return z @ params[3] + params[4]

        final = train_network(self, X, y_idx, init, forward, h)
        self.coefs_ = [final[0].numpy().astype(np.float32), final[3].numpy().astype(np.float32)]
        self.intercepts_ = [final[1].numpy().astype(np.float32), final[4].numpy().astype(np.float32)]
        self.block_logits_ = final[2].numpy().astype(np.float32)

    @property
    def block_weights_(self) -> np.ndarray:
        """Learned importance of each block (softmax of the logits; sums to 1)."""
        a = np.asarray(self.block_logits_, dtype=np.float64)
        e = np.exp(a - a.max())
        return e / e.sum()

    def _logits(self, X) -> np.ndarray:
        w1, w2 = (np.asarray(m, dtype=np.float64) for m in self.coefs_)
        b1, b2 = (np.asarray(b, dtype=np.float64) for b in self.intercepts_)
        X = np.asarray(X, dtype=np.float64)
        hid = np.maximum(X.reshape(len(X), self.n_units, -1) @ w1 + b1, 0.0)
        return np.einsum("l,nlh->nh", self.block_weights_, hid) @ w2 + b2

    def describe_fit(self, layout: dict) -> list[str]:
        """The learned block importances."""
        from .features import unit_names

        names = unit_names(layout, range(self.n_units)) if layout.get("kind") == "layers" else \
            [str(u) for u in range(self.n_units)]
        return ["block importances: " + ", ".join(f"{n}: {v:.2f}" for n, v in zip(names, self.block_weights_))]

    def _state_arrays(self):
        return {**super()._state_arrays(), "block_logits": self.block_logits_}

    def _load_state(self, meta, arrays):
        w, k = self._width(self.n_features_in_), self.classes_.size
        w1 = self._require(arrays, "w1", (w, None)).astype(np.float32)
        h = w1.shape[1]
        self.coefs_ = [w1, self._require(arrays, "w2", (h, k)).astype(np.float32)]
        self.intercepts_ = [self._require(arrays, "b1", (h,)).astype(np.float32),
                            self._require(arrays, "b2", (k,)).astype(np.float32)]
        self.block_logits_ = self._require(arrays, "block_logits", (self.n_units,)).astype(np.float32)
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.best_epoch_ = int(meta.get("best_epoch", 0))
        self.early_stopping_ = bool(meta.get("early_stopping", False))
