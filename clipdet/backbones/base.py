"""What every backbone provides: an identity (for the cache) and batched embedding."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .._version import __version__
from ..errors import UsageError
from ..registry import Registry

#: Provider name → class with `describe(spec) -> BackboneInfo` and `load(spec, device) -> Backbone`.
PROVIDERS: Registry = Registry("backbone provider")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split 'ARCH:WEIGHTS' into (arch, weights); the weights part may itself contain ':' (a path)."""
    arch, sep, weights = spec.partition(":")
    if not arch or not sep or not weights:
        raise UsageError(
            f"backbone {spec!r}: expected ARCH:WEIGHTS, e.g. ViT-L-14:openai, "
            "ViT-B-32:/path/to/weights.safetensors or ViT-B-32:random"
        )
    return arch, weights


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class BackboneInfo:
    """Everything that decides what a feature vector means; two runs may share features only if equal.

    `key` names the backbone's group in the feature cache (no '/' characters).
    """

    spec: str
    arch: str
    weights: str  # pretrained tag, "file", or "random"
    weights_id: str  # tag name, SHA-256 of the weights file, or "random-seed-N"
    preprocess: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Cache group name: architecture plus the weights identity."""
        if self.weights == "file":
            wid = "file-" + self.weights_id[:16]
        else:
            wid = self.weights_id
        return f"{self.arch}__{wid}".replace("/", "_")

    def fingerprint(self) -> dict:
        """The fields that must match for cached features to be reused."""
        return {"arch": self.arch, "weights_id": self.weights_id, "preprocess": self.preprocess}

    def to_json(self) -> str:
        """JSON form, stored in cache and detector files."""
        return json.dumps(asdict(self), sort_keys=True)


class Backbone:
    """A loaded image encoder. Subclasses implement `preprocess` and `embed`.

    - `preprocess(pil_rgb) -> torch.Tensor[3, S, S]` (float32, normalised) — runs in loader workers.
    - `embed(batch, layers=()) -> dict` with "embedding": float32 (n, D), L2-normalised, and, when
      `layers` is given, "layers": float32 (n, len(layers), W) L2-normalised CLS tokens of those blocks
      and "layers_mean": float32 (n, len(layers), W) the L2-normalised mean of each block's patch tokens
      (all tokens but the CLS and any register tokens).
    """

    info: BackboneInfo
    device: str
    image_size: int
    embed_dim: int

    def preprocess(self, image):  # pragma: no cover - interface
        """Turn one PIL RGB image into the model's input tensor."""
        raise NotImplementedError

    def embed(self, batch, layers: tuple[int, ...] = ()):  # pragma: no cover - interface
        """Embed a batch of preprocessed tensors."""
        raise NotImplementedError


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available else 'cpu'; validates explicit choices."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def env_cache_dir() -> str | None:
    """Where pretrained weights are cached (CLIPDET_WEIGHTS_DIR, else open_clip's default)."""
    return os.environ.get("CLIPDET_WEIGHTS_DIR") or None


def feature_attrs(model, layers: Sequence[int], dim: int, heads: dict | None = None) -> dict:
    """The attributes a feature group is written with (backbone record, layer set, dim, version, and
    with --heads the head set {"blocks": [absolute block indices], "n_heads": H})."""
    return {"backbone": json.loads(model.info.to_json()), "layers": list(layers), "dim": int(dim),
            "clipdet_version": __version__, "heads": heads}
