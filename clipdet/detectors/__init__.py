"""Few-shot detector heads and the fitted `Detector` that carries one.

- Heads: a registry of scikit-learn classifiers over frozen embeddings (linear, mlp, knn, centroid,
  heads, layers, zeroshot). ``create_head("svm", C=0.5)``, ``list_heads()``, ``head_params("mlp")``,
  ``describe_heads()``; ``head_from_state(meta, arrays)`` rebuilds any saved head.
- `detector`: `Detector`, the fitted bundle (head, threshold and calibration, attribution with the
  open-set rule, pruner) and its pickle-free file. It lives with the heads because loading it rebuilds them.
- What heads and the bundle need: `features` (which rows a head reads), `calibration` (Platt,
  temperature, thresholds), `refcv` (reference-only cross-validation), `openset`, `prune` (the fitted
  pruner; choosing its components is the fit stage's).

torch and faiss are imported only when a head that needs them is fitted or used, so importing this
package stays fast.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import HEADS, BaseHead, head_from_state
from .detector import Detector

# Importing the head modules registers them in HEADS.
from . import centroid, heads, knn, layers, linear, mlp, zeroshot  # noqa: F401  isort: skip

__all__ = [
    "HEADS",
    "BaseHead",
    "Detector",
    "create_head",
    "describe_heads",
    "head_description",
    "head_from_state",
    "head_params",
    "list_heads",
]


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return HEADS.names()


def head_params(name: str) -> dict:
    """Parameters of head ``name`` with their defaults (``get_params`` of a default instance)."""
    return HEADS.get(name)().get_params(deep=False)


def head_description(name: str) -> str:
    """One-line description of head ``name`` (first line of its class docstring)."""
    return HEADS.get(name).describe()


def describe_heads() -> list[tuple[str, str, dict]]:
    """``(name, description, default params)`` of every head, for a ``clipdet heads`` listing."""
    return [(n, head_description(n), head_params(n)) for n in list_heads()]


def create_head(name: str, **params) -> BaseHead:
    """A new, unfitted head ``name`` with ``params``; unknown names or parameters raise `UsageError`."""
    cls = HEADS.get(name)
    valid = cls().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UsageError(
            f"unknown parameter(s) for head {name!r}: {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return cls(**params)
