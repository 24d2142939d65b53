"""Training speed of `clipdet finetune`: images/s of the real training loop, per mode and precision.

    python benchmarks/finetune_speed.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random \
        --modes lora,last-blocks --precisions fp32,bf16 --batch-size 8 --steps 6 \
        --out benchmarks/results/finetune_speed_cpu.md

Each (mode, precision) runs in its own subprocess (peak RSS is per case) and measures:
- loop:  `clipdet.finetune.train.train` for one epoch over `steps x batch` images: reading, safe
         decoding, augmentation in the loader thread, forward, loss, backward, AdamW step. Timed from
         the end of the first step (warm-up) to the end of the last, via the loop's `on_step` hook.
- model: forward + backward + step on one pre-made batch, repeated (the ceiling without data loading).
Model construction is outside the timed region. Random weights are fine: speed does not depend on them,
and no accuracy is measured. On CUDA (`--device cuda`, e.g. `--backbone ViT-L-14:random --modes lora`),
the loop runs with bf16 autocast and the peak GPU memory is reported too.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's clipdet, not another installed copy


def one_case(args) -> dict:
    """Run one (mode, precision) case in this process; returns its measurements."""
    import torch

    from clipdet.backbones.openclip import OpenClipBackbone, OpenClipProvider
    from clipdet.extract.discover import discover
    from clipdet.finetune.data import Augment, class_names, list_images
    from clipdet.finetune.model import build_model
    from clipdet.finetune.train import Batches, TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.steps * args.batch_size
    refs = discover([args.data])
    reals = [r for r in refs if r.label == "real"][: n // 2 + 4]
    fakes = [r for r in refs if r.label == "fake"][: n - n // 2 + 4]
    items = list_images(reals + fakes, workers=1).items
    real_items = [it for it in items if it.label == "real"][: n // 2]
    items = real_items + [it for it in items if it.label == "fake"][: n - len(real_items)]
    classes = class_names(items)
    full, info, device = OpenClipProvider.build(args.backbone, args.device)
    visual = full.visual.to(device)
    bb = OpenClipBackbone(visual, dict(visual.preprocess_cfg), info, device, "fp32")
    model = build_model(visual, len(classes), args.mode, blocks=args.blocks, lora_rank=args.lora_rank).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pp = bb.preprocess_cfg
    batches = Batches(Augment(bb.image_size), bb.preprocess, tuple(pp["mean"]), tuple(pp["std"]), device,
                      args.workers)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-4, seed=0)
    stamps: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def on_step(step, epoch, loss):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train(model, items, [], classes, batches, cfg, tmp, {"bench": True}, precision=args.precision,
              quiet=True, on_step=on_step)
    loop_ips = args.batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])

    # model-only ceiling: the same step on one pre-made batch
    x, keep = batches.train(items[: args.batch_size], 0, 0)
    y = torch.as_tensor([classes.index(items[i].class_name) for i in keep], device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = (torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
           if args.precision == "bf16" else None)
    times = []
    for _ in range(max(3, args.steps // 2) + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        if amp is not None:
            with amp:
                logits = model(x)
        else:
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model_ips = args.batch_size / statistics.median(times[1:])
    out = {"mode": args.mode, "precision": args.precision, "device": device, "batch_size": args.batch_size,
           "timed_steps": len(stamps) - 1, "loop_images_per_s": round(loop_ips, 3),
           "model_images_per_s": round(model_ips, 3), "trainable_params": int(n_train),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def machine() -> dict:
    """CPU model, cores and whether the CPU has native bf16 (lscpu flags)."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": platform.processor()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "Model name":
            info["cpu_model"] = val.strip()
        if key.strip() == "Flags":
            flags = set(val.split())
            info["avx2"] = "avx2" in flags
            info["avx512_bf16"] = "avx512_bf16" in flags
            info["amx_bf16"] = "amx_bf16" in flags
    return info


def main() -> None:
    """Parse options, run every case in a subprocess, write Markdown + JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/aigi-dev")
    ap.add_argument("--backbone", default="ViT-B-32:random")
    ap.add_argument("--modes", default="lora,last-blocks")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    args = ap.parse_args()
    if args.case:
        args.mode, args.precision = args.case.split("/")
        print(json.dumps(one_case(args)))
        return
    rows = []
    for mode in args.modes.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--case", f"{mode}/{precision}"]
            cmd = [c for i, c in enumerate(cmd) if not (c == "--out" or (i and cmd[i - 1] == "--out"))]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                                        "PYTHONPATH": REPO})
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                rows.append({"mode": mode, "precision": precision, "error": res.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    from clipdet.evaluate.record import versions

    command = "python benchmarks/finetune_speed.py " + " ".join(sys.argv[1:])
    record = {"command": command, "machine": machine(), "versions": versions(), "rows": rows}
    if not args.out:
        print(json.dumps(record, indent=1))
        return
    m = record["machine"]
    lines = [
        "# Fine-tuning speed (`clipdet finetune`)", "",
        f"`{command}`", "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs ({m.get('platform')}); native bf16: "
        f"avx512_bf16={m.get('avx512_bf16')}, amx_bf16={m.get('amx_bf16')}; avx2={m.get('avx2')}. "
        f"torch {record['versions'].get('torch')}, open_clip {record['versions'].get('open_clip')}.", "",
        f"Backbone `{args.backbone}` (random weights: mechanics and speed only, nothing about accuracy), "
        f"batch {args.batch_size}, {args.steps} steps of one epoch (first step = warm-up, not timed).", "",
        "| mode | precision | loop img/s | model-only img/s | trainable params | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['precision']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['precision']} | {r['loop_images_per_s']:.2f} | "
                     f"{r['model_images_per_s']:.2f} | {r['trainable_params']:,} | {r['peak_rss_mb']:.0f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
