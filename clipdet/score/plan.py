"""How a detector's rows are read from, and added to, the cache group it scores from."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError


def read_plan(cache, detector, view: str) -> tuple[np.ndarray | None, dict]:
    """How `detector`'s rows are read from, and added to, the cache group (key, view) it scores from:
    (unit order, LazyBackbone arguments for new images).

    Without the group, new images are extracted with the detector's layout (`--heads N` / `--layers`)
    and read as stored. A group holding exactly that layout is read as stored and keeps its own settings
    (extraction follows a group's layers and heads); one holding the same blocks in another order is
    read in the detector's order, and so is one holding more blocks than the detector reads (a fit with
    --blocks picks some of them). Anything else (no head contributions / block tokens, other blocks or
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
    if set(want) <= set(have):  # the same blocks in another order, or more blocks than the detector reads
        return np.array([have.index(b) for b in want], dtype=np.int64), {}
    raise UsageError(f"{cache.path}: its {view} features hold the CLS tokens of blocks {have}; the detector reads "
                     f"blocks {want}: {other}")
