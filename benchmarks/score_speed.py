"""Scoring speed: `clipdet score` on images already in the cache (the common re-scoring case) and cold.

    python benchmarks/score_speed.py --n 20000 --out benchmarks/results/score_speed.md

Writes N small distinct PNG files (real/ and fake/gen/ halves) to a temporary folder, extracts them
once with the built-in tiny model (the "cold" pass: for real backbones cold scoring runs at
extraction speed, see extract_speed.md), fits an svm and a knn detector, then times scoring the whole
folder from the cache: in process (`score_refs`, median of --repeats) and as a CLI command writing CSV
(process start included). Cached scoring still reads and hashes every file: the cache is keyed by
content, so a changed file is never scored from stale features.
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


def make_images(root: str, n: int, seed: int = 0) -> None:
    """N distinct 48x48 PNGs, half under real/, half under fake/gen/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("real", "fake/gen"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        sub = "real" if i % 2 == 0 else "fake/gen"
        Image.fromarray(arr).save(os.path.join(root, sub, f"{i:06d}.png"))


def main() -> None:
    """Run the benchmark; print and write a Markdown table with the exact command."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import clipdet
    from clipdet.extract.discover import discover
    from clipdet.score.stream import score_refs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = os.path.join(tmp, "data"), os.path.join(tmp, "c.h5")
        make_images(data, a.n)
        refs = discover([data])
        t0 = time.perf_counter()
        s = clipdet.extract(refs, "clipdet-tiny:random", cache=cache, device="cpu")
        cold = time.perf_counter() - t0
        rows.append({"case": f"cold: extract {s.new} images with clipdet-tiny:random", "images_per_s": s.new / cold})
        for head in ("svm", "knn"):
            det = clipdet.fit(head=head, shots=10, cache=cache, attribute=False)
            path = os.path.join(tmp, f"{head}.clipdet")
            det.save(path)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                n = sum(1 for _ in score_refs(refs, det, cache=cache))
                times.append(time.perf_counter() - t0)
            rows.append({"case": f"from cache, in process: score_refs ({head}, {n} images)",
                         "images_per_s": n / statistics.median(times)})
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "clipdet", "score", data, "--detector", path, "--cache", cache,
                                "--out", os.path.join(tmp, "s.csv"), "--quiet"], check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            rows.append({"case": f"from cache, CLI: clipdet score folder/ --out s.csv ({head}, process start included)",
                         "images_per_s": a.n / statistics.median(times)})
    info = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "clipdet": clipdet.__version__}
    lines = ["# Scoring speed", "", f"`{info['command']}` — {info['cpus']} CPUs, {info['platform']}, "
             f"Python {info['python']}, clipdet {info['clipdet']}; median of {a.repeats}.", "",
             "| case | images/s |", "|---|---:|"]
    lines += [f"| {r['case']} | {r['images_per_s']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
