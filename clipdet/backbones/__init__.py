"""Backbone registry: spec strings → embedders that turn preprocessed image batches into embeddings.

A spec is `ARCH:WEIGHTS` as in open_clip: `ViT-L-14:openai` (a pretrained tag),
`ViT-B-32:/path/to/weights.safetensors` (a local checkpoint) or `ViT-B-32:random` (seeded random init;
scores mean nothing — for tests and speed benchmarks). Providers register under a name; the default
provider (`openclip`) accepts every architecture open_clip knows plus clipdet's built-in test configs.

Modules: `base` (identity, `PROVIDERS`), `registry` (spec → provider → backbone), `openclip` (the
open_clip provider), `text` (its text tower, built on demand), `decompose` (attention-head
contributions), `preprocess` (open_clip's eval transform, split for speed), `attrs` (feature-group
attributes without loading a model).
"""

from __future__ import annotations

from .attrs import backbone_attrs
from .base import PROVIDERS, Backbone, BackboneInfo, feature_attrs, parse_spec
from .registry import DEFAULT_BACKBONE, create_backbone, create_text_tower, describe_backbone, list_backbones

__all__ = [
    "DEFAULT_BACKBONE",
    "PROVIDERS",
    "Backbone",
    "BackboneInfo",
    "backbone_attrs",
    "create_backbone",
    "create_text_tower",
    "describe_backbone",
    "feature_attrs",
    "list_backbones",
    "parse_spec",
]
