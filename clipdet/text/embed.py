"""Text embeddings, each text encoded once: the feature cache group (backbone key, "text")."""

from __future__ import annotations

import hashlib
import threading
from typing import Sequence

import numpy as np

from ..errors import BackboneError, ClipdetError, UsageError

#: The cache "view" name of text embeddings (never an image view: `canonical_view` refuses it).
TEXT_VIEW = "text"


def text_sha(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 bytes of `text`: the cache key of its embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextEmbedder:
    """Embeds texts with `spec`'s text tower, reusing every embedding the cache already holds.

    The tower is built on the first text the cache lacks (never for an all-cached run). `key` (e.g.
    from a detector file) must then match the loaded tower's key. New embeddings are written to the
    cache as one shard per call and remembered in this object (only remembered for a read-only
    cache, or with `cache=None`: no cache at all). `encoded` counts the texts run through the model.
    """

    def __init__(self, spec: str, cache=None, key: str | None = None, device: str = "auto", tower=None):
        from ..cache import FeatureCache

        self.spec, self.device = spec, device
        self.cache = cache if (cache is None or isinstance(cache, FeatureCache)) else FeatureCache(cache)
        self._key = key if key is not None else (tower.info.key if tower is not None else None)
        self._tower = tower
        self._memo: dict[str, np.ndarray] = {}
        self._lock = threading.RLock()
        self.encoded = 0

    @property
    def key(self) -> str:
        """Cache key of the backbone (describes the spec without building it)."""
        if self._key is None:
            from ..backbones import describe_backbone

            self._key = describe_backbone(self.spec).key
        return self._key

    def tower(self):
        """The text tower (built on first call); refuses one whose weights differ from `key`."""
        with self._lock:
            if self._tower is None:
                from ..backbones import create_text_tower

                try:
                    tower = create_text_tower(self.spec, device=self.device)
                except ClipdetError:
                    raise
                except Exception as e:  # noqa: BLE001 - tokenizer or model bug: one line, not a traceback
                    raise BackboneError(f"{self.spec}: cannot load the text tower ({type(e).__name__}: {e})") from None
                if self._key is not None and tower.info.key != self._key:
                    raise UsageError(f"backbone {self.spec} has key {tower.info.key}, but {self._key} is required "
                                     "(different weights from the ones the features/detector were made with)")
                self._tower = tower
            return self._tower

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings (len(texts), D), one per text, in order."""
        texts = list(texts)
        with self._lock:
            shas = [text_sha(t) for t in texts]
            want = {s: t for s, t in zip(shas, texts) if s not in self._memo}
            if want:
                self._fill(want)
            if not texts:
                return np.zeros((0, self.dim()), np.float32)
            return np.stack([self._memo[s] for s in shas]).astype(np.float32)

    def dim(self) -> int:
        """Embedding width (from a cached row or the tower)."""
        if self._memo:
            return len(next(iter(self._memo.values())))
        return self.tower().embed_dim

    def _fill(self, want: dict[str, str]) -> None:
        cache, key = self.cache, self.key
        shas = list(want)
        if cache is not None and cache.exists():
            have = cache.cached_shas(key, TEXT_VIEW)
            hit = [s for s, ok in zip(shas, have.contains_many(shas)) if ok] if have else []
            if hit:
                rows = cache.load(key, TEXT_VIEW, shas=hit)
                self._memo.update(zip(rows.sha256, rows.embedding.astype(np.float32)))
        missing = [s for s in shas if s not in self._memo]
        if not missing:
            return
        tower = self.tower()
        emb = tower.encode([want[s] for s in missing])
        self.encoded += len(missing)
        self._memo.update(zip(missing, emb.astype(np.float16).astype(np.float32)))
        self._write(tower, missing, emb)

    def _write(self, tower, shas: list[str], emb: np.ndarray) -> None:
        from ..backbones.base import feature_attrs
        from ..cache import FeatureRows

        cache = self.cache
        if cache is None or cache.readonly or not cache.can_write():
            return  # the embeddings stay in this object's memory
        cache.check_compatible(tower.info, TEXT_VIEW, [])
        rows = FeatureRows(shas, emb.astype(np.float16), None)
        cache.write_shard({(tower.info.key, TEXT_VIEW): (rows, feature_attrs(tower, [], int(emb.shape[1])))})
