"""`clipdet extract --engine ray` against `--engine local`: images/s end to end, same images, same backbone,
same machine.

    python benchmarks/ray_engine.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random --repeats 3 \
        --out benchmarks/results/ray_engine.md

Each run is the real command (`python -m clipdet extract DATA --engine E --quiet`) in a fresh
subprocess with a fresh cache, so the wall time includes everything a user waits for: start-up, model
loading, and for Ray starting a local Ray (no --ray-address: the engine starts one for the run) and its
actors. The engines alternate run by run; medians are reported. images/s = images embedded / wall s.
The extract summary's own rate (inside the run, after start-up) is reported beside it.
Random weights are fine here: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time


def cpu_info() -> str:
    """CPU model, core count and whether it has native bf16 (else AVX2 only), from lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    bf16 = [f for f in flags if "bf16" in f]
    simd = "native bf16 (" + ", ".join(bf16) + ")" if bf16 else ("AVX2 only, no native bf16" if "avx2" in flags else
                                                                 "no AVX2")
    return f"{model}, {os.cpu_count()} CPUs, {simd}"


def load() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_once(engine: str, data: str, backbone: str, extra: list[str]) -> dict:
    """One `clipdet extract` run into a fresh cache; returns wall seconds, embedded images and the summary line."""
    with tempfile.TemporaryDirectory(prefix="clipdet-bench-") as tmp:
        cmd = [sys.executable, "-m", "clipdet", "extract", data, "--backbone", backbone, "--cache",
               os.path.join(tmp, "c.h5"), "--engine", engine, "--quiet", *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"{engine} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    line = r.stdout.strip().splitlines()[-1]
    m = re.search(r"(\d+) new", line)
    inner = re.search(r"([\d.]+) img/s", line)
    return {"wall": wall, "new": int(m.group(1)) if m else 0, "line": line,
            "inner": float(inner.group(1)) if inner else float("nan")}


def main() -> None:
    """Run the comparison and write the Markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/aigi-dev")
    ap.add_argument("--backbone", default="ViT-B-32:random")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="Markdown file for the results")
    ap.add_argument("--extra", default="", help="Extra options for both engines, e.g. '--views jpeg:75'")
    args = ap.parse_args()
    extra = args.extra.split()
    before = load()
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for i in range(args.repeats):
        for engine in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
            r = run_once(engine, args.data, args.backbone, extra)
            runs[engine].append(r)
            print(f"run {i + 1} {engine}: {r['wall']:.1f} s, {r['new'] / r['wall']:.1f} img/s ({r['line']})",
                  flush=True)
    after = load()
    med = {e: statistics.median(x["new"] / x["wall"] for x in rs) for e, rs in runs.items()}
    inner = {e: statistics.median(x["inner"] for x in rs) for e, rs in runs.items()}
    walls = {e: statistics.median(x["wall"] for x in rs) for e, rs in runs.items()}
    import clipdet

    try:
        import ray

        ray_v = ray.__version__
    except ImportError:
        ray_v = "not installed"
    import torch

    cmd = "python benchmarks/ray_engine.py " + " ".join(sys.argv[1:])
    lines = [
        "# Ray engine vs local engine (extract)", "", f"`{cmd}`", "",
        f"Machine: {cpu_info()}; {platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"ray {ray_v}, clipdet {clipdet.__version__}. Backbone {args.backbone} (random weights: speed only). "
        f"{runs['local'][0]['new']} images embedded per run, fresh cache each run, engines alternating; "
        f"median of {args.repeats} runs each.", "",
        f"Load average (1/5/15 min) before: {before}; after: {after} (the 2 cores are shared with other agents' "
        "work, so absolute numbers move between runs; the ratio is taken from interleaved runs).", "",
        "| engine | wall s (median) | images/s end to end | images/s inside the run | runs (wall s) |",
        "|---|---:|---:|---:|---|",
    ]
    for e in ("local", "ray"):
        each = ", ".join(f"{x['wall']:.1f}" for x in runs[e])
        lines.append(f"| {e} | {walls[e]:.1f} | {med[e]:.1f} | {inner[e]:.1f} | {each} |")
    lines += ["", f"- ray / local, end to end: **{100 * med['ray'] / med['local']:.0f}%**",
              f"- ray / local, inside the run (after start-up): **{100 * inner['ray'] / inner['local']:.0f}%**"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
