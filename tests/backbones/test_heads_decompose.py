"""The attention-head decomposition (clipdet.backbones.decompose) sums back to the model's output."""

from __future__ import annotations

import numpy as np
import pytest

from clipdet.errors import UsageError


def _sum_check(visual, n_blocks, size, seed=0):
    import torch

    from clipdet.backbones.decompose import HeadCapture, decompose, resolve_heads

    spec = resolve_heads(visual, n_blocks, "test")
    cap = HeadCapture(visual, spec["blocks"])
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    attn_cls = {}
    hooks = [visual.transformer.resblocks[j].attn.register_forward_hook(
        lambda _m, _a, out, j=j: attn_cls.__setitem__(j, out[0][:, 0].detach())) for j in spec["blocks"]]
    try:
        with torch.inference_mode():
            cap.active = True
            out = visual(x)
            heads, rest = decompose(visual, cap)
    finally:
        cap.remove()
        for h in hooks:
            h.remove()
    H = spec["n_heads"]
    assert heads.shape == (3, n_blocks * H, out.shape[1]) and rest.shape == out.shape
    np.testing.assert_allclose((heads.sum(1) + rest).numpy(), out.numpy(), rtol=1e-4, atol=1e-5)
    # Each block's heads (+ out_proj bias) are its attention output for the CLS token, head by head.
    from clipdet.backbones.decompose import head_outputs

    for j in spec["blocks"]:
        block = visual.transformer.resblocks[j]
        with torch.inference_mode():
            per_head, bias = head_outputs(block, block.ln_1(cap_input(visual, x, j)))
        np.testing.assert_allclose((per_head.sum(1) + bias).detach().numpy(), attn_cls[j].numpy(), rtol=1e-4, atol=1e-5)
    return heads, rest


def cap_input(visual, x, j):
    """The residual stream entering block j (batch first)."""
    import torch

    seen = {}
    h = visual.transformer.resblocks[j].register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.inference_mode():
            visual(x)
    finally:
        h.remove()
    return seen["x"]


def test_tiny_decomposition_sums_back(tiny_backbone):
    visual = tiny_backbone.visual
    _sum_check(visual, len(visual.transformer.resblocks), tiny_backbone.image_size)
    _sum_check(visual, 1, tiny_backbone.image_size, seed=1)


def test_vit_b32_random_decomposition_sums_back():
    import torch

    from clipdet.backbones.openclip import _open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _open_clip().create_model("ViT-B-32", pretrained=None)
    heads, _ = _sum_check(model.visual.eval(), 4, 224)
    assert heads.shape[1] == 4 * 12


def test_backbone_embed_returns_heads(tiny_backbone):
    from PIL import Image

    ims = [tiny_backbone.preprocess(Image.new("RGB", (70, 50), (i * 40, 10, 200 - i * 30))) for i in range(3)]
    batch = tiny_backbone.collate(ims)
    plain = tiny_backbone.embed(batch)
    out = tiny_backbone.embed(batch, heads=2)
    np.testing.assert_array_equal(out["embedding"], plain["embedding"])  # --heads changes no embedding
    total = out["heads"].sum(1) + out["heads_rest"]
    total /= np.linalg.norm(total, axis=1, keepdims=True)
    np.testing.assert_allclose(total, out["embedding"], atol=2e-5)
    assert tiny_backbone.resolve_heads(2) == {"blocks": [0, 1], "n_heads": 2}
    assert "heads" not in tiny_backbone.embed(batch)  # the hooks stay idle without heads
    with pytest.raises(UsageError, match="--heads 3"):
        tiny_backbone.resolve_heads(3)


def test_heads_on_resnet_is_a_one_line_usage_error(run_cli, labelled_tree, tmp_path):
    r = run_cli("extract", labelled_tree, "-b", "RN50:random", "-c", tmp_path / "c.h5", "--heads", "4", "-q")
    errors = [ln for ln in r.output.splitlines() if ln.startswith("clipdet: error")]
    assert r.exit_code == 2 and len(errors) == 1 and "not a ViT" in errors[0] and "Traceback" not in r.output
