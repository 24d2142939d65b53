"""`clipdet serve` under load: throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, against
offline `clipdet score` over the same images on the same machine.

    python benchmarks/serve_load.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random --n 256 \\
        --out benchmarks/results/serve_load_cpu.md

Steps (all in a temporary folder; the images are read in place, never copied):
1. fit a knn detector (--shots 10) on reference images that are not among the N benchmark images;
2. offline: `clipdet score` over the N images with an empty cache (every image embedded), timed as a
   process; also the same command on 1 image, so model loading and start-up can be told apart
   ("steady" = (N - 1) / (T_N - T_1));
3. online: `clipdet serve` (no cache: every request embeds its image), warmed up, then N requests of
   one image each at every concurrency level; client-side latency per request.
The load generator runs on the same machine and takes some CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_speed import _cpu_name  # noqa: E402


def _cpu_flags() -> str:
    """'native bf16 (avx512_bf16/amx)' or 'AVX2 only' etc., from /proc/cpuinfo."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if bf16:
        return f"native bf16 ({', '.join(bf16)})"
    return "AVX2 only, no native bf16" if "avx2" in flags else "no AVX2"


def _pick(data: str, n: int, shots: int) -> tuple[list[str], list[str]]:
    """(benchmark images, reference images): every k-th manifest row, disjoint sets, both labels."""
    with open(os.path.join(data, "manifest.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    step = max(1, len(rows) // (n + 4 * shots))
    chosen = rows[::step]
    real = [r for r in chosen if r["label"] == "real"]
    fake = [r for r in chosen if r["label"] == "fake"]
    refs = real[:shots * 2] + fake[:shots * 2]
    rest = [r for r in chosen if r not in refs][:n]
    full = lambda r: os.path.join(os.path.abspath(data), r["path"])  # noqa: E731
    return [full(r) for r in rest], [full(r) for r in refs]


def _run(cmd: list[str], env: dict, stdin: str | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, input=stdin, text=True, env=env, capture_output=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return dt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, blobs: list[tuple[str, bytes]], clients: int) -> dict:
    import httpx

    lat: list[float] = []
    failures = 0
    todo = list(range(len(blobs)))

    async def client(http):
        nonlocal failures
        while todo:
            name, data = blobs[todo.pop()]
            t0 = time.perf_counter()
            r = await http.post("/v1/score", files=[("files", (name, data, "application/octet-stream"))])
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200 or r.json()["results"][0]["error"]:
                failures += 1

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]  # noqa: E731
    return {"clients": clients, "requests": len(lat), "failures": failures, "seconds": wall,
            "images_per_s": len(lat) / wall, "p50_ms": 1000 * q(0.50), "p99_ms": 1000 * q(0.99),
            "mean_ms": 1000 * statistics.fmean(lat)}


def main() -> None:
    """Run the benchmark; print and write Markdown + JSON with the exact command and machine."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/aigi-dev")
    ap.add_argument("--backbone", default="ViT-B-32:random")
    ap.add_argument("--n", type=int, default=256, help="benchmark images (each sent once per concurrency level)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    clipdet = [sys.executable, "-m", "clipdet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    images, refs = _pick(a.data, a.n, a.shots)
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        det, ref_cache = os.path.join(tmp, "det.clipdet"), os.path.join(tmp, "refs.h5")
        manifest = os.path.join(tmp, "refs.csv")
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([p, "real" if "/real/" in p else "fake"] for p in refs)
        _run(clipdet + ["extract", "--manifest", manifest, "-b", a.backbone, "-c", ref_cache, "-q"], env)
        _run(clipdet + ["fit", "-b", a.backbone, "-c", ref_cache, "--head", "knn", "--shots", str(a.shots),
                        "-o", det, "-q"], env)

        offline = []
        for paths in ([images[0]], images):
            cache = os.path.join(tmp, f"offline-{len(paths)}.h5")
            offline.append(_run(clipdet + ["score", "-", "-d", det, "-c", cache, "-o", os.path.join(tmp, "s.csv"),
                                           "-q"], env, stdin="\n".join(paths) + "\n"))
        t1, tn = offline
        off = {"images": len(images), "seconds": tn, "images_per_s": len(images) / tn,
               "steady_images_per_s": (len(images) - 1) / (tn - t1), "one_image_seconds": t1}

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(os.path.join(tmp, "serve.log"), "wb")  # noqa: SIM115
        proc = subprocess.Popen(clipdet + ["serve", "-d", det, "--port", str(port), "--max-wait-ms",
                                           str(a.max_wait_ms)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise SystemExit("server exited: " + open(log.name).read()[-800:])
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            ready_s = time.perf_counter() - t0
            blobs = [(os.path.basename(p), open(p, "rb").read()) for p in images]
            asyncio.run(_load(url, blobs[:16], 4))  # warm-up
            online = [asyncio.run(_load(url, blobs, int(c))) for c in a.clients.split(",")]
            metrics = httpx.get(url + "/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    bcount = float(metrics.split("clipdet_batch_size_count ")[1].split()[0])
    bsum = float(metrics.split("clipdet_batch_size_sum ")[1].split()[0])

    info = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": _cpu_name(), "cpu_bf16": _cpu_flags(),
            "platform": platform.platform(), "backbone": a.backbone, "n": len(images),
            "server_ready_seconds": ready_s, "mean_batch_size_all_levels": bsum / bcount}
    lines = ["# clipdet serve under load", "",
             f"`{info['command']}`", "",
             f"Machine: {info['processor']} ({info['cpu_bf16']}), {info['cpus']} CPUs, {info['platform']}; "
             f"Python {info['python']}. Backbone {a.backbone} (**random weights**: speed only; the verdicts mean "
             f"nothing), knn head, {len(images)} images from {a.data} read in place, precision auto. The load "
             "generator shares the machine with the server.", "",
             "| mode | clients | images/s | p50 ms | p99 ms | failures | vs offline steady |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| offline `clipdet score` (process, start-up + model load included) | – | {off['images_per_s']:.1f} "
             f"| – | – | 0 | {off['images_per_s'] / off['steady_images_per_s']:.0%} |",
             f"| offline `clipdet score`, steady ((N-1)/(T_N-T_1)) | – | {off['steady_images_per_s']:.1f} | – | – "
             "| 0 | 100% |"]
    for r in online:
        lines.append(f"| serve, 1 image per request | {r['clients']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} "
                     f"| {r['p99_ms']:.0f} | {r['failures']} | {r['images_per_s'] / off['steady_images_per_s']:.0%} |")
    lines += ["", f"Server ready (model loaded) {ready_s:.1f} s after start; mean model batch over all levels "
              f"{bsum / bcount:.1f} images; offline `clipdet score` of one image takes {t1:.1f} s (start-up)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"info": info, "offline": off, "online": online}, f, indent=1)


if __name__ == "__main__":
    main()
