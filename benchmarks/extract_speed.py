"""Extraction speed: clipdet's pipeline against a naive loop and the model-only ceiling, same images,
same backbone, same device.

    python benchmarks/extract_speed.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random \
        --out benchmarks/results/extract_speed_cpu.md

Modes (each run in its own subprocess, so peak memory is per mode; median of --repeats runs):
- naive:     PIL open → convert RGB → open_clip preprocess → batches of 32 → encode_image (fp32).
- ceiling:   encode_image on pre-made tensors, batch 32, at fp32 and at the precision clipdet uses
             on that device (bf16 on CPUs where it is faster and accurate; see clipdet/backbones).
- clipdet:   `clipdet.extract` end to end into a fresh cache: hashing, decoding in loader threads,
             preprocessing, inference, HDF5 shards and the final compaction.
- clipdet-fp32: the same pipeline forced to fp32 (what overlapping and cheaper preprocessing give alone).
- clipdet-half: the same on the first half of the images, to show peak memory does not grow with N.
Model construction is outside the timed region in every mode. Random weights are fine here: speed
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def list_images(data: str, limit: int | None) -> list[str]:
    """Image files under `data`, sorted (clipdet's own discovery rules)."""
    from clipdet.extract.discover import discover

    refs = discover([data])
    return [r.path for r in refs][: limit or None]


def run_naive(paths, spec, device, batch):
    """The reference loop a researcher would write first."""
    import open_clip
    import torch
    from PIL import Image

    from clipdet.backbones.base import parse_spec
    from clipdet.backbones.openclip import _open_clip

    arch, _ = parse_spec(spec)
    _open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    model.eval()
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            xs = []
            for p in paths[i:i + batch]:
                try:
                    xs.append(preprocess(Image.open(p).convert("RGB")))
                except Exception:  # noqa: BLE001 - the naive loop skips bad files too
                    continue
            if xs:
                model.encode_image(torch.stack(xs).to(device))
                n += len(xs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def run_ceiling(paths, spec, device, batch, precision):
    """encode_image on pre-made tensors: the model-only upper bound (no decoding at all)."""
    import torch

    from clipdet.backbones import create_backbone

    bb = create_backbone(spec, device=device, precision=precision)
    n = len(paths)
    x = torch.randn(batch, 3, bb.image_size, bb.image_size)
    bb.embed(x)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        bb.embed(x[:k])
        done += k
    return n, time.perf_counter() - t0


def run_clipdet(paths, spec, device, batch, workers):
    """clipdet.extract end to end into a fresh cache."""
    import clipdet
    from clipdet.backbones import create_backbone
    from clipdet.extract.discover import ImageRef
    from clipdet.extract.lazy import LazyBackbone

    # The model is built before the clock starts, as in the other modes (building it is not extraction).
    lazy = LazyBackbone(spec, device=device, loaded=create_backbone(spec, device=device))
    with tempfile.TemporaryDirectory() as tmp:
        refs = [ImageRef(p) for p in paths]
        t0 = time.perf_counter()
        s = clipdet.extract(refs, spec, cache=os.path.join(tmp, "c.h5"), device=device, batch_size=batch,
                            workers=workers, lazy=lazy)
        dt = time.perf_counter() - t0
    return s.new, dt


def child(args) -> None:
    """Run one mode and print a JSON line with images, seconds and peak RSS."""
    import warnings

    warnings.filterwarnings("ignore")
    if args.mode == "clipdet-fp32":  # the pipeline without reduced precision (set before torch loads)
        os.environ["CLIPDET_PRECISION"] = "fp32"
    paths = list_images(args.data, args.limit)
    if args.mode == "clipdet-half":
        paths = paths[: len(paths) // 2]
    if args.mode == "naive":
        n, dt = run_naive(paths, args.backbone, args.device, 32)
    elif args.mode.startswith("ceiling"):
        n, dt = run_ceiling(paths, args.backbone, args.device, 32, args.mode.split("-", 1)[1])
    else:
        n, dt = run_clipdet(paths, args.backbone, args.device, args.batch_size, args.workers)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "images": n, "seconds": dt, "peak_rss_mb": rss}))


def main() -> None:
    """Run every mode --repeats times in subprocesses and write a Markdown + JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/aigi-dev")
    ap.add_argument("--backbone", default="ViT-B-32:random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="clipdet batch size (default: automatic)")
    ap.add_argument("--workers", type=int, default=None, help="clipdet loader threads (default: automatic)")
    ap.add_argument("--modes", default="naive,ceiling-fp32,ceiling-auto,clipdet,clipdet-half")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    results: dict[str, list[dict]] = {}
    base = [sys.executable, __file__, "--data", args.data, "--backbone", args.backbone, "--device", args.device]
    if args.limit:
        base += ["--limit", str(args.limit)]
    if args.batch_size:
        base += ["--batch-size", str(args.batch_size)]
    if args.workers is not None:
        base += ["--workers", str(args.workers)]
    modes = args.modes.split(",")
    for r in range(args.repeats):
        for mode in modes:  # interleaved, so drift in machine load hits every mode alike
            out = subprocess.run(base + ["--mode", mode], check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            results.setdefault(mode, []).append(row)
            print(f"[{r + 1}/{args.repeats}] {mode}: {row['images'] / row['seconds']:.1f} img/s, "
                  f"peak {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
    table = {}
    for mode, rows in results.items():
        table[mode] = {
            "images": rows[0]["images"],
            "img_per_s": statistics.median(r["images"] / r["seconds"] for r in rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        }
    import torch

    import clipdet

    info = {
        "command": "python " + " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
        "clipdet": clipdet.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
        "processor": _cpu_name(), "device": args.device, "backbone": args.backbone, "repeats": args.repeats,
    }
    lines = ["# Extraction speed", "", f"`{info['command']}`", "",
             f"Machine: {info['processor']}, {info['cpus']} CPUs, {info['platform']}; Python {info['python']}, "
             f"torch {info['torch']}, clipdet {info['clipdet']}. Device {args.device}, backbone {args.backbone}. "
             f"Median of {args.repeats} interleaved runs; each mode in its own process.", "",
             "| mode | images | images/s | peak RSS (MB) |", "|---|---:|---:|---:|"]
    for mode, t in table.items():
        lines.append(f"| {mode} | {t['images']} | {t['img_per_s']:.1f} | {t['peak_rss_mb']:.0f} |")
    lines.append("")
    if "naive" in table and "clipdet" in table:
        lines.append(f"- clipdet / naive: **{table['clipdet']['img_per_s'] / table['naive']['img_per_s']:.2f}x**")
    for c in ("ceiling-auto", "ceiling-fp32"):
        if c in table and "clipdet" in table:
            lines.append(f"- clipdet / {c}: **{table['clipdet']['img_per_s'] / table[c]['img_per_s']:.0%}** "
                         "of the model-only ceiling")
    if "clipdet-half" in table and "clipdet" in table:
        lines.append(f"- peak RSS with half the images: {table['clipdet-half']['peak_rss_mb']:.0f} MB vs "
                     f"{table['clipdet']['peak_rss_mb']:.0f} MB with all of them")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"info": info, "results": results, "summary": table}, f, indent=1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
