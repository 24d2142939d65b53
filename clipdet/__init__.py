"""clipdet: detect AI-generated images with frozen CLIP embeddings and few-shot heads.

Public API (torch, open_clip and faiss are imported only when a model or index is needed):

- `discover(paths)`, `extract(refs, backbone, cache=...)`: embed images into the feature cache.
- `FeatureCache(path)`: read the HDF5 feature cache.
- `fit(paths=None, FitConfig(...) or head="svm", shots=10, ...) -> Detector`; `Detector.load(path)`,
  `.save(path)`, `.decision_function(X)`, `.predict_proba(X)`.
- `score_paths(detector, paths, cache=...)`: one row per image (also `detector.score_paths(paths)`).
- `evaluate(refs, detector, ...)`: metrics on labelled images.
- `create_backbone(spec)`, `list_backbones()`, `create_head(name, **params)`, `list_heads()`.

The package is laid out as the pipeline: `extract` → `cache` → `fit` (heads from `detectors`) →
`score` → `evaluate`, with `backbones`, `text`, `serve`, `finetune` and the `cli`. Module paths of
0.2 (`clipdet.images`, `clipdet.fewshot`, ...) still import (see `clipdet._compat`).
"""

from __future__ import annotations

import os as _os

# OpenMP threads that sleep instead of spinning while idle leave the cores to clipdet's loader threads
# (about +8% extraction throughput on 2 cores, no loss on the model-only path; see
# benchmarks/results/extract_speed_cpu.md). Set before torch is imported; a user's own value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _compat
from ._version import __version__
from .backbones import create_backbone, list_backbones
from .cache import FeatureCache
from .detectors import Detector, create_head, list_heads
from .errors import ClipdetError
from .evaluate import evaluate
from .extract import ImageRef, discover, extract
from .fit import FitConfig, fit
from .score import score_paths

_compat.install()


__all__ = [
    "__version__", "ClipdetError", "Detector", "FeatureCache", "FitConfig", "ImageRef", "create_backbone",
    "create_head", "discover", "evaluate", "extract", "fit", "list_backbones", "list_heads", "score_paths",
]
