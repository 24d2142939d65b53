"""The writer stage: batches preprocessed tensors per view, embeds each full batch and writes it as one segment."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backbones.base import feature_attrs
from ..cache import FeatureCache, FeatureRows, ImageMeta
from .lazy import LazyBackbone, default_batch_size


class BatchWriter:
    """Collects preprocessed tensors per view, embeds full batches and writes each as one shard."""

    def __init__(self, cache: FeatureCache, lazy: LazyBackbone, views: Sequence[str], batch_size: int | None):
        self.cache, self.lazy, self.views = cache, lazy, list(views)
        self.batch_size = batch_size
        self.pending: dict[str, list[tuple[str, object]]] = {v: [] for v in views}
        self.metas: list[ImageMeta] = []
        self.errors: list[dict] = []
        self.embedded = 0
        self.segments = 0

    def add(self, sha: str, tensors: dict) -> None:
        """Queue one image's tensors; embeds and writes every view whose batch is full."""
        if self.batch_size is None:
            self.batch_size = default_batch_size(getattr(self.lazy.get(), "device", "cpu"))
        for v, t in tensors.items():
            self.pending[v].append((sha, t))
        for v in self.views:
            if len(self.pending[v]) >= self.batch_size:
                self._flush(v)

    def _embed(self, model, tensors: list) -> dict:
        """The model's outputs for a batch of preprocessed tensors: embedding, and layers (+ layers_mean) /
        heads / heads_rest when the run stores them."""
        kw = {"heads": self.lazy.heads} if self.lazy.heads else {}
        return model.embed(model.collate(tensors), layers=self.lazy.absolute_layers, **kw)

    def _model(self):
        """The model whose identity the written features get (the one that embeds them)."""
        return self.lazy.get()

    def _flush(self, view: str) -> None:
        items, self.pending[view] = self.pending[view], []
        model = self._model()
        out = self._embed(model, [t for _, t in items])
        emb = out["embedding"]
        attrs = feature_attrs(model, self.lazy.absolute_layers, int(emb.shape[1]), self.lazy.heads_spec)
        rows = FeatureRows([s for s, _ in items], emb.astype(np.float16), out.get("layers"),
                           heads=out.get("heads"), heads_rest=out.get("heads_rest"),
                           layers_mean=out.get("layers_mean"))
        self.cache.write_shard({(model.info.key, view): (rows, attrs)}, images=self.metas, errors=self.errors)
        self.metas, self.errors = [], []
        self.embedded += len(items)
        self.segments += 1

    def close(self) -> None:
        """Flush partial batches and any remaining metadata/errors."""
        for v in self.views:
            if self.pending[v]:
                self._flush(v)
        if self.metas or self.errors:
            self.cache.write_shard(images=self.metas, errors=self.errors)
            self.metas, self.errors = [], []
            self.segments += 1
