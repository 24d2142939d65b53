"""The live-segment index of a cache: which segment and row holds each image, built from the segments' own indexes."""

from __future__ import annotations

from dataclasses import dataclass

from .index import (
    KeyTable,
    SegmentIndex,
)
from .segment import (
    check_header,
    feature_groups,
    group_extras,
    image_columns,
)


@dataclass
class _Seg:
    path: str
    index: SegmentIndex
    file: object  # open h5py.File


def _attrs(g) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}


def build_index(name: str, f, size: int) -> SegmentIndex:
    """Index one open segment file."""
    from .conflicts import read_conflicts

    version = check_header(f, name)
    im = f.get("images")
    itab = KeyTable.load(im, len(im["sha256"])) if im is not None and "sha256" in im else None
    damage = []
    if itab is not None and (why := itab.damage()):
        damage.append(f"images: search index damaged ({why})")
        itab = None
    cols = image_columns(f, with_sha=itab is None)
    itab = itab or KeyTable.build(cols["sha256"])
    idx = SegmentIndex(name, itab, cols["label"], cols["gen"], cols["vocab"],
                       size=size, version=version, conflicts=read_conflicts([f]), damage=damage)
    for key, view in feature_groups(f):
        g = f[f"features/{key}/{view}"]
        from .index import GroupIndex

        n = len(g["sha256"])
        tab = KeyTable.load(g, n)
        if tab is not None and (why := tab.damage()):  # rebuilt from the hash column: reads stay right
            damage.append(f"features/{key}/{view}: search index damaged ({why})")
            tab = None
        tab = tab or KeyTable.build(g["sha256"][()])
        idx.groups[(key, view)] = GroupIndex(tab, _attrs(g), group_extras(g), n)
    e = f.get("errors/path")
    idx.n_errors = 0 if e is None else len(e)
    return idx
