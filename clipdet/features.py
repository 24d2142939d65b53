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

from .errors import UsageError

KINDS = ("embedding", "heads", "layers")
HINTS = {"heads": "extract with --heads 4 first (clipdet extract --heads 4 ...)",
         "layers": "extract with --layers first (clipdet extract --layers -1,-2,-3,-4 ...)"}


def head_kind(head: str) -> str:
    """The feature kind head `head` reads (its class attribute ``needs``)."""
    from .detectors import HEADS

    return getattr(HEADS.get(head), "needs", "embedding")


def kinds_for(heads: Iterable[str]) -> list[str]:
    """The feature kinds a set of heads needs, "embedding" first."""
    out = ["embedding"]
    for h in heads:
        k = head_kind(h)
        if k not in out:
            out.append(k)
    return out


def group_layout(cache, key: str, view: str, kind: str) -> dict:
    """The row layout of `kind` features in group (key, view); UsageError with a hint when absent."""
    if kind == "embedding":
        return {"kind": "embedding", "units": 1}
    g = cache.group(key, view)
    if g is None:
        raise UsageError(f"{cache.path}: no '{view}' features for {key}")
    if kind == "heads":
        spec = getattr(g, "heads", None)
        if not spec:
            raise UsageError(f"{cache.path}: features {key}/{view} have no attention-head contributions; "
                             + HINTS["heads"])
        return {"kind": "heads", "blocks": list(spec["blocks"]), "n_heads": int(spec["n_heads"]),
                "units": len(spec["blocks"]) * int(spec["n_heads"]), "dim": int(g.dim)}
    if kind == "layers":
        if not g.layers:
            raise UsageError(f"{cache.path}: features {key}/{view} have no block CLS tokens; " + HINTS["layers"])
        return {"kind": "layers", "blocks": list(g.layers), "units": len(g.layers)}
    raise UsageError(f"unknown feature kind {kind!r}; known: {', '.join(KINDS)}")


def load_kwargs(kinds: Iterable[str]) -> dict:
    """Keyword arguments of `FeatureCache.load` that read what `kinds` need."""
    kinds = set(kinds)
    kw = {}
    if "heads" in kinds:
        kw["with_heads"] = True
    if "layers" in kinds:
        kw["with_layers"] = True
    return kw


def read_plan(cache, detector, view: str) -> tuple[np.ndarray | None, dict]:
    """How `detector`'s rows are read from, and added to, the cache group (key, view) it scores from:
    (unit order, LazyBackbone arguments for new images).

    Without the group, new images are extracted with the detector's layout (`--heads N` / `--layers`)
    and read as stored. A group holding exactly that layout is read as stored and keeps its own settings
    (extraction follows a group's layers and heads); one holding the same blocks in another order is
    read in the detector's order. Anything else (no head contributions / block tokens, other blocks or
    heads) is a UsageError naming the cache and what differs, raised before any extraction."""
    lay = detector.layout
    kind = lay.get("kind", "embedding")
    if kind == "embedding":
        return None, {}
    g = cache.group(detector.backbone_key, view)
    if g is None:
        return None, ({"heads": len(lay["blocks"])} if kind == "heads" else {"layers": tuple(lay["blocks"])})
    want = [int(b) for b in lay.get("blocks", [])]
    other = "score with another --cache (new images are extracted there as the detector needs)"
    if kind == "heads":
        have = getattr(g, "heads", None)
        need = f"the attention heads of blocks {want} ({lay.get('n_heads')} per block)"
        if not have:
            raise UsageError(f"{cache.path}: its {view} features have no attention-head contributions; the detector "
                             f"reads {need}: {other}, or extract with --heads {len(want)} into a new cache")
        if [int(b) for b in have["blocks"]] != want or int(have["n_heads"]) != int(lay.get("n_heads", 0)):
            raise UsageError(f"{cache.path}: its {view} features hold the heads of blocks {have['blocks']} "
                             f"({have['n_heads']} per block); the detector reads {need}: {other}")
        return None, {}
    have = [int(b) for b in g.layers]
    if not have:
        raise UsageError(f"{cache.path}: its {view} features have no block CLS tokens; the detector reads blocks "
                         f"{want}: {other}, or extract with --layers {','.join(map(str, want))} into a new cache")
    if have == want:
        return None, {}
    if sorted(have) == sorted(want):
        return np.array([have.index(b) for b in want], dtype=np.int64), {}
    raise UsageError(f"{cache.path}: its {view} features hold the CLS tokens of blocks {have}; the detector reads "
                     f"blocks {want}: {other}")


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
