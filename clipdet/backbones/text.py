"""The text tower of an open_clip model, built only when a command needs it (zero-shot prompts, captions).

Image-only runs never build it: `OpenClipProvider.load` keeps the image tower alone, exactly as before.
`load_text_tower` builds the whole model once more, keeps the text parts and drops the image tower,
so a process that needs both holds each tower once.
"""

from __future__ import annotations

from typing import Sequence

from .base import BackboneInfo


class OpenClipTextTower:
    """Tokenizer + text tower of an open_clip model: `encode(texts)` → L2-normalised float32 (n, D).

    `info` is the same `BackboneInfo` as the image backbone's (same cache key and fingerprint), so text
    embeddings are cached under the backbone that made them. `calls` counts `encode` calls that ran the
    model (tests use it to check the text cache).
    """

    def __init__(self, model, tokenizer, info: BackboneInfo, device: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.calls = 0

    def tokenize(self, texts: Sequence[str]):
        """open_clip's tokenizer for this architecture (truncates to the context length)."""
        return self.tokenizer(list(texts))

    def encode(self, texts: Sequence[str], batch_size: int = 256):
        """Embeddings of `texts`, L2-normalised, float32 numpy (n, D)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        self.calls += 1
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tok = self.tokenize(texts[i:i + batch_size]).to(self.device)
                out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    @property
    def embed_dim(self) -> int:
        """Width of the text embeddings (the shared CLIP embedding size)."""
        return int(self.info.extra.get("embed_dim", 0))


def load_text_tower(spec: str, device: str = "auto") -> OpenClipTextTower:
    """Build `spec`'s model and keep its text tower (fp32) and tokenizer on `device`.

    The backbone record matches `OpenClipProvider.load`'s (same preprocess and embed_dim), so the
    text rows' feature-group attributes agree with the image rows' for the same weights.
    """
    from .openclip import OpenClipProvider, _open_clip

    model, info, device = OpenClipProvider.build(spec, device)
    visual = model.visual
    preprocess_cfg = dict(visual.preprocess_cfg)
    embed_dim = int(getattr(visual, "output_dim", 0) or 0)
    del model.visual, visual  # the image tower is not needed here
    pp_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}
    info = BackboneInfo(info.spec, info.arch, info.weights, info.weights_id, preprocess=pp_json,
                        extra={"embed_dim": embed_dim, "precision": "fp32"})
    tokenizer = _open_clip().get_tokenizer(info.arch)
    return OpenClipTextTower(model.to(device), tokenizer, info, device)
