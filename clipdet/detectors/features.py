"""What a head reads from the feature cache: its feature kind, how to load it, and the row layout.

Every head declares ``needs`` (a class attribute): ``"embedding"`` (the default: the final image
embedding), ``"heads"`` (attention-head contributions, `clipdet extract --heads N`) or
``"layers"`` (CLS tokens of blocks, `clipdet extract --layers ...`). Whatever the kind, a head sees a
flat 2-D matrix (one row per image, scikit-learn style); the layout of that row (``units`` vectors of
``dim`` each, and which blocks/heads they are) is recorded in the pool and in the detector file, and
`layout_params` turns it into the head's parameters. A new kind (say image+text) adds a loader here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import UsageError

KINDS = ("embedding", "heads", "layers")
HINTS = {"heads": "extract with --heads 4 first (clipdet extract --heads 4 ...)",
         "layers": "extract with --layers first (clipdet extract --layers -1,-2,-3,-4 ...)"}


def load_kwargs(kinds: Iterable[str]) -> dict:
    """Keyword arguments of `FeatureCache.load` that read what `kinds` need."""
    kinds = set(kinds)
    kw = {}
    if "heads" in kinds:
        kw["with_heads"] = True
    if "layers" in kinds:
        kw["with_layers"] = True
    return kw


def matrix(rows, kind: str, keep=None, order=None) -> np.ndarray:
    """The flat (n, F) float32 matrix of `kind` from `FeatureRows` (rows `keep` only, if given; units in
    `order`, if given: see `read_plan`)."""
    src = {"embedding": rows.embedding, "heads": getattr(rows, "heads", None),
           "layers": getattr(rows, "layers", None)}.get(kind)
    if src is None:
        raise UsageError(f"features of kind {kind!r} were not loaded; " + HINTS.get(kind, ""))
    a = np.asarray(src)
    if keep is not None:
        a = a[keep]
    if order is not None:  # units (blocks) stored in another order than the detector reads them
        a = a[:, order]
    return np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)


def unit_names(layout: dict, units: Iterable[int]) -> list[str]:
    """Readable names of row units: "block.head" for heads, "block" for layers, "" otherwise."""
    kind = layout.get("kind")
    if kind == "heads":
        H = int(layout["n_heads"])
        return [f"{layout['blocks'][u // H]}.{u % H}" for u in units]
    if kind == "layers":
        return [str(layout["blocks"][u]) for u in units]
    return ["" for _ in units]
