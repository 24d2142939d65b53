"""The text tower: caption encoding speed, memory of image-only runs, and `clipdet bench` rows with text.

    python benchmarks/text_tower.py --data ../shared/data/aigi-dev --backbone ViT-B-32:random \
        --baseline-src /tmp/clipdet-main --out benchmarks/results/text_tower_cpu.md

1. Speed: captions/s of the text tower (fp32, CPU) at batch 64 and 256 on 1,024 distinct captions
   (median of --repeats runs, tower built outside the timed region), and captions/s of a second run of
   `TextEmbedder.embed` over the same captions (all cached: nothing is encoded).
2. Memory: peak RSS (VmHWM) of whole `clipdet extract` processes (image only) on the first --rss-n
   images, with this tree and with `--baseline-src` (a copy of the code before the text tower, e.g.
   `git archive main | tar -x -C /tmp/clipdet-main`), and of `clipdet fit --head zeroshot --shots 0`
   (text tower only). Median of --repeats runs each, interleaved.
3. Quality mechanics: `clipdet bench --protocol kshot` for the zeroshot head (K = 0 and calibrated K)
   and for logreg/centroid with --features image, image+text and residual. aigi-dev has no captions;
   they are made from the manifest's `source_path` file name (see `caption_for`): random weights, so
   these rows show the mechanics work, and say nothing about detection quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Words that would name the label or the generator: left out of the captions made from file names.
LEAKY = {"real", "fake", "generated", "gen", "synthetic", "origin", "original", "img", "image", "images",
         "tile", "output", "sample", "samples", "ranking", "kodim", "webp", "png", "jpg", "jpeg"}


def caption_for(row: dict, generators: set[str]) -> str:
    """'a photo of <words>' from the file name of `source_path`: letters-only words of 3+ characters,
    lower-cased, without words naming a label, a generator (any of `generators`, split the same way) or
    a file format; 'a photo' when no word is left (e.g. every CNNDetection file: '94_crn_real.jpg')."""
    base = os.path.splitext(os.path.basename(row.get("source_path") or row["path"]).split("#")[0])[0]
    words = [w.lower() for w in re.split(r"[^A-Za-z]+", base) if len(w) >= 3]
    gen_words = {w for g in generators for w in re.split(r"[^a-z]+", g.lower()) if w}
    keep = [w for w in words if w not in LEAKY and w not in gen_words]
    return "a photo of " + " ".join(keep) if keep else "a photo"


def captioned_manifest(data: str, out: str) -> tuple[str, dict]:
    """A copy of `data`/manifest.csv with absolute paths and a caption column; returns (path, stats)."""
    src = os.path.join(data, "manifest.csv")
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    gens = {r["generator"] for r in rows if r.get("generator")}
    caps = [caption_for(r, gens) for r in rows]
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator", "caption"])
        for r, c in zip(rows, caps):
            w.writerow([os.path.join(os.path.abspath(data), r["path"]), r["label"], r.get("generator", ""), c])
    by_label: dict[str, set] = {}
    for r, c in zip(rows, caps):
        by_label.setdefault(r["label"], set()).add(c)
    stats = {"images": len(rows), "distinct_captions": len(set(caps)),
             "plain_a_photo": sum(c == "a photo" for c in caps),
             "distinct_by_label": {k: len(v) for k, v in by_label.items()},
             "shared_between_labels": len(by_label.get("real", set()) & by_label.get("fake", set())),
             "examples": sorted(set(caps))[:8]}
    return out, stats


# ------------------------------------------------------------------------------------------ speed
def speed(spec: str, captions: list[str], repeats: int) -> list[dict]:
    """captions/s of open_clip's full-context encode_text, of clipdet's tower at two batch sizes, and of
    a fully cached TextEmbedder run; the modes are interleaved in each repeat (a busy machine slows
    them alike) and each reports its median."""
    import torch

    sys.path.insert(0, HERE)
    from clipdet.backbones import create_text_tower
    from clipdet.text import TextEmbedder

    tower = create_text_tower(spec, device="cpu")
    full = captions[:256]  # open_clip's encode_text over the whole context: the reference, on fewer captions
    tmp = tempfile.mkdtemp(prefix="text-speed-")
    cache = os.path.join(tmp, "t.h5")
    TextEmbedder(spec, cache=cache, tower=tower).embed(captions)  # fills the cache for the cached mode

    def open_clip_full():
        with torch.inference_mode():
            for i in range(0, len(full), 64):
                tower.model.encode_text(tower.tokenize(full[i:i + 64]))

    def cached():
        again = TextEmbedder(spec, cache=cache)  # a new run: the cache only, no tower
        again.embed(captions)
        assert again.encoded == 0 and again._tower is None

    modes = [("open_clip encode_text, full context, batch 64", len(full), open_clip_full),
             ("clipdet text tower, batch 64", len(captions), lambda: tower.encode(captions, batch_size=64)),
             ("clipdet text tower, batch 256", len(captions), lambda: tower.encode(captions, batch_size=256)),
             ("TextEmbedder, all cached (no model)", len(captions), cached)]
    tower.encode(captions[:64])  # warm-up
    times: dict[str, list[float]] = {m[0]: [] for m in modes}
    for _ in range(repeats):
        for name, _n, fn in modes:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    return [{"mode": name, "captions": n, "median_s": statistics.median(times[name]),
             "captions_per_s": n / statistics.median(times[name]), "threads": torch.get_num_threads()}
            for name, n, _ in modes]


def run_clipdet(src: str, args: list[str], stdin_file: str | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS MB, exit code) of one clipdet command from source tree `src`, in a fresh process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cache_scale import run

    return run(args, dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1"), cwd=src, stdin_file=stdin_file)


def memory(spec: str, images: list[str], baseline: str | None, repeats: int) -> list[dict]:
    """Peak RSS of image-only extract (this tree vs baseline) and of a text-only zero-shot fit."""
    cases = [("extract (image only), this tree", HERE, "extract")]
    if baseline:
        cases.insert(0, ("extract (image only), before the text tower", baseline, "extract"))
    cases.append(("fit --head zeroshot --shots 0 (text tower only)", HERE, "zeroshot"))
    got: dict[str, list] = {c[0]: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        lst = os.path.join(tmp, "list.txt")
        with open(lst, "w") as f:
            f.write("\n".join(images) + "\n")
        for r in range(repeats):
            for name, src, kind in cases:
                cache = os.path.join(tmp, f"c{r}-{abs(hash(name))}.h5")
                if kind == "extract":
                    args = ["extract", "-b", spec, "-c", cache, "--device", "cpu", "-q", "-"]
                    dt, mb, rc = run_clipdet(src, args, stdin_file=lst)
                else:
                    args = ["fit", "--head", "zeroshot", "--shots", "0", "-b", spec, "-c", cache, "--device", "cpu",
                            "-o", os.path.join(tmp, "zs.clipdet"), "-q"]
                    dt, mb, rc = run_clipdet(src, args)
                if rc != 0:
                    raise SystemExit(f"{name}: exit code {rc}")
                got[name].append((dt, mb))
    return [{"case": n, "runs": len(v), "median_s": statistics.median(x[0] for x in v),
             "peak_rss_mb": statistics.median(x[1] for x in v)} for n, v in got.items()]


# ------------------------------------------------------------------------------------------ bench
def bench_runs(spec: str, manifest: str, cache: str, out_dir: str, ks: str, seeds: int) -> list[dict]:
    """`clipdet bench --protocol kshot` for zeroshot and for trained heads on each --features."""
    runs = [("zeroshot", ["--heads", "zeroshot", "--features", "image"]),
            ("image", ["--heads", "logreg,centroid", "--features", "image"]),
            ("image+text", ["--heads", "logreg,centroid", "--features", "image+text"]),
            ("residual", ["--heads", "logreg,centroid", "--features", "residual"])]
    rows = []
    for name, extra in runs:
        dest = os.path.join(out_dir, name.replace("+", "-"))
        args = ["bench", "--manifest", manifest, "--protocol", "kshot", "--ks", ks, "--seeds", str(seeds),
                "-b", spec, "-c", cache, "--device", "cpu", "--out", dest, "-q"] + extra
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "clipdet"] + args, cwd=HERE, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=HERE, HF_HUB_OFFLINE="1"))
        if p.returncode not in (0, 1):
            raise SystemExit(f"bench {name} failed: {p.stderr.strip()[-2000:]}")
        for f in os.listdir(dest):  # keep the tables and the run record
            if not f.startswith("kshot") and f != "run.json":
                os.remove(os.path.join(dest, f))
        with open(os.path.join(dest, "kshot_summary.csv"), newline="") as f:
            for r in csv.DictReader(f):
                rows.append({"features": name, "head": r["head"], "k": int(r["k"]), "n": int(r["n"]),
                             "auc_mean": float(r["auc_mean"]), "auc_ci95": r["auc_ci95"],
                             "accuracy_mean": float(r["accuracy_mean"])})
        rows[-1]["_seconds"] = time.perf_counter() - t0
        rows[-1]["_command"] = "clipdet " + " ".join(args)
    return rows


def caption_alignment(manifest: str, cache: str) -> dict:
    """|cos(image, caption)| over the benchmark's images (from the cache): how far `residual` moves them."""
    import numpy as np

    from clipdet.cache import FeatureCache
    from clipdet.extract.decode import read_file, sha256_bytes
    from clipdet.text import TEXT_VIEW, text_sha

    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    fc = FeatureCache(cache)
    key = next(g.key for g in fc.groups(count=False) if g.view == TEXT_VIEW)
    img = fc.load(key, "clean", shas=[sha256_bytes(read_file(r["path"])) for r in rows])
    txt = fc.load(key, TEXT_VIEW, shas=[text_sha(r["caption"]) for r in rows])
    cos = np.abs(np.sum(img.embedding * txt.embedding, axis=1)) if len(img.sha256) == len(txt.sha256) else np.zeros(0)
    return {"n": int(len(cos)), "mean_abs_cos": float(cos.mean()) if len(cos) else None,
            "max_abs_cos": float(cos.max()) if len(cos) else None}


def machine() -> dict:
    """CPU model, bf16 support, core count, versions."""
    import torch

    name, flags = "unknown CPU", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split()
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": name, "cpus": os.cpu_count(), "bf16": f"native bf16 ({', '.join(bf16)})" if bf16 else
            ("AVX2 only, no native bf16" if "avx2" in flags else "no AVX2"),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "shared", "data", "aigi-dev"))
    ap.add_argument("--backbone", default="ViT-B-32:random")
    ap.add_argument("--baseline-src", default=None, help="source tree of clipdet before the text tower")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-n", type=int, default=128)
    ap.add_argument("--ks", default="1,5,20")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the benchmark's cache (default: a temp folder)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed, memory, bench")
    ap.add_argument("--out", default=os.path.join(HERE, "benchmarks", "results", "text_tower_cpu.md"))
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    sys.path.insert(0, HERE)
    work = a.work or tempfile.mkdtemp(prefix="text-tower-")
    os.makedirs(work, exist_ok=True)
    manifest, cap_stats = captioned_manifest(a.data, os.path.join(work, "manifest-captions.csv"))
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    distinct = sorted({r["caption"] for r in rows})
    # 1,024 distinct captions: the dataset's own, then numbered variants of them
    speed_caps = (distinct + [f"{c}, number {i}" for i in range(2000) for c in distinct])[:1024]
    res: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(), "backbone": a.backbone,
                 "captions": cap_stats}
    old = os.path.splitext(a.out)[0] + ".json"
    if skip and os.path.exists(old):  # parts not run this time keep their earlier results and command
        with open(old) as f:
            prev = json.load(f)
        for part in skip & {"speed", "memory", "bench"}:
            if part in prev:
                res[part] = prev[part]
                if part == "bench" and "alignment" in prev:
                    res["alignment"] = prev["alignment"]
                res.setdefault("commands", {})[part] = prev.get("commands", {}).get(part, prev["command"])
    for part in {"speed", "memory", "bench"} - skip:
        res.setdefault("commands", {})[part] = res["command"]
    if "speed" not in skip:
        res["speed"] = speed(a.backbone, speed_caps, a.repeats)
    if "memory" not in skip:
        res["memory"] = memory(a.backbone, [r["path"] for r in rows][:a.rss_n], a.baseline_src, a.repeats)
    if "bench" not in skip:
        bench_dir = os.path.join(os.path.dirname(a.out), "text-tower-vitb32-random")
        shutil.rmtree(bench_dir, ignore_errors=True)
        os.makedirs(bench_dir)
        res["bench"] = bench_runs(a.backbone, manifest, os.path.join(work, "cache.h5"), bench_dir, a.ks, a.seeds)
        res["alignment"] = caption_alignment(manifest, os.path.join(work, "cache.h5"))
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(a.out, "w") as f:
        f.write(report(res))
    print(report(res))


def report(res: dict) -> str:
    """The Markdown results page."""
    m = res["machine"]
    cmds = res.get("commands", {})
    head = sorted(set(cmds.values())) or [res["command"]]
    lines = ["# Text tower", ""] + [f"`{c}`" + (f" ({', '.join(p for p in cmds if cmds[p] == c)})" if cmds else "")
                                    for c in head] + ["",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['bf16']}; {m['platform']}; Python {m['python']}, "
             f"torch {m['torch']}. Backbone {res['backbone']} (RANDOM weights: speed and memory stand; the "
             "bench rows show the mechanics only and say nothing about detection). The 2 cores were shared "
             "with other processes during these runs: compare ratios within one table, not absolute rates.", ""]
    if "speed" in res:
        lines += ["## Caption encoding (text tower, fp32, CPU)", "", "| mode | captions | seconds (median) | "
                  "captions/s | torch threads |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['mode']} | {r['captions']} | {r['median_s']:.3f} | {r['captions_per_s']:.0f} | "
                  f"{r['threads']} |" for r in res["speed"]]
        lines.append("")
    if "memory" in res:
        lines += ["## Peak memory of whole processes", "", "| case | runs | seconds (median) | peak RSS MB (median) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['runs']} | {r['median_s']:.1f} | {r['peak_rss_mb']:.0f} |"
                  for r in res["memory"]]
        lines.append("")
    c = res["captions"]
    lines += ["## Captions made for aigi-dev", "",
              "aigi-dev has no captions. Each image's caption is `a photo of <words>`, the words being the "
              "letters-only parts (3+ letters, lower-cased) of the file name in the manifest's `source_path`, "
              "without words naming a label (real, fake, generated, ...), a generator (every manifest generator "
              "name, split on non-letters), or a file format; `a photo` when no word is left "
              "(benchmarks/text_tower.py `caption_for`).",
              f"{c['images']} images, {c['distinct_captions']} distinct captions, {c['plain_a_photo']} plain "
              f"`a photo`; distinct per label {c['distinct_by_label']}, {c['shared_between_labels']} shared by "
              "both labels. The words come from the source collections (ImageNet class names for its reals, "
              "prompt-like file names for some fakes), so captions differ in kind between sources: with "
              "pretrained weights that could itself be a shortcut; here it is mechanics only.",
              "Examples: " + "; ".join(f"`{e}`" for e in c["examples"]), ""]
    if "bench" in res:
        lines += ["## clipdet bench --protocol kshot (random weights: mechanics only)", "",
                  "| features | head | K | fits | AUC (mean) | AUC 95% half-width | accuracy (mean) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["bench"]:
            ci = float(r["auc_ci95"]) if r["auc_ci95"] not in ("", None) else float("nan")
            lines.append(f"| {r['features']} | {r['head']} | {r['k']} | {r['n']} | {r['auc_mean']:.3f} | "
                         f"{'n/a' if ci != ci else f'{ci:.3f}'} | {r['accuracy_mean']:.3f} |")
        al = res.get("alignment") or {}
        if al.get("n"):
            lines += ["", f"Over the {al['n']} images, |cos(image, caption)| is {al['mean_abs_cos']:.4f} on average "
                      f"(max {al['max_abs_cos']:.4f}): with random weights captions are almost orthogonal to the "
                      "images, so `residual` barely moves the image embeddings and its rows almost equal the "
                      "`image` rows; `image+text` adds the caption half, which here carries the source-dependent "
                      "file-name words, not anything learned."]
        lines += ["", "Commands (per-seed rows and run records in `text-tower-vitb32-random/`):", ""]
        lines += [f"- `{r['_command']}` ({r['_seconds']:.0f} s)" for r in res["bench"] if "_command" in r]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
