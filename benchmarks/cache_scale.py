"""How command costs scale with the size of the feature cache (issue: a cache for millions of images).

Builds synthetic caches of N ViT-B-32 embeddings (512-d, random unit vectors, half real, half fake
over 4 generators) through `clipdet cache import` of a Parquet file, then times, as whole processes
with peak RSS (getrusage of the child): `cache info --json`, `fit --shots 10` per head, `extract` of
8 new images, `score` of 1,000 cached files. Backbone `ViT-B-32:random`: speed only, no quality.

    .venv/bin/python benchmarks/cache_scale.py --sizes 10000 100000 1000000 --work /tmp/cache-scale \
        --out benchmarks/results/cache_scale.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

BACKBONE = "ViT-B-32:random"
DIM = 512
HEADS = ["svm", "logreg", "mlp", "knn", "centroid"]
GENS = ["sd15", "sdxl", "midjourney", "dalle3"]


_CHILD = (
    "import atexit, runpy, sys\n"
    "out = sys.argv[1]\n"
    "sys.argv = ['clipdet'] + sys.argv[2:]\n"
    "atexit.register(lambda: [open(out, 'w').write(ln.split()[1]) for ln in open('/proc/self/status') "
    "if ln.startswith('VmHWM:')])\n"
    "runpy.run_module('clipdet', run_name='__main__')\n"
)


def run(args: list[str], env: dict, cwd: str | None = None, stdin_file: str | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS MB, exit code) of one clipdet command in a fresh process (in `cwd`, whose
    clipdet package wins the import; stdin from `stdin_file`).

    Peak RSS is the child's own VmHWM (read at exit from /proc/self/status): getrusage of a child
    would also count the memory it shared with this (larger) process before exec."""
    import tempfile

    fd, hwm = tempfile.mkstemp(suffix=".hwm")
    os.close(fd)
    t0 = time.perf_counter()
    with open(stdin_file or os.devnull) as stdin:
        rc = subprocess.run([sys.executable, "-c", _CHILD, hwm] + args, env=env, cwd=cwd, stdin=stdin,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    dt = time.perf_counter() - t0
    try:
        kb = float(open(hwm).read() or 0)
    finally:
        os.remove(hwm)
    return dt, kb / 1024, rc


def make_parquet(path: str, n: int, seed: int, image_paths: list[str] = ()) -> None:
    """Synthetic embeddings: random sha256 (or the given files, hashed by import), unit vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        cols = {}
        if image_paths:
            cols["path"] = list(image_paths[s:s + m])
        else:
            raw = rng.bytes(32 * m)
            cols["sha256"] = [raw[i * 32:(i + 1) * 32].hex() for i in range(m)]
        lab = rng.integers(0, 2, m) if not image_paths else np.zeros(m, int)  # files live under real/
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)
        cols["label"] = np.where(lab == 1, "fake", "real").tolist()
        cols["generator"] = [GENS[g] if lab_ else "" for g, lab_ in zip(rng.integers(0, 4, m), lab)]
        t = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def make_images(folder: str, n: int, seed: int) -> list[str]:
    """n small distinct PNG files."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = os.path.join(folder, f"{i:05d}.png")
        if not os.path.exists(p):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


_RERUN = (
    "import sys, time\n"
    "from clipdet.extract import extract\n"
    "from clipdet.extract import discover\n"
    "t0 = time.perf_counter()\n"
    "refs = discover([sys.argv[1]])\n"
    "s = extract(refs, sys.argv[3], cache=sys.argv[2], quiet=True, rehash=len(sys.argv) > 4)\n"
    "dt = time.perf_counter() - t0\n"
    "print(len(refs), s.cached, s.new, dt)\n"
)


def rerun_rate(work: str, n: int, cache: str, env: dict, rehash: bool = False) -> tuple[float, int]:
    """Files/s of discover + extract over `n` unchanged, cached files (in-process, model never loaded)."""
    out = subprocess.run([sys.executable, "-c", _RERUN, work, cache, BACKBONE] + (["rehash"] if rehash else []),
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    cached, new, dt = int(out[1]), int(out[2]), float(out[3])
    if cached != n or new:
        raise SystemExit(f"rerun: expected {n} cached files, got {cached} cached, {new} new")
    return n / dt, n


def median_of(k: int, args: list[str], env: dict, before=None) -> tuple[float, float]:
    times, rss = [], []
    for _ in range(k):
        if before:
            before()
        t, r, rc = run(args, env)
        if rc not in (0, 1):
            raise SystemExit(f"failed ({rc}): clipdet {' '.join(args)}")
        times.append(t)
        rss.append(r)
    return statistics.median(times), max(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--work", default="/tmp/cache-scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cache_scale.md")
    ap.add_argument("--rerun-files", type=int, default=20_000, help="unchanged files for the stat-index re-run")
    a = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("CLIPDET_CACHE", None)
    os.makedirs(a.work, exist_ok=True)
    scored = make_images(os.path.join(a.work, "scored", "real"), 1000, 1)
    rows = {}
    for n in a.sizes:
        d = os.path.join(a.work, f"n{n}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        cache = os.path.join(d, "cache", "clipdet.h5")
        pq_main, pq_scored = os.path.join(d, "main.parquet"), os.path.join(d, "scored.parquet")
        make_parquet(pq_main, n - 1000, seed=n)
        make_parquet(pq_scored, 1000, seed=7, image_paths=scored)
        t_imp, rss_imp, _ = run(["cache", "import", pq_main, "-b", BACKBONE, "-c", cache], env)
        run(["cache", "import", pq_scored, "-b", BACKBONE, "-c", cache], env)
        r = {"import_s": t_imp, "import_rows_s": (n - 1000) / t_imp, "import_rss": rss_imp,
             "size_mb": sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.dirname(cache))
                            for f in fs) / 1e6}
        r["info"] = median_of(a.repeats, ["cache", "info", "--json", "-c", cache], env)
        for h in HEADS:
            r[f"fit_{h}"] = median_of(a.repeats, ["fit", "--head", h, "--shots", "10", "-c", cache, "-q",
                                                  "--out", os.path.join(d, f"{h}.clipdet")], env)
        r["score"] = median_of(a.repeats, ["score", os.path.dirname(scored[0]), "--detector",
                                           os.path.join(d, "svm.clipdet"), "-c", cache, "-q",
                                           "--out", os.path.join(d, "scores.csv")], env)
        new = os.path.join(d, "new")

        def fresh_images(new=new):
            shutil.rmtree(new, ignore_errors=True)
            make_images(new, 8, seed=int(time.time_ns() % 2**31))

        r["extract8"] = median_of(a.repeats, ["extract", new, "-b", BACKBONE, "-c", cache, "-q"], env,
                                  before=fresh_images)
        if n == max(a.sizes) and a.rerun_files:
            files = make_images(os.path.join(a.work, "rerun", "real"), a.rerun_files, 3)
            old = time.time() - 3600
            for f in files:
                os.utime(f, (old, old))
            pq_re = os.path.join(d, "rerun.parquet")
            make_parquet(pq_re, len(files), seed=11, image_paths=files)
            run(["cache", "import", pq_re, "-b", BACKBONE, "-c", cache], env)
            root = os.path.join(a.work, "rerun")
            r["rehash_files_s"] = statistics.median(rerun_rate(root, len(files), cache, env, rehash=True)[0]
                                                    for _ in range(a.repeats))  # also records the stat index
            r["rerun_files_s"] = statistics.median(rerun_rate(root, len(files), cache, env)[0]
                                                   for _ in range(a.repeats))
        rows[n] = r
        print(n, {k: v for k, v in r.items()}, flush=True)
    write_report(a, rows)


def write_report(a, rows: dict) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    bf16 = "native bf16 (avx512_bf16)" if native else "no native bf16 (AVX2 only)"
    sizes = sorted(rows)
    lines = [
        "# Feature cache scale: command cost vs cache size",
        "",
        f"Command: `{' '.join([sys.executable.split('/')[-1], *sys.argv])}`",
        f"Machine: {os.cpu_count()} cores, {cpu}, {bf16}; Python {platform.python_version()}.",
        "Synthetic ViT-B-32 caches (512-d random unit vectors, `ViT-B-32:random`): speed only — "
        "random weights say nothing about detection quality.",
        f"Each figure: median of {a.repeats} whole-process runs (interpreter start included), peak RSS (max).",
        "",
        "| command | " + " | ".join(f"{n:,} images" for n in sizes) + " | slope 100 k → 1 M |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]

    def cell(v):
        return f"{v[0]:.2f} s, {v[1]:.0f} MB"

    names = [("info", "`cache info --json`")] + [(f"fit_{h}", f"`fit --head {h} --shots 10`") for h in HEADS] + \
        [("extract8", "`extract` of 8 new images"), ("score", "`score` of 1,000 cached files")]
    for k, label in names:
        slope = ""
        if 100_000 in rows and 1_000_000 in rows:
            slope = f"{rows[1_000_000][k][0] / rows[100_000][k][0]:.2f}×"
        lines.append(f"| {label} | " + " | ".join(cell(rows[n][k]) for n in sizes) + f" | {slope} |")
    lines.append("| `cache import` (rows/s, peak RSS) | " + " | ".join(
        f"{rows[n]['import_rows_s']:,.0f} rows/s, {rows[n]['import_rss']:.0f} MB" for n in sizes) + " | |")
    big = rows[max(sizes)]
    if "rerun_files_s" in big:
        lines.append(f"| re-run over {a.rerun_files:,} unchanged cached files (discover + extract, in-process) "
                     f"at {max(sizes):,} | stat index: {big['rerun_files_s']:,.0f} files/s; `--rehash`: "
                     f"{big['rehash_files_s']:,.0f} files/s | |" + " |" * (len(sizes) - 1))
    lines.append("| size on disk | " + " | ".join(f"{rows[n]['size_mb']:.0f} MB" for n in sizes) + " | |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
