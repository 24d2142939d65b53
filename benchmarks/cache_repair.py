"""Time `clipdet cache verify` and `clipdet cache verify --repair` on one big segment with a damaged chunk.

Builds a cache of N synthetic ViT-B-32-sized rows (512-dim, random unit vectors: speed only) through
`clipdet cache import`, flips one byte in the first embedding chunk, then runs verify and repair as whole
processes (medians of --repeats runs on fresh copies, peak RSS from the child's VmHWM).

    .venv/bin/python benchmarks/cache_repair.py --rows 200000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys

import h5py

sys.path.insert(0, os.path.dirname(__file__))
from cache_scale import BACKBONE, make_parquet, run  # noqa: E402


def flip_first_chunk(cache_dir: str) -> None:
    """Corrupt one byte of the first embedding chunk of the cache's (single) segment."""
    seg_dir = cache_dir + ".d"
    (seg,) = [os.path.join(seg_dir, s) for s in os.listdir(seg_dir) if s.startswith("seg-")]
    with h5py.File(seg, "r") as f:
        (key,) = list(f["features"])
        off = f[f"features/{key}/clean/embedding"].id.get_chunk_info(0).byte_offset
    with open(seg, "r+b") as fh:
        fh.seek(off + 4)
        b = fh.read(1)
        fh.seek(off + 4)
        fh.write(bytes([b[0] ^ 0xFF]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/cache-repair")
    ap.add_argument("--out", default="benchmarks/results/cache_repair.md")
    a = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    pq = os.path.join(a.work, "rows.parquet")
    make_parquet(pq, a.rows, seed=1)
    master = os.path.join(a.work, "master", "clipdet.h5")
    t, _, rc = run(["cache", "import", pq, "-b", BACKBONE, "-c", master], env)
    if rc:
        raise SystemExit(f"import failed ({rc})")
    run(["cache", "compact", "--full", "-c", master], env)  # one segment
    flip_first_chunk(master)
    res = {}
    for name, extra in (("verify", []), ("verify --repair", ["--repair"])):
        times, rss = [], []
        for _ in range(a.repeats):
            copy = os.path.join(a.work, "copy")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(os.path.dirname(master), copy)
            dt, mb, rc = run(["cache", "verify", *extra, "-c", os.path.join(copy, "clipdet.h5")], env)
            if rc != (0 if extra else 1):  # verify: damage found (1); repair: repaired (0)
                raise SystemExit(f"{name}: unexpected exit code {rc}")
            times.append(dt)
            rss.append(mb)
        res[name] = (statistics.median(times), max(rss))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    bf16 = "avx512_bf16" in open("/proc/cpuinfo").read()
    lines = [
        "# cache verify / repair on one big segment",
        "",
        f"Command: `.venv/bin/python benchmarks/cache_repair.py --rows {a.rows} --repeats {a.repeats}`",
        f"Machine: {os.cpu_count()} cores, {cpu} ({'native bf16' if bf16 else 'no native bf16'}), "
        f"Python {platform.python_version()}.",
        f"Data: {a.rows:,} synthetic 512-dim rows (random unit vectors, speed only) in one segment, "
        "one byte flipped in the first embedding chunk.",
        "Medians of whole-process runs on fresh copies; peak RSS = the child's VmHWM.",
        "",
        "| command | seconds | peak RSS MB |",
        "|---|---|---|",
    ] + [f"| `clipdet cache {k}` | {t:.2f} | {m:.0f} |" for k, (t, m) in res.items()]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    open(a.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
