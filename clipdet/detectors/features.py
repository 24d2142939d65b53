"""What a head reads from the feature cache: its feature kind, how to load it, and the row layout.

Every head declares ``needs`` (a class attribute): ``"embedding"`` (the default: the final image
embedding), ``"heads"`` (attention-head contributions, `clipdet extract --heads N`) or
``"layers"`` (CLS tokens of blocks, `clipdet extract --layers ...`). A fit's ``blocks`` option
(`clipdet fit --blocks POOL:BLOCKS`, see `parse_blocks`) makes any head read chosen blocks instead:
their CLS tokens (``"layers"``), the means of their patch tokens (``"layers_mean"``) or both
(``"layers_both"``: the CLS units, then the mean units). Whatever the kind, a head sees a
flat 2-D matrix (one row per image, scikit-learn style); the layout of that row (``units`` vectors of
``dim`` each, and which blocks/heads they are) is recorded in the pool and in the detector file, and
`layout_params` turns it into the head's parameters. A new kind (say image+text) adds a loader here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import UsageError

KINDS = ("embedding", "heads", "layers", "layers_mean", "layers_both")
#: block kinds: per stored block, its CLS token, the mean of its patch tokens, or both
BLOCK_KINDS = {"cls": "layers", "mean": "layers_mean", "both": "layers_both"}
_LAYERS_HINT = "extract with --layers first (clipdet extract --layers 0,1,2,3,4,5,6,7,8,9,10,11 ...)"
HINTS = {"heads": "extract with --heads 4 first (clipdet extract --heads 4 ...)",
         "layers": _LAYERS_HINT,
         "layers_mean": _LAYERS_HINT + "; caches written before clipdet 0.3 hold no patch-token means: "
                                       "extract into a new cache",
         "layers_both": _LAYERS_HINT + "; caches written before clipdet 0.3 hold no patch-token means: "
                                       "extract into a new cache"}


def load_kwargs(kinds: Iterable[str]) -> dict:
    """Keyword arguments of `FeatureCache.load` that read what `kinds` need."""
    kinds = set(kinds)
    kw = {}
    if "heads" in kinds:
        kw["with_heads"] = True
    if kinds & {"layers", "layers_both"}:
        kw["with_layers"] = True
    if kinds & {"layers_mean", "layers_both"}:
        kw["with_layers_mean"] = True
    return kw


def matrix(rows, kind: str, keep=None, order=None) -> np.ndarray:
    """The flat (n, F) float32 matrix of `kind` from `FeatureRows` (rows `keep` only, if given; units in
    `order`, if given: see `read_plan`; for ``layers_both`` the order applies to each half)."""
    if kind == "layers_both":
        parts = [matrix(rows, k, keep, order) for k in ("layers", "layers_mean")]
        return np.ascontiguousarray(np.hstack(parts))
    src = {"embedding": rows.embedding, "heads": getattr(rows, "heads", None),
           "layers": getattr(rows, "layers", None), "layers_mean": getattr(rows, "layers_mean", None)}.get(kind)
    if src is None:
        raise UsageError(f"features of kind {kind!r} were not loaded; " + HINTS.get(kind, ""))
    a = np.asarray(src)
    if keep is not None:
        a = a[keep]
    if order is not None:  # units (blocks) stored in another order than the detector reads them
        a = a[:, order]
    return np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)


def parse_blocks(spec: str) -> tuple[str, str]:
    """``"POOL:BLOCKS"`` → (feature kind, block selector). POOL: cls | mean | both; BLOCKS: ``all``,
    ``middle`` (the middle half of the stored blocks), or comma-separated block indices and ranges
    (``6``, ``4-8``, ``3,6,9``; negative indices count from the last stored block). A bare POOL
    means all stored blocks."""
    pool, _, sel = str(spec).strip().lower().partition(":")
    if pool not in BLOCK_KINDS:
        raise UsageError(f"--blocks {spec!r}: expected POOL:BLOCKS with POOL cls, mean or both "
                         "(e.g. mean:6, cls:4-8, both:middle, mean:all)")
    return BLOCK_KINDS[pool], (sel or "all")


def resolve_blocks(selector, stored: list[int]) -> list[int]:
    """Absolute block indices chosen by `selector` (a `parse_blocks` selector, or a list of absolute
    indices) among the `stored` blocks; UsageError naming what is stored when one is not."""
    stored = [int(b) for b in stored]
    if not isinstance(selector, str):
        want = [int(b) for b in selector]
    elif selector == "all":
        want = sorted(stored)
    elif selector == "middle":
        s = sorted(stored)
        n = len(s)
        want = s[n // 4: max(n // 4 + 1, n - n // 4)]
    else:
        want = []
        try:
            for part in selector.split(","):
                a, dash, b = part.strip().partition("-") if not part.strip().startswith("-") else (part.strip(), "", "")
                lo = int(a)
                hi = int(b) if dash else lo
                for i in range(lo, hi + 1):
                    want.append(sorted(stored)[i] if i < 0 and -len(stored) <= i else i)
        except ValueError:
            raise UsageError(f"--blocks selector {selector!r}: expected all, middle, or indices like 6, 4-8, 3,6,9") \
                from None
    missing = [b for b in want if b not in stored]
    if missing or not want:
        raise UsageError(f"blocks {missing or want} are not among the stored blocks {sorted(stored)}; "
                         f"extract with --layers {','.join(map(str, sorted(set(stored) | set(want))))}")
    return list(dict.fromkeys(want))


def select_units(M: np.ndarray, layout: dict, selector) -> tuple[np.ndarray, dict]:
    """The blocks `selector` picks (see `resolve_blocks`) from a flat matrix of a block kind laid out as
    `layout` (all stored blocks); returns (flat matrix, its layout)."""
    kind = layout.get("kind")
    if kind not in ("layers", "layers_mean", "layers_both"):
        raise UsageError(f"block selection applies to block features, not {kind!r}")
    stored = [int(b) for b in layout["blocks"]]
    want = resolve_blocks(selector, stored)
    idx = np.array([stored.index(b) for b in want], dtype=np.int64)
    L = len(stored)
    if kind == "layers_both":
        idx = np.concatenate([idx, idx + L])
    units = M.shape[1] // int(layout.get("units") or 1)
    out = np.ascontiguousarray(M.reshape(len(M), -1, units)[:, idx].reshape(len(M), -1))
    return out, {"kind": kind, "blocks": want, "units": int(len(idx)), "dim": int(units)}


def unit_names(layout: dict, units: Iterable[int]) -> list[str]:
    """Readable names of row units: "block.head" for heads, "block" for layers, "" otherwise."""
    kind = layout.get("kind")
    if kind == "heads":
        H = int(layout["n_heads"])
        return [f"{layout['blocks'][u // H]}.{u % H}" for u in units]
    if kind in ("layers", "layers_mean"):
        return [str(layout["blocks"][u]) for u in units]
    if kind == "layers_both":
        L = len(layout["blocks"])
        return [f"{layout['blocks'][u % L]}.{'cls' if u < L else 'mean'}" for u in units]
    return ["" for _ in units]
