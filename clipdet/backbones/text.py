"""The text tower of an open_clip model, built only when a command needs it (zero-shot prompts, captions).

Image-only runs never build it: `OpenClipProvider.load` keeps the image tower alone, exactly as before.
`OpenClipProvider.load_text` builds the whole model once more, keeps the text parts and drops the image tower,
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

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        """Embeddings of `texts`, L2-normalised, float32 numpy (n, D), in input order."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        self.calls += 1
        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tok = self.tokenize([texts[j] for j in order[i:i + batch_size]]).to(self.device)
                out.append(F.normalize(self._forward(tok).float(), dim=-1).cpu().numpy())
        emb = np.concatenate(out).astype(np.float32)
        back = np.empty_like(emb)
        back[order] = emb
        return back

    def _forward(self, tok):
        """`model.encode_text(tok)`, on the tokens up to the batch's longest text when that is exact.

        With a causal attention mask and pooling at the end-of-text token (open_clip's CLIP text
        tower), the padding after the last end-of-text token cannot change the pooled output, so it
        is cut off: short captions cost a fraction of the full context length. Other text towers
        run unchanged."""
        m = self.model
        mask = getattr(m, "attn_mask", None)
        pool = getattr(m, "text_pool_type", None)
        if (mask is None or pool != "argmax" or not hasattr(m, "token_embedding")
                or not hasattr(m, "positional_embedding") or not hasattr(m, "transformer")):
            return m.encode_text(tok)
        import torch
        from open_clip.transformer import text_global_pool

        n = int(tok.argmax(dim=-1).max()) + 1  # argmax pooling: the end-of-text token has the highest id
        tok = tok[:, :n]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tok).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask[:n, :n]))
        x = text_global_pool(x, tok, pool)
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj

    @property
    def embed_dim(self) -> int:
        """Width of the text embeddings (the shared CLIP embedding size)."""
        return int(self.info.extra.get("embed_dim", 0))


def text_tower_of(model, info: BackboneInfo, tokenizer, device) -> OpenClipTextTower:
    """Keep the text tower (fp32) and tokenizer of a whole open_clip `model` (built by
    `OpenClipProvider.build`) on `device`, dropping its image tower.

    The backbone record matches `OpenClipProvider.load`'s (same preprocess and embed_dim), so the
    text rows' feature-group attributes agree with the image rows' for the same weights.
    """
    visual = model.visual
    preprocess_cfg = dict(visual.preprocess_cfg)
    embed_dim = int(getattr(visual, "output_dim", 0) or 0)
    del model.visual, visual  # the image tower is not needed here
    pp_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}
    info = BackboneInfo(info.spec, info.arch, info.weights, info.weights_id, preprocess=pp_json,
                        extra={"embed_dim": embed_dim, "precision": "fp32"})
    return OpenClipTextTower(model.to(device), tokenizer, info, device)
