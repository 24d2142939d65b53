"""The extraction stage: find images, decode them safely, make views, embed them once into the cache.

- `discover`: folders and manifests → `ImageRef`s (labels from real/** and fake/<generator>/**).
- `decode`: size limits, EXIF orientation, any mode → 8-bit RGB; one error line per bad file.
- `views`: jpeg:Q, resize:F, blur:S, crop:N (the same operation for real and fake).
- `pipeline`: the one-pass local engine (reader threads → embedder → writer), `extract_local`.
- `run`: `extract`, the entry point: the pipeline on the chosen engine.
- `lazy`, `writer`, `progress`: a backbone loaded on first need, the batch writer, the progress bar.
- `engines`: where else the stages run (`ray`: a supervised child process drives a Ray cluster).
- `ingest`: foreign embeddings (Parquet, clip-retrieval) into the cache.
"""

from __future__ import annotations

from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Decoded, decode_image, read_file, sha256_bytes
from .discover import IMAGE_EXTENSIONS, Discovered, ImageRef, discover, label_from_layout, read_manifest, require_images
from .lazy import LazyBackbone, default_batch_size, default_workers, likely_cuda
from .pipeline import ExtractSummary, Prepared, iter_prepared, prepare
from .run import extract
from .views import VIEW_KINDS, apply_view, canonical_view, parse_views

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "VIEW_KINDS", "Decoded", "Discovered",
    "ExtractSummary", "ImageRef", "LazyBackbone", "Prepared", "apply_view", "canonical_view", "decode_image",
    "default_batch_size", "default_workers", "discover", "extract", "iter_prepared", "label_from_layout",
    "likely_cuda", "parse_views", "prepare", "read_file", "read_manifest", "require_images", "sha256_bytes",
]
