"""What a head sees: the image embedding alone, or combined with the embedding of the image's caption.

- `image`: the L2-normalised image embedding (every head's default).
- `image+text`: the normalised image embedding and the normalised caption embedding, concatenated
  (2D wide; Santosh et al. 2024, fed to an MLP).
- `residual`: the image embedding minus its projection on the caption embedding, renormalised
  (Gaintseva et al. 2024: what the caption does not explain, i.e. what the generator added).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError

FEATURES = ("image", "image+text", "residual")


def check_features(name: str | None) -> str:
    """A valid features name ('image' for None/empty); refuses others with the list."""
    name = (name or "image").strip().lower()
    if name not in FEATURES:
        raise UsageError(f"--features {name!r}: expected one of {', '.join(FEATURES)}")
    return name


def needs_captions(name: str | None) -> bool:
    """Whether features `name` need each image's caption."""
    return check_features(name) != "image"


def _unit(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(n, np.finfo(np.float32).tiny)


def combine(image: np.ndarray, text: np.ndarray, features: str) -> np.ndarray:
    """Row-wise features from image embeddings and their captions' embeddings (same row order)."""
    features = check_features(features)
    img = _unit(np.asarray(image, dtype=np.float32))
    if features == "image":
        return img
    txt = _unit(np.asarray(text, dtype=np.float32))
    if features == "image+text":
        return np.hstack([img, txt]).astype(np.float32)
    proj = np.sum(img * txt, axis=1, keepdims=True)
    return _unit(img - proj * txt).astype(np.float32)


def apply_features(X: np.ndarray, shas: Sequence[str], features: str, captions: dict[str, str],
                   embedder) -> tuple[np.ndarray, np.ndarray]:
    """(features, has_caption) for image rows `X` with hashes `shas`; `captions` maps sha → caption.

    Rows without a caption get zeros and `has_caption` False (the caller reports them); `image`
    features need no caption and no text tower."""
    X = np.asarray(X, dtype=np.float32)
    features = check_features(features)
    if features == "image":
        return X, np.ones(len(X), bool)
    ok = np.array([s in captions for s in shas], bool)
    width = 2 * X.shape[1] if features == "image+text" else X.shape[1]
    out = np.zeros((len(X), width), np.float32)
    if ok.any():
        idx = np.flatnonzero(ok)
        T = embedder.embed([captions[shas[i]] for i in idx])
        out[idx] = combine(X[idx], T, features)
    return out, ok


def pool_features(pool, features: str, captions: dict[str, str], embedder):
    """`pool` with its X replaced by `features`; rows without a caption left out. Returns (pool, n_left_out)."""
    features = check_features(features)
    if features == "image" or len(pool) == 0:
        return pool, 0
    X, ok = apply_features(pool.X, pool.sha256, features, captions, embedder)
    keep = np.flatnonzero(ok).tolist()
    out = pool.take(keep)
    out.X = X[keep] if keep else np.zeros((0, X.shape[1]), np.float32)
    return out, int((~ok).sum())


def no_captions_error(what: str, features: str) -> UsageError:
    """The one-line refusal when `features` need captions and none were given."""
    return UsageError(f"{what}: --features {features} needs a caption per image; give --captions FILE.csv "
                      "(columns sha256 or path, and caption) or a manifest with a caption column")


class CaptionFeatures:
    """The features a detector scores: image embeddings as they are, or combined with each image's
    caption embedding (`detector.features`); the text tower is loaded only for uncached captions."""

    def __init__(self, detector, cache, captions=None, backbone: str | None = None, device: str = "auto"):
        from .captions import Captions

        self.detector, self.cache = detector, cache
        self.kind = getattr(detector, "features", "image")
        self.active = needs_captions(self.kind)
        self.captions = captions if isinstance(captions, Captions) else Captions()
        self.spec, self.device = backbone or detector.backbone.get("spec"), device
        self._text = None

    def embedder(self):
        """The detector backbone's `TextEmbedder` (created once)."""
        if self._text is None:
            from .embed import TextEmbedder

            self._text = TextEmbedder(self.spec, cache=self.cache, key=self.detector.backbone_key,
                                      device=self.device)
        return self._text

    def features(self, feats, refs, records) -> tuple:
        """(features, has_caption) for the loaded rows `feats` of one chunk (`refs`, `records` aligned)."""
        if not self.active:
            return feats.embedding, np.ones(len(feats.sha256), bool)
        caps = self.captions.for_refs(refs)
        by_sha = {}
        for path, sha, error in records:
            c = None if error else caps.get(sha, path)
            if c is not None:
                by_sha.setdefault(sha, c)
        return apply_features(feats.embedding, feats.sha256, self.kind, by_sha, self.embedder())
