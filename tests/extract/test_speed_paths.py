"""The fast paths of extraction give the features the plain paths give (within stated tolerances).

- uint8 preprocessing + batched normalisation == open_clip's eval transform, exactly;
- bf16 inference on CPU: cosine >= 0.999 to fp32 (clipdet uses it only where it is faster, see
  benchmarks/results/extract_speed_cpu.md);
- draft (reduced-scale) JPEG decoding: preprocessed pixels and embeddings close to full decoding.
Speed itself is measured in benchmarks/, not here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipdet.backbones import create_backbone
from clipdet.backbones.openclip import resolve_precision
from clipdet.backbones.preprocess import FastPreprocess, normalize_batch
from clipdet.errors import UsageError
from clipdet.extract.decode import decode_image

CFG = {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
       "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
       "fill_color": 0}


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients, a few shapes, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(xx / (37 + 5 * c) + yy / (53 - 7 * c) + c) for c in range(3)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 12, h // 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(224, 224), (225, 224), (300, 200), (199, 513), (1024, 768), (50, 60), (768, 767)])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_fast_preprocess_equals_open_clip_transform(size, mode):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(CFG, resize_mode=mode)
    ref = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    fast = FastPreprocess(cfg)
    assert fast.supported
    im = _photo(*size, seed=size[0])
    u8 = fast(im)
    assert u8.dtype == np.uint8 and u8.shape == (224, 224, 3)
    got = normalize_batch(u8[None], fast.mean, fast.std)
    torch.testing.assert_close(got, ref(im)[None], rtol=0, atol=0)


def test_unsupported_config_falls_back_to_open_clip(tiny_backbone):
    fast = FastPreprocess(dict(CFG, resize_mode="longest"))
    assert not fast.supported


def test_bf16_cpu_embeddings_within_tolerance(tiny_spec):
    fp32 = create_backbone(tiny_spec, device="cpu", precision="fp32")
    bf16 = create_backbone(tiny_spec, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and next(bf16.visual.parameters()).dtype == torch.bfloat16
    batch = np.stack([fp32.preprocess(_photo(120 + 7 * i, 90 + 5 * i, seed=i)) for i in range(8)])
    a = fp32.embed(batch)["embedding"]
    b = bf16.embed(batch)["embedding"]
    assert b.dtype == np.float32
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.999, cos
    assert not np.array_equal(a, b)  # it really ran in reduced precision


@pytest.mark.slow
def test_bf16_cpu_vit_b32_within_tolerance():
    """The architecture the speed benchmark uses (random init; the check is numerical)."""
    fp32 = create_backbone("ViT-B-32:random", device="cpu", precision="fp32")
    bf16 = create_backbone("ViT-B-32:random", device="cpu", precision="bf16")
    batch = np.stack([fp32.preprocess(_photo(300, 240, seed=i)) for i in range(4)])
    cos = (fp32.embed(batch)["embedding"] * bf16.embed(batch)["embedding"]).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_precision_resolution(monkeypatch):
    monkeypatch.delenv("CLIPDET_PRECISION", raising=False)
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    monkeypatch.setenv("CLIPDET_PRECISION", "fp32")
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(UsageError):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UsageError):
        resolve_precision("int4", "cpu")


def _jpeg(im: Image.Image, q: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def test_draft_decoding_stays_close_to_full_decoding(tiny_backbone):
    b = tiny_backbone  # 64 px input: a 1024x768 JPEG may be decoded at 1/8 scale
    data = _jpeg(_photo(1024, 768, seed=3))
    full = decode_image(data, "x.jpg")
    draft = decode_image(data, "x.jpg", draft_size=b.image_size)
    assert (full.width, full.height) == (draft.width, draft.height) == (1024, 768)  # metadata: the file's size
    assert full.image.size == (1024, 768)
    assert min(draft.image.size) >= b.image_size and draft.image.size[0] < 1024  # really decoded smaller
    pa, pb = b.preprocess(full.image).astype(float), b.preprocess(draft.image).astype(float)
    assert np.abs(pa - pb).mean() < 3.0  # mean absolute difference, 0-255 scale, of what the model sees
    e = b.embed(np.stack([b.preprocess(full.image), b.preprocess(draft.image)]))["embedding"]
    assert float(e[0] @ e[1]) >= 0.995


def test_draft_is_ignored_for_small_images_and_non_jpeg(tiny_backbone):
    small = _jpeg(_photo(100, 80))
    assert decode_image(small, "s.jpg", draft_size=64).image.size == (100, 80)
    buf = io.BytesIO()
    _photo(1024, 768).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "p.png", draft_size=64).image.size == (1024, 768)
