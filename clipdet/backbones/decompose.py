"""Direct contributions of attention heads to a ViT's image embedding (Gandelsman et al. 2024).

The CLS token entering the final LayerNorm is a sum: the token entering block ``L-N``, and for each
of the last ``N`` blocks its attention output (one term per head, plus the out_proj bias) and its
MLP output. Treating ``ln_post`` as linear given that token's mean and standard deviation (each
term loses its own mean and is divided by the full token's std, then scaled by ``ln_post.weight``)
and applying ``proj`` maps every term into embedding space. `decompose` returns the per-head terms
and one residual term (the earlier blocks, the MLPs, the biases and ``ln_post.bias``); the parts sum
to ``visual(x)`` before L2 normalisation.

Written from the paper and open_clip's `ResidualAttentionBlock`/`VisionTransformer`; supports the
standard open_clip ViT (``nn.MultiheadAttention`` blocks, CLS-token pooling, no attention pooler).
"""

from __future__ import annotations

from ..errors import UsageError


def decomposable_blocks(visual, spec: str):
    """(transformer, blocks) of `visual` when the head decomposition supports it, else `UsageError`."""
    import torch.nn as nn

    tr = getattr(visual, "transformer", None)
    blocks = getattr(tr, "resblocks", None)
    why = ""
    if blocks is None:
        why = "it is not a ViT (no transformer blocks)"
    elif getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        why = "it does not pool the CLS token"
    elif not isinstance(getattr(visual, "ln_post", None), nn.LayerNorm):
        why = "it has no final LayerNorm"
    elif not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and hasattr(b, "ls_2")
                 for b in blocks):
        why = "its blocks use a custom attention"
    if why:
        raise UsageError(f"--heads: {spec} is not supported ({why}); --heads needs a standard open_clip ViT")
    return tr, blocks


def resolve_heads(visual, n: int, spec: str) -> dict:
    """``{"blocks": [absolute indices of the last n blocks], "n_heads": H}``; validates `n`."""
    _, blocks = decomposable_blocks(visual, spec)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(blocks):
        raise UsageError(f"--heads {n}: expected a number of final blocks from 1 to {len(blocks)} ({spec})")
    return {"blocks": list(range(len(blocks) - n, len(blocks))), "n_heads": int(blocks[0].attn.num_heads)}


class HeadCapture:
    """Forward hooks that record what `decompose` needs; idle unless `active` is set."""

    def __init__(self, visual, blocks_idx):
        self.visual = visual
        self.tr, blocks = decomposable_blocks(visual, "backbone")
        self.batch_first = getattr(self.tr, "batch_first", True)
        self.blocks = [blocks[j] for j in blocks_idx]
        self.active = False
        self.data: dict = {}
        self._handles = []
        first = self.blocks[0]
        self._handles.append(first.register_forward_pre_hook(self._pre(("x_in", 0))))
        for i, b in enumerate(self.blocks):
            self._handles.append(b.attn.register_forward_pre_hook(self._pre(("q_x", i))))
            self._handles.append(b.ls_2.register_forward_hook(self._post(("mlp", i))))

    def _bf(self, x):
        return x if self.batch_first else x.transpose(0, 1)

    def _pre(self, name):
        def hook(_m, args):
            if self.active:
                self.data[name] = self._bf(args[0])
        return hook

    def _post(self, name):
        def hook(_m, _args, out):
            if self.active:
                self.data[name] = self._bf(out)[:, 0]
        return hook

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _layer_scale(module, x):
    """Apply a block's LayerScale (``ls_1``) to a tensor whose last axis is the width."""
    gamma = getattr(module, "gamma", None)
    return x if gamma is None else x * gamma.float()


def head_outputs(block, q_x):
    """Per-head attention output of the CLS token, through that head's slice of out_proj and ls_1.

    `q_x`: (n, L, W) input of the block's attention (after ln_1), batch first. Returns (n, H, W) and
    the block's (scaled) out_proj bias (W,), which belongs to no head.
    """
    import torch

    attn = block.attn
    q_x = q_x.float()
    n, L, W = q_x.shape
    H = attn.num_heads
    dh = W // H
    w_in, b_in = attn.in_proj_weight.float(), attn.in_proj_bias.float()
    q = (q_x[:, 0] @ w_in[:W].T + b_in[:W]).view(n, H, dh)
    k = (q_x @ w_in[W:2 * W].T + b_in[W:2 * W]).view(n, L, H, dh)
    v = (q_x @ w_in[2 * W:].T + b_in[2 * W:]).view(n, L, H, dh)
    a = torch.softmax(torch.einsum("nhd,nlhd->nhl", q, k) / dh ** 0.5, dim=-1)
    o = torch.einsum("nhl,nlhd->nhd", a, v)
    w_out = attn.out_proj.weight.float().view(W, H, dh)
    per_head = torch.einsum("nhd,whd->nhw", o, w_out)
    bias = attn.out_proj.bias.float() if attn.out_proj.bias is not None else torch.zeros(W)
    return _layer_scale(block.ls_1, per_head), _layer_scale(block.ls_1, bias)


def decompose(visual, capture: HeadCapture):
    """(heads (n, N*H, D), rest (n, D)) float32 tensors from the last forward pass `capture` recorded.

    Block-major: index ``b*H + h`` is head h of the b-th captured block. ``heads.sum(1) + rest`` equals
    ``visual(x)`` (the projected, not yet L2-normalised embedding) up to float32 rounding.
    """
    import torch

    d = capture.data
    heads, rest = [], d[("x_in", 0)][:, 0].float()
    for i, b in enumerate(capture.blocks):
        per_head, bias = head_outputs(b, d[("q_x", i)])
        heads.append(per_head)
        rest = rest + bias + d[("mlp", i)].float()
    heads = torch.cat(heads, dim=1)  # (n, N*H, W)
    z = heads.sum(1) + rest  # the CLS token entering ln_post
    ln = visual.ln_post
    s = torch.sqrt(z.var(dim=-1, unbiased=False, keepdim=True) + ln.eps)
    g = ln.weight.float() if ln.weight is not None else torch.ones(z.shape[-1])
    heads = (heads - heads.mean(-1, keepdim=True)) / s[:, None] * g
    rest = (rest - rest.mean(-1, keepdim=True)) / s * g
    if ln.bias is not None:
        rest = rest + ln.bias.float()
    proj = getattr(visual, "proj", None)
    if proj is not None:
        heads, rest = heads @ proj.float(), rest @ proj.float()
    return heads, rest
