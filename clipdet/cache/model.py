"""Plain records of the cache's public API: image metadata, feature rows, feature-group summaries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

FORMAT = "clipdet-cache"
FORMAT_VERSION = 2
DEFAULT_CACHE = os.path.join("cache", "clipdet.h5")
#: label codes stored in segments (index 0: unlabelled)
LABELS = ("", "real", "fake")


def default_cache_path() -> str:
    """CLIPDET_CACHE if set, else cache/clipdet.h5 (relative to the working directory)."""
    return os.environ.get("CLIPDET_CACHE") or DEFAULT_CACHE


@dataclass
class ImageMeta:
    """Per-image metadata; one row per distinct file content."""

    sha256: str
    label: str = ""
    generator: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    paths: list[str] = field(default_factory=list)

    def merge(self, other: ImageMeta) -> None:
        """Fold a later observation of the same content in: new paths, newer non-empty fields."""
        for p in other.paths:
            if p not in self.paths:
                self.paths.append(p)
        for name in ("label", "generator", "format"):
            if getattr(other, name):
                setattr(self, name, getattr(other, name))
        if other.label == "real":
            self.generator = other.generator
        if other.width:
            self.width, self.height = other.width, other.height


#: per-row arrays a feature group may hold beside its embedding → the extract option that stores them.
#: layers: CLS tokens of the --layers blocks (n, L, width); layers_mean: the mean of those blocks' patch
#: tokens (n, L, width; caches written before 0.3 lack it); heads: direct contributions of each attention
#: head of the last --heads blocks to the embedding (n, blocks × heads, dim); heads_rest: the rest of that
#: decomposition (n, dim), so that heads.sum(1) + heads_rest is the embedding before normalisation.
EXTRAS = {"layers": "--layers", "layers_mean": "--layers", "heads": "--heads", "heads_rest": "--heads"}
#: EXTRAS a reader takes when every segment holding the rows has them, and leaves out otherwise
OPTIONAL_EXTRAS = ("layers_mean",)


@dataclass
class FeatureRows:
    """Rows of one (backbone, view) feature group: hashes, embeddings and the optional EXTRAS arrays."""

    sha256: list[str]
    embedding: np.ndarray
    layers: np.ndarray | None = None
    heads: np.ndarray | None = None
    layers_mean: np.ndarray | None = None
    heads_rest: np.ndarray | None = None

    def extras(self) -> dict[str, np.ndarray]:
        """The EXTRAS arrays these rows carry, by name."""
        return {name: getattr(self, name) for name in EXTRAS if getattr(self, name) is not None}


@dataclass
class GroupInfo:
    """Summary of one feature group across all segments."""

    key: str
    view: str
    backbone: dict
    layers: list[int]
    dim: int
    count: int
    heads: dict | None = None   # {"blocks": [...], "n_heads": H} when extracted with --heads
    extras: tuple = ()          # the EXTRAS arrays every segment of the group holds (e.g. layers, layers_mean)


def str_dtype():
    """h5py's UTF-8 variable-length string dtype."""
    import h5py

    return h5py.string_dtype("utf-8")


def decode(a) -> list[str]:
    """Bytes or str values → list of str."""
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a]


def heads_text(heads: dict | None, empty: str = "none") -> str:
    """A group's head set for messages: "blocks [8, 9, 10, 11] × 12 heads", or `empty` without --heads."""
    return empty if not heads else f"blocks {heads.get('blocks')} × {heads.get('n_heads')} heads"
