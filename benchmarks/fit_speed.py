"""Fit speed: `clipdet fit --shots 10` wall-clock per head (process start included), and in-process fits
of the linear heads on 10,000 references.

    python benchmarks/fit_speed.py --out benchmarks/results/fit_speed.md

Builds its own cache of synthetic 768-d unit-vector "embeddings" (the shape of ViT-L-14 features) so
no model is loaded: fitting from the cache must not need one. Reports medians of --repeats runs.
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

HEADS = ["svm", "logreg", "knn", "centroid", "mlp"]


def synthetic_cache(path: str, n: int, dim: int = 768, seed: int = 0) -> None:
    """Write a clipdet cache with n labelled synthetic embeddings (two shifted clusters, 4 generators)."""
    from clipdet.cache import FeatureCache, FeatureRows, ImageMeta

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, dim)) + 0.15 * y[:, None] * rng.normal(size=dim)[None, :]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    shas = [f"{i:064x}" for i in range(n)]
    gens = [f"gen{i % 4}" if y[i] else "" for i in range(n)]
    metas = [ImageMeta(s, "fake" if y[i] else "real", gens[i], 224, 224, "PNG", [f"/synthetic/{i}.png"])
             for i, s in enumerate(shas)]
    backbone = {"spec": "synthetic:random", "arch": "synthetic", "weights": "random", "weights_id": "random-seed-0",
                "preprocess": {}, "extra": {}}
    cache = FeatureCache(path)
    cache.write_shard({("synthetic__random-seed-0", "clean"): (FeatureRows(shas, X.astype(np.float16)),
                                                              {"backbone": backbone, "layers": [], "dim": dim})},
                      images=metas)
    cache.compact()


def time_cli(args: list[str], repeats: int) -> float:
    """Median wall-clock seconds of `python -m clipdet ARGS`."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipdet", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and write a Markdown table (and JSON beside it)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", type=int, default=10000, help="references for the large linear fits")
    ap.add_argument("--out", default="benchmarks/results/fit_speed.md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "c.h5")
        synthetic_cache(cache, 2000)
        for head in HEADS:
            det = os.path.join(tmp, f"{head}.clipdet")
            sec = time_cli(["fit", "--cache", cache, "--head", head, "--shots", "10", "--out", det, "--quiet"],
                           a.repeats)
            rows.append({"case": f"clipdet fit --head {head} --shots 10 (CLI, process start included)",
                         "seconds": round(sec, 3)})
        big = os.path.join(tmp, "big.h5")
        synthetic_cache(big, a.big)
        import clipdet

        for head in ["svm", "logreg", "centroid", "knn"]:
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                clipdet.fit(head=head, shots="all", cache=big, attribute=False)
                times.append(time.perf_counter() - t)
            rows.append({"case": f"clipdet.fit(head={head!r}, shots='all') on {a.big} references (in process)",
                         "seconds": round(statistics.median(times), 3)})
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "clipdet": clipdet.__version__, "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("# Fit speed\n\n")
        f.write(f"`{info['command']}` on {info['cpus']} CPUs ({info['platform']}), median of {a.repeats}.\n\n")
        f.write("| case | seconds |\n|---|---:|\n")
        for r in rows:
            f.write(f"| {r['case']} | {r['seconds']} |\n")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(open(a.out).read())


if __name__ == "__main__":
    main()
