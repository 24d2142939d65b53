"""What block features and tile views cost per image (issue #24, item 5): extraction, cache bytes, reading
them back from a large cache, and serving.

    python benchmarks/feature_cost.py --backbone onnx:/work/wt/models/dinov2s.onnx \\
        --data ../shared/data/aigi-dev --n 16,48 --rows 10000,100000 --work /tmp/feature-cost \\
        --out benchmarks/results/feature_cost.md

1. `clipdet extract` as whole processes on the first N images of --data (fresh caches): the clean view;
   clean + every block's CLS token and patch mean (--layers); and those plus 224-px tiles x 4. The cost
   per image is the slope between the two N (start-up cancels), and the bytes per image are the cache's.
2. Reading features back (what `score` does for cached images): synthetic caches of --rows rows with
   the same widths as the backbone (12 blocks x CLS and patch mean), written through the cache's own
   writer; median time to load 1,000 random rows' embedding vs their block features.
3. serve: `Engine.run_batch` on 16 uploads, uncached: a whole-image detector vs a `fit --tiles 224:4` one.
Speed only: quality is in quality_blocks / quality_tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np


def cpu() -> str:
    """The CPU model and its widest vector extension (benchmarks say which CPU they ran on)."""
    name, flags = platform.processor() or "?", ""
    try:
        info = open("/proc/cpuinfo").read()
        name = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2 only"
    return f"{name} ({isa}), {os.cpu_count()} cores"


def du(path: str) -> int:
    """Bytes under a cache's file and segment folder."""
    total = os.path.getsize(path) if os.path.exists(path) else 0
    for root, _, files in os.walk(path + ".d"):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def images(data: str, n: int) -> list[str]:
    """The first `n` images of the manifest under `data`, as paths, alternating real and fake."""
    import csv

    rows = list(csv.DictReader(open(os.path.join(data, "manifest.csv"))))
    real = [r["path"] for r in rows if r["label"] == "real"]
    fake = [r["path"] for r in rows if r["label"] == "fake"]
    out = [p for pair in zip(real, fake) for p in pair][:n]
    return [os.path.join(data, p) for p in out]


CONFIGS = {
    "clean": [],
    "clean + blocks": ["--layers", "0,1,2,3,4,5,6,7,8,9,10,11"],
    "clean + blocks + tiles 224:4": ["--layers", "0,1,2,3,4,5,6,7,8,9,10,11",
                                     "--views", "tile:224:0,tile:224:1,tile:224:2,tile:224:3"],
}


def extraction(args) -> list[dict]:
    """Whole-process `clipdet extract` per config and N; per-image slope and bytes."""
    out = []
    ns = [int(x) for x in args.n.split(",")]
    for name, extra in CONFIGS.items():
        times, sizes = {}, {}
        for n in ns:
            work = os.path.join(args.work, f"x-{len(out)}-{n}")
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            lst = os.path.join(work, "list.txt")
            open(lst, "w").write("\n".join(images(args.data, n)) + "\n")
            cache = os.path.join(work, "c.h5")
            cmd = [sys.executable, "-m", "clipdet", "extract", "-", "-b", args.backbone, "-c", cache, "-q", *extra]
            t = time.perf_counter()
            subprocess.run(cmd, stdin=open(lst), check=True, capture_output=True)
            times[n], sizes[n] = time.perf_counter() - t, du(cache)
        a, b = ns[0], ns[-1]
        slope = (times[b] - times[a]) / (b - a)
        out.append({"config": name, "times": times, "per_image_s": slope,
                    "bytes_per_image": (sizes[b] - sizes[a]) / (b - a)})
        print(f"extract {name}: {times} -> {slope * 1000:.0f} ms/image", file=sys.stderr, flush=True)
    return out


def unit(rng, *shape) -> np.ndarray:
    """Random unit vectors along the last axis, float16 as the cache stores them."""
    x = rng.normal(size=shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def reading(args) -> list[dict]:
    """Median time to load 1,000 random cached rows, embedding only vs block features, per cache size."""
    from clipdet.backbones.base import BackboneInfo
    from clipdet.cache import FeatureCache, FeatureRows, ImageMeta

    dim, blocks = 384, list(range(12))
    bi = BackboneInfo("synthetic:dinov2s-widths", "synthetic", "none", "0" * 64,
                      {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3})
    info, key = json.loads(bi.to_json()), bi.key
    out = []
    rng = np.random.default_rng(0)
    for n in [int(x) for x in args.rows.split(",")]:
        work = os.path.join(args.work, f"rows-{n}")
        shutil.rmtree(work, ignore_errors=True)
        fc = FeatureCache(os.path.join(work, "c.h5"))
        t = time.perf_counter()
        step = 10_000
        for lo in range(0, n, step):
            ids = range(lo, min(n, lo + step))
            shas = [f"{i:064x}" for i in ids]
            m = len(shas)
            rows = FeatureRows(shas, unit(rng, m, dim), unit(rng, m, len(blocks), dim),
                               layers_mean=unit(rng, m, len(blocks), dim))
            fc.write_shard({(key, "clean"): (rows, {"backbone": info, "layers": blocks, "dim": dim})},
                           images=[ImageMeta(s, "real" if i % 2 else "fake", "", 224, 224, "PNG", [f"/x/{i}.png"])
                                   for i, s in zip(ids, shas)])
        fc.compact(full=False)
        write_s = time.perf_counter() - t
        pick = [f"{i:064x}" for i in rng.choice(n, 1000, replace=False)]
        res = {}
        for what, kw in (("embedding", {}), ("layers_mean", {"with_layers_mean": True}),
                         ("layers + layers_mean", {"with_layers": True, "with_layers_mean": True})):
            ts = []
            for _ in range(args.repeats):
                fresh = FeatureCache(os.path.join(work, "c.h5"), readonly=True)
                t = time.perf_counter()
                r = fresh.load(key, "clean", shas=pick, **kw)
                ts.append(time.perf_counter() - t)
                assert len(r.sha256) == 1000
            res[what] = statistics.median(ts) / 1000
        out.append({"rows": n, "write_s": write_s, "bytes_per_row": du(os.path.join(work, "c.h5")) / n, **res})
        print(f"read at {n}: {res}", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def serving(args) -> dict:
    """ms per image of `Engine.run_batch` on 16 uncached uploads: whole-image vs tile detector."""
    import clipdet
    from clipdet.serve import Engine

    work = os.path.join(args.work, "serve")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    refs = images(args.data, 24)
    cache = os.path.join(work, "c.h5")
    man = os.path.join(work, "m.csv")
    import csv

    manifest = csv.DictReader(open(os.path.join(args.data, "manifest.csv")))
    rows = {os.path.join(args.data, r["path"]): r for r in manifest}
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator"])
        for p in refs[:8]:
            w.writerow([p, rows[p]["label"], rows[p]["generator"]])
    whole = clipdet.fit(manifest=man, head="svm", shots=4, cache=cache, backbone=args.backbone, attribute=False)
    tiled = clipdet.fit(manifest=man, head="svm", shots=4, cache=cache, backbone=args.backbone, attribute=False,
                        tiles="224:4", tile_rule="mean")
    uploads = [(os.path.basename(p), open(p, "rb").read()) for p in refs[8:24]]
    out = {}
    for name, det in (("whole image", whole), ("tiles 224:4", tiled)):
        eng = Engine(det, cache=None, device="cpu")
        eng.load()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            eng.run_batch([eng.prepare(n, b) for n, b in uploads])
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts) / len(uploads)
        print(f"serve {name}: {out[name] * 1000:.0f} ms/image", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    """Run the three parts and write the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", default="16,48", help="two image counts for the extraction slope")
    ap.add_argument("--rows", default="10000,100000", help="synthetic cache sizes for reading")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="extract,read,serve")
    ap.add_argument("--work", default="/tmp/feature-cost")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    parts = args.parts.split(",")
    ext = extraction(args) if "extract" in parts else []
    rd = reading(args) if "read" in parts else []
    sv = serving(args) if "serve" in parts else {}
    lines = ["# What block features and tile views cost per image\n",
             f"Command: `{shlex.join(['python', *sys.argv])}`\n",
             f"Machine: {cpu()}; Python {platform.python_version()}. Backbone `{args.backbone}`. Speed only.\n"]
    if ext:
        lines += ["## Extraction (whole `clipdet extract` processes; per image = slope between the two N)\n",
                  "| features | " + " | ".join(f"{n} images" for n in ext[0]["times"]) + " | per image | cache bytes "
                  "per image (small uncompacted cache) | at 10^6 images (same bytes) |",
                  "|---|" + "---|" * (len(ext[0]["times"]) + 3)]
        for e in ext:
            lines.append(f"| {e['config']} | " + " | ".join(f"{t:.1f} s" for t in e["times"].values())
                         + f" | {e['per_image_s'] * 1000:.0f} ms | {e['bytes_per_image'] / 1024:.1f} KB | "
                         f"{e['per_image_s'] * 1e6 / 3600:.0f} h here, {e['bytes_per_image'] * 1e6 / 1e9:.1f} GB |")
    if rd:
        lines += ["\n## Reading 1,000 random cached rows back (median per row)\n",
                  "| cache rows | bytes per row | embedding | layers_mean | layers + layers_mean | write s |",
                  "|---|---|---|---|---|---|"]
        for r in rd:
            lines.append(f"| {r['rows']:,} | {r['bytes_per_row'] / 1024:.1f} KB | {r['embedding'] * 1e6:.0f} µs | "
                         f"{r['layers_mean'] * 1e6:.0f} µs | {r['layers + layers_mean'] * 1e6:.0f} µs | "
                         f"{r['write_s']:.0f} |")
    if sv:
        lines += ["\n## serve: `Engine.run_batch` of 16 uncached uploads (median ms per image)\n",
                  "| detector | ms per image |", "|---|---|"]
        lines += [f"| {k} | {v * 1000:.0f} |" for k, v in sv.items()]
    md = "\n".join(lines) + "\n"
    open(args.out, "w").write(md)
    json.dump({"extract": ext, "read": rd, "serve": sv, "cpu": cpu()}, open(args.out.replace(".md", ".json"), "w"),
              indent=1, default=str)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
