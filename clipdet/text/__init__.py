"""CLIP's text tower in clipdet: cached text embeddings, captions, and caption-aware features.

- `embed`: `TextEmbedder` encodes texts (prompts, captions) with the backbone's text tower, loaded on
  first need, and caches each embedding once in the feature cache under (backbone key, "text"), keyed
  by the SHA-256 of the UTF-8 text.
- `captions`: captions from a manifest `caption` column or a `--captions FILE.csv` (sha256 or path,
  plus caption).
- `features`: `image` | `image+text` (Santosh et al. 2024) | `residual` (Gaintseva et al. 2024).
"""

from __future__ import annotations

from .captions import MISSING_CAPTION, Captions, read_captions
from .embed import TEXT_VIEW, TextEmbedder, text_sha
from .features import FEATURES, apply_features, check_features, needs_captions

__all__ = ["FEATURES", "MISSING_CAPTION", "TEXT_VIEW", "Captions", "TextEmbedder", "apply_features",
           "check_features", "needs_captions", "read_captions", "text_sha"]
