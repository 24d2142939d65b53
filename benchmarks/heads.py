"""Attention heads, pruning and intermediate layers: extraction cost, fit time, bench rows.

    python benchmarks/heads.py --data /work/shared/data/aigi-dev --out benchmarks/results/heads.md

1. Extraction of --n-extract images with ViT-B-32:random, plain against `--heads 4` (in process, one
   loaded model, alternating modes, fresh cache each run): images/s and cache bytes per image.
2. A cache of the whole data set with --heads 4 --layers -1,-2,-3,-4 (clean + jpeg:50), then
   `clipdet fit --shots 10` wall-clock for each new head and for --prune (process start included).
3. `clipdet bench` (k-shot, leave-one-generator-out, robustness) on that cache for the new heads;
   written to benchmarks/results/heads-bench/. RANDOM weights: the numbers exercise the mechanics
   only and say nothing about detection quality.
Run it alone (it uses every core). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from finetune_speed import machine  # benchmarks/ is on sys.path when run as a script
from fit_speed import time_cli

SPEC = "ViT-B-32:random"


def folder_bytes(path: str) -> int:
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def extraction(data: str, n: int, repeats: int) -> list[dict]:
    """images/s and bytes/image of plain and --heads 4 extraction (same model, same images)."""
    import clipdet
    from clipdet.backbones import create_backbone
    from clipdet.extract.discover import discover
    from clipdet.extract.lazy import LazyBackbone

    refs = sorted(discover([data]), key=lambda r: r.path)[:n]
    model = create_backbone(SPEC, device="cpu")
    times: dict[str, list[float]] = {"plain": [], "heads 4": []}
    size: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = os.path.join(tmp, "warm")
        clipdet.extract(refs[:32], SPEC, cache=os.path.join(warm, "c.h5"), lazy=LazyBackbone(SPEC, loaded=model,
                                                                                             heads=4))
        for rep in range(repeats):
            for mode in ("plain", "heads 4") if rep % 2 == 0 else ("heads 4", "plain"):
                d = os.path.join(tmp, f"{mode.replace(' ', '')}{rep}")
                lazy = LazyBackbone(SPEC, loaded=model, heads=4 if mode != "plain" else 0)
                t = time.perf_counter()
                s = clipdet.extract(refs, SPEC, cache=os.path.join(d, "c.h5"), lazy=lazy)
                times[mode].append(time.perf_counter() - t)
                assert s.ok and s.new == len(refs), s.line()
                size[mode] = folder_bytes(d)
    rows = []
    for mode, ts in times.items():
        sec = statistics.median(ts)
        rows.append({"mode": mode, "images": len(refs), "seconds": round(sec, 2),
                     "images_per_s": round(len(refs) / sec, 2), "bytes_per_image": round(size[mode] / len(refs))})
    return rows


def clipdet_cli(*args: str) -> str:
    """Run `python -m clipdet ARGS`; returns its stdout (raises with stderr on failure)."""
    r = subprocess.run([sys.executable, "-m", "clipdet", *args], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"clipdet {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    """Run the three parts and write Markdown + JSON (+ the bench folder)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/aigi-dev")
    ap.add_argument("--n-extract", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/heads.md")
    ap.add_argument("--bench-out", default="benchmarks/results/heads-bench")
    ap.add_argument("--cache", default=None, help="Reuse this cache for parts 2-3 (built if absent)")
    a = ap.parse_args()
    info = {"machine": machine(), "command": "python " + " ".join(sys.argv), "spec": SPEC}
    ext = extraction(a.data, a.n_extract, a.repeats)
    print(json.dumps(ext, indent=1), flush=True)

    tmp = tempfile.mkdtemp(prefix="clipdet-heads-")
    cache = a.cache or os.path.join(tmp, "c.h5")
    t = time.perf_counter()
    clipdet_cli("extract", a.data, "-b", SPEC, "-c", cache, "--heads", "4", "--layers", "-1,-2,-3,-4",
                "--views", "jpeg:50", "-q")
    build = time.perf_counter() - t
    fits = []
    cases = [("svm", []), ("heads", []), ("heads", ["-p", "k=8"]), ("layers", []),
             ("svm", ["--prune", "8"]), ("svm", ["--prune", "8", "--prune-basis", "pca"]),
             ("logreg", ["--prune", "8"])]
    for head, extra in cases:
        det = os.path.join(tmp, "d.clipdet")
        sec = time_cli(["fit", "-c", cache, "--head", head, "--shots", "10", "-o", det, "-q", *extra], a.repeats)
        fits.append({"case": " ".join(["clipdet fit --head", head, "--shots 10", *extra]), "seconds": round(sec, 3)})
        print(fits[-1], flush=True)
    shown = clipdet_cli("fit", "-c", cache, "--head", "heads", "--shots", "10", "-o", os.path.join(tmp, "h.clipdet"))
    t = time.perf_counter()
    bench_cmd = ["bench", "-c", cache, "--heads", "svm,heads,layers", "--ks", "2,5,10,20", "--seeds", "3",
                 "--shots", "10", "--views", "jpeg:50", "-o", a.bench_out, "-q"]
    bench_out = clipdet_cli(*bench_cmd)
    bench_pruned = clipdet_cli("bench", "-c", cache, "--heads", "svm", "--ks", "2,5,10,20", "--seeds", "3",
                               "--shots", "10", "--protocol", "kshot,logo", "--prune", "8",
                               "-o", a.bench_out + "-svm-prune8", "-q")
    bench_sec = time.perf_counter() - t

    m = info["machine"]
    bf16 = "native bf16 (avx512_bf16)" if m.get("avx512_bf16") or m.get("amx_bf16") else "no native bf16 (AVX2 only)"
    lines = ["# Attention heads, pruning, intermediate layers", "",
             f"`{info['command']}`", "",
             f"Machine: {m.get('cpus')} cores, {m.get('cpu_model')}, {bf16}; shared with other jobs. "
             f"Backbone {SPEC} (RANDOM weights: speed and mechanics only; AUCs below mean nothing about "
             "detection). Precision auto (bf16 on this CPU). Medians of "
             f"{a.repeats} runs.", "",
             "## Extraction: plain against --heads 4", "",
             "| mode | images | seconds | images/s | cache bytes/image |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['images']} | {r['seconds']} | {r['images_per_s']} | {r['bytes_per_image']} |"
              for r in ext]
    ratio = ext[0]["images_per_s"] / ext[1]["images_per_s"]
    lines += ["", f"--heads 4 costs {ratio:.2f}x the time of plain extraction and stores "
              f"{ext[1]['bytes_per_image'] / ext[0]['bytes_per_image']:.0f}x the bytes (48 heads x 512 float16 "
              "per image, plus the rest term).", "",
              f"Cache for parts 2-3 ({a.data}, clean + jpeg:50, --heads 4 --layers -1,-2,-3,-4): built in "
              f"{build:.0f} s.", "",
              "## Fit time at 10 shots (wall-clock, process start included)", "",
              "| case | seconds |", "|---|---:|"]
    lines += [f"| {r['case']} | {r['seconds']} |" for r in fits]
    lines += ["", "What `clipdet fit --head heads --shots 10` prints:", "", "```", shown.strip(), "```", "",
              f"## clipdet bench ({bench_sec:.0f} s for both runs)", "", "`clipdet " + " ".join(bench_cmd) + "`",
              "(report and CSVs in " + a.bench_out + "/)", "", "```", bench_out.strip(), "```", "",
              "With --prune 8 (svm; k-shot and leave-one-generator-out only; " + a.bench_out + "-svm-prune8/):", "",
              "```", bench_pruned.strip(), "```", ""]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"info": info, "extraction": ext, "fits": fits, "cache_build_seconds": build}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
