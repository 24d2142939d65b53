"""Parsing the benchmark options: --seeds, --ks, --heads."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import UsageError

# --------------------------------------------------------------------------- argument parsing


def parse_seeds(seeds: int | str | Iterable[int]) -> list[int]:
    """Seeds from a count (5 → 0..4) or an explicit list ("0,7,9" or [0, 7, 9]); no repeats."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise UsageError(f"--seeds {seeds}: expected at least 1 seed")
        return list(range(int(seeds)))
    items = seeds.split(",") if isinstance(seeds, str) else list(seeds)
    try:
        out = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise UsageError(f"seeds {seeds!r}: expected integers") from None
    if not out:
        raise UsageError("expected at least 1 seed")
    if len(set(out)) != len(out):
        raise UsageError(f"seeds {out}: repeated seed")
    return out


def parse_ks(ks: str | Iterable[int]) -> list[int]:
    """Shots per class for a k-shot curve from "1,2,5" or a list; sorted, unique, each >= 1."""
    items = ks.split(",") if isinstance(ks, str) else list(ks)
    try:
        out = sorted({int(str(k).strip()) for k in items if str(k).strip()})
    except ValueError:
        raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers like 1,2,5,10") from None
    if not out or out[0] < 1:
        raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers like 1,2,5,10")
    return out


def parse_heads(heads: str | Iterable[str]) -> list[str]:
    """Head names from "svm,logreg" or a list, checked against the head registry (in order, no repeats);
    "auto" (`--head auto`) is accepted too."""
    from ..detectors import list_heads

    items = heads.split(",") if isinstance(heads, str) else list(heads)
    out: list[str] = []
    for h in (str(x).strip() for x in items):
        if h and h not in out:
            out.append(h)
    if not out:
        raise UsageError("--heads: expected at least one head name")
    unknown = [h for h in out if h not in list_heads() and h != "auto"]
    if unknown:
        raise UsageError(f"unknown head(s) {', '.join(unknown)}; heads are: {', '.join(list_heads())}, "
                         "or auto (chosen per fit by cross-validation on its references)")
    return out
