"""Conflicting labels: the same image content seen as real and as fake (or as two generators).

Clipdet does not let the last observation silently win: conflicting images are recorded in each
segment's /images/conflicts table (sha256, label, generator, path: one row per observation),
excluded from fit references and eval, and listed by `clipdet cache conflicts`.
"""

from __future__ import annotations

import numpy as np


def conflicted(observations) -> bool:
    """Whether (label, generator) observations of one image disagree (real vs fake, or two generators)."""
    labels = {lab for lab, _ in observations if lab}
    if len(labels) > 1:
        return True
    gens = {g for lab, g in observations if lab == "fake" and g}
    return len(gens) > 1


def read_conflicts(files) -> list[tuple[str, str, str, str]]:
    """Recorded conflict observations of open segment files: (sha256, label, generator, path) rows."""
    from .model import decode

    out = []
    for f in files:
        g = f.get("images/conflicts")
        if g is not None and len(g["sha256"]):
            out += list(zip(decode(g["sha256"][()]), decode(g["label"][()]), decode(g["generator"][()]),
                            decode(g["path"][()])))
    return out


def write_conflicts(out, rows) -> None:
    """Write /images/conflicts (deduplicated, order kept)."""
    from ..errors import printable
    from .model import str_dtype

    rows = list(dict.fromkeys(tuple(r) for r in rows))
    g = out["images"].create_group("conflicts")
    for i, name in enumerate(("sha256", "label", "generator", "path")):
        g.create_dataset(name, data=[printable(str(r[i])) for r in rows], dtype=str_dtype())


def conflict_mask(label: np.ndarray, gen: np.ndarray, perm: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per group of observations (perm/starts from index.group_ids): whether its labels disagree.

    `label` int8 codes (0 none, 1 real, 2 fake), `gen` int32 generator codes (0 none)."""
    n = len(starts)
    if not n:
        return np.zeros(0, bool)
    lab = label[perm].astype(np.int16)
    g = gen[perm].astype(np.int64)
    big = np.iinfo(np.int64).max
    lab_lo = np.minimum.reduceat(np.where(lab > 0, lab, 99), starts)
    lab_hi = np.maximum.reduceat(np.where(lab > 0, lab, -1), starts)
    fake_named = (lab == 2) & (g > 0)
    gen_lo = np.minimum.reduceat(np.where(fake_named, g, big), starts)
    gen_hi = np.maximum.reduceat(np.where(fake_named, g, -1), starts)
    return ((lab_hi >= 0) & (lab_lo != lab_hi)) | ((gen_hi >= 0) & (gen_lo != gen_hi))
