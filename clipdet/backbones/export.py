"""`clipdet export onnx`: an open_clip image tower (or an ONNX model) to an ONNX file + its JSON, fp32 or int8.

The exported graph takes the normalised image batch (dynamic batch size) and gives `embedding` (N x D,
before L2 normalisation) and, for each block, `block_K` (N x tokens x W). The JSON beside it makes it an
`onnx:PATH` backbone. Every export is checked on a few images against its source: cosine >= 0.9999 for
fp32 (else the export fails), and for int8 the cosine is printed and called poor below 0.99.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

FP32_MIN_COSINE = 0.9999
INT8_POOR_COSINE = 0.99


@dataclass
class ExportReport:
    """What an export wrote and how close it is to its source (cosines over the check images)."""

    path: str
    config: dict
    int8: bool
    cosine_min: float
    cosine_mean: float
    n_images: int
    source: str

    @property
    def poor(self) -> bool:
        """Whether the int8 model drifted too far from its source to trust without measuring."""
        return self.cosine_min < (INT8_POOR_COSINE if self.int8 else FP32_MIN_COSINE)


def check_images(n: int = 8, size: int = 320, seed: int = 0) -> list:
    """`n` deterministic RGB test images with structure at several scales (gradients, blobs, noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for i in range(n):
        f = 1 + i
        base = np.stack([np.sin(xx * f * 3 + i), np.cos(yy * f * 2 - i), np.sin((xx + yy) * f)], -1)
        img = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12 + 4 * i, (size, size, 3))
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return out


def load_images(folder: str, n: int) -> list:
    """Up to `n` decodable images from `folder` (sorted), as RGB PIL images."""
    from PIL import Image

    out = []
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            try:
                with Image.open(os.path.join(root, name)) as im:
                    out.append(im.convert("RGB"))
            except Exception:  # noqa: BLE001 - non-images are skipped here
                continue
            if len(out) >= n:
                return out
    if not out:
        raise UsageError(f"--check-images {folder}: no image found")
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _open_clip_tower(spec: str):
    """(visual tower in eval mode on CPU, preprocess cfg) of an open_clip spec."""
    from .openclip import OpenClipProvider

    model, _info, _dev = OpenClipProvider.build(spec, "cpu")
    visual = model.visual.float().eval()
    cfg = dict(visual.preprocess_cfg)
    return visual, cfg


class _Tower:
    """nn.Module wrapper: normalised images → (embedding, block_0 … block_{n-1}) with blocks batch-first."""

    def __new__(cls, visual):
        import torch

        class Tower(torch.nn.Module):
            def __init__(self, visual):
                super().__init__()
                self.visual = visual
                tr = getattr(visual, "transformer", None)
                self.blocks = list(getattr(tr, "resblocks", []) or [])
                self.batch_first = getattr(tr, "batch_first", True)
                self._grab: list = []
                for b in self.blocks:
                    b.register_forward_hook(self._hook)

            def _hook(self, _m, _inp, out):
                x = out[0] if isinstance(out, tuple) else out
                self._grab.append(x if self.batch_first else x.permute(1, 0, 2))

            def forward(self, x):
                self._grab = []
                emb = self.visual(x)
                if isinstance(emb, tuple):
                    emb = emb[0]
                return (emb, *self._grab)

        return Tower(visual)


def _json_for(cfg_pp: dict, n_blocks: int) -> dict:
    size = cfg_pp["size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    interp = cfg_pp.get("interpolation", "bicubic")
    resize = cfg_pp.get("resize_mode", "shortest")
    if interp not in ("bicubic", "bilinear") or resize not in ("shortest", "squash"):
        raise UsageError(f"export: preprocessing {resize}/{interp} cannot be described in the JSON "
                         "(resize shortest|squash, interpolation bicubic|bilinear)")
    return {"output": "embedding", "image_size": size, "mean": [float(x) for x in cfg_pp["mean"]],
            "std": [float(x) for x in cfg_pp["std"]], "resize": resize, "interpolation": interp,
            "layers": {str(i): f"block_{i}" for i in range(n_blocks)}}


def export_open_clip(spec: str, out: str, opset: int = 17) -> dict:
    """Export the image tower of open_clip `spec` to `out` (fp32, dynamic batch); returns its JSON dict."""
    import torch

    visual, pp = _open_clip_tower(spec)
    tower = _Tower(visual).eval()
    size = pp["size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    cfg = _json_for(pp, len(tower.blocks))
    names = ["embedding"] + [f"block_{i}" for i in range(len(tower.blocks))]
    dummy = torch.randn(2, 3, size, size)
    axes = {"pixel_values": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    import warnings

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (dummy,), out, input_names=["pixel_values"], output_names=names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    cfg["source"] = spec
    return cfg


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic int8 quantization of `src` (weights per channel, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the original
            pre = src
        quantize_dynamic(pre, dst, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})


def _write_json(path: str, cfg: dict) -> None:
    tmp = path + ".json.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=1)
    os.replace(tmp, path + ".json")


def export_onnx(spec: str, out: str, int8: bool = False, images: list | None = None) -> ExportReport:
    """Export `spec` (an open_clip `ARCH:WEIGHTS`, or `onnx:PATH` for int8 of an ONNX model) to `out`,
    write `out.json`, and check the result against the source on `images` (default: `check_images()`)."""
    from .onnxrt import OnnxBackbone, _pruned_model, describe, read_config

    if not out.endswith(".onnx"):
        raise UsageError(f"--out {out}: the file name must end in .onnx")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    images = images if images is not None else check_images()
    from_onnx = spec.startswith("onnx:")
    if from_onnx and not int8:
        raise UsageError(f"export {spec}: already ONNX; add --int8 to quantize it")
    tmp_dir = tempfile.mkdtemp(prefix="clipdet-export-")
    try:
        if from_onnx:  # quantize only the part of the graph the backbone reads
            src = spec[5:]
            cfg = dict(read_config(src))
            cfg["source"] = spec
            blob, _name = _pruned_model(src, cfg, [cfg["output"]] + list(cfg["layers"].values()))
            pruned = os.path.join(tmp_dir, "pruned.onnx")
            with open(pruned, "wb") as fh:
                fh.write(blob)
            quant_src = pruned
        else:
            src = os.path.join(tmp_dir, "fp32.onnx")
            cfg = export_open_clip(spec, src)
            _write_json(src, cfg)
            quant_src = src
        if int8:
            quantize_int8(quant_src, out)
            cfg["quantization"] = "int8 dynamic, per-channel weights (onnxruntime.quantization)"
        elif src != out:
            os.replace(src, out)
            src = out
        _write_json(out, cfg)
        ref = _reference_embed(spec, src if from_onnx or int8 else None, images)
        new = OnnxBackbone(out, read_config(out), describe(out), "cpu")
        got = new.embed(np.stack([new.preprocess(im) for im in images]))["embedding"]
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    cos = _cosines(ref, got)
    rep = ExportReport(out, cfg, int8, float(cos.min()), float(cos.mean()), len(images), spec)
    if rep.poor and not int8:
        for f in (out, out + ".json"):
            if os.path.exists(f):
                os.remove(f)
        raise UsageError(f"export {spec}: the ONNX model differs from the torch tower (cosine {rep.cosine_min:.6f} "
                         f"< {FP32_MIN_COSINE}); not trusted")
    return rep


def _reference_embed(spec: str, onnx_src: str | None, images: list) -> np.ndarray:
    """Embeddings of `images` by the source: the torch tower for open_clip specs (fp32), or the fp32
    ONNX model the int8 one was quantized from."""
    from .onnxrt import OnnxBackbone, describe, read_config

    if onnx_src is not None:
        b = OnnxBackbone(onnx_src, read_config(onnx_src), describe(onnx_src), "cpu")
        return b.embed(np.stack([b.preprocess(im) for im in images]))["embedding"]
    from .registry import create_backbone

    b = create_backbone(spec, device="cpu", precision="fp32")
    return b.embed(b.collate([b.preprocess(im) for im in images]))["embedding"]
