"""Bringing foreign embeddings in: Parquet / clip-retrieval output into the cache, for a named backbone."""

from __future__ import annotations

from ..backbones import backbone_attrs
from ..cache.transfer import ImportSummary, import_rows


def import_embeddings(cache, sources: list[str], backbone: str, view: str = "clean") -> ImportSummary:
    """Import embeddings into `cache` for (backbone, view) without loading the model; see
    `clipdet.cache.transfer` for the formats. Rows that do not fit are rejected and counted."""
    key, attrs = backbone_attrs(backbone)
    return import_rows(cache, sources, key, attrs, view)
