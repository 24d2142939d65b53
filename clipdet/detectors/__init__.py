"""Few-shot detector heads and the fitted `Detector` that carries one.

- Heads: a registry of scikit-learn classifiers over frozen embeddings (linear, mlp, knn, centroid,
  heads, layers, zeroshot). ``create_head("svm", C=0.5)``, ``list_heads()``, ``head_params("mlp")``,
  ``describe_heads()``; ``head_from_state(meta, arrays)`` rebuilds any saved head.
- `detector`: `Detector`, the fitted bundle (head, threshold and calibration, attribution with the
  open-set rule, pruner) and its pickle-free file. It lives with the heads because loading it rebuilds them.
- What heads and the bundle need: `features` (which rows a head reads), `calibration` (Platt,
  temperature, thresholds), `refcv` (reference-only cross-validation), `openset`, `prune` (the fitted
  pruner; choosing its components is the fit stage's).

Importing this package loads no head module (`registry` fills the registry on first use), and torch
and faiss are imported only when a head that needs them is fitted or used.
"""

from __future__ import annotations

from .detector import Detector
from .registry import (
    create_head,
    describe_heads,
    head_description,
    head_from_state,
    head_kind,
    head_params,
    heads_registry,
    kinds_for,
    list_heads,
)

__all__ = [
    "HEADS",
    "BaseHead",
    "Detector",
    "create_head",
    "describe_heads",
    "head_description",
    "head_from_state",
    "head_kind",
    "head_params",
    "heads_registry",
    "kinds_for",
    "list_heads",
]


def __getattr__(name: str):
    """`HEADS` (the filled registry) and `BaseHead`, loaded on first use (they import scikit-learn)."""
    if name == "HEADS":
        return heads_registry()
    if name == "BaseHead":
        from .base import BaseHead

        return BaseHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
