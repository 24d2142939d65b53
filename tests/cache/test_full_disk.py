"""A real full disk (a 1 MB tmpfs) under the cache: one clean error, nothing half-written, and the
next run completes once there is space. Needs root (mount); skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tmpfs_mount
from PIL import Image

from clipdet.cache import FeatureCache


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs_mount(tmp_path / "mnt", "1m") as mnt:
        yield mnt


@pytest.mark.slow
def test_extract_onto_a_full_disk(small_tmpfs, tmp_path, tiny_spec, subprocess_env):
    data = tmp_path / "data" / "real"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(data / f"{i}.jpg", quality=90)
    cache = str(small_tmpfs / "cache" / "clipdet.h5")
    args = [sys.executable, "-m", "clipdet", "extract", str(tmp_path / "data"), "-b", tiny_spec, "-c", cache,
            "--batch-size", "8", "--workers", "1", "-q"]
    r = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)  # not 139 (segfault), not a traceback
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("clipdet: error")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and str(small_tmpfs) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    seg_dir = cache + ".d"
    live = FeatureCache(cache).segments()  # a committed merge keeps its mrg- name
    assert not [n for n in os.listdir(seg_dir) if n.endswith(".tmp") or (n.startswith("mrg-") and
                                                                     os.path.join(seg_dir, n) not in live)]
    kept = FeatureCache(cache).cached_shas(FeatureCache(cache).groups()[0].key, "clean")
    assert len(kept) >= 8 and len(kept) % 8 == 0  # every completed batch is kept
    # space freed: the next run completes and embeds only what is missing
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    r = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"300 images: {len(kept)} cached, {300 - len(kept)} new" in r.stdout


@pytest.mark.slow
def test_score_with_a_read_only_cache(small_tmpfs, tmp_path, tiny_spec, subprocess_env, make_image):
    """A cache on a read-only mount: uncached images are embedded in memory and scored, nothing written,
    with a warning (and --cache-readonly says the same explicitly)."""
    refs = tmp_path / "refs"
    for i in range(3):
        make_image(refs / "real" / f"r{i}.png", seed=i)
        make_image(refs / "fake" / "g" / f"f{i}.png", seed=10 + i)
    new = tmp_path / "new"
    for i in range(3):
        make_image(new / f"n{i}.png", seed=50 + i)
    cache = str(small_tmpfs / "clipdet.h5")
    det = str(tmp_path / "d.clipdet")
    cli = [sys.executable, "-m", "clipdet"]
    r = subprocess.run(cli + ["fit", str(refs), "-b", tiny_spec, "-c", cache, "--shots", "all", "--out", det, "-q"],
                       env=subprocess_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    before = sorted(os.listdir(small_tmpfs)) + sorted(os.listdir(cache + ".d"))
    for extra in ([], ["--cache-readonly"]):
        out = tmp_path / f"s{len(extra)}.csv"
        r = subprocess.run(cli + ["score", str(new), str(refs), "-d", det, "-c", cache, "--out", str(out)] + extra,
                           env=subprocess_env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "Permission denied" not in r.stderr
        if not extra:
            assert "not writable" in r.stderr
        import csv

        rows = list(csv.DictReader(open(out)))
        assert len(rows) == 9 and all(row["error"] == "" and row["score"] for row in rows)
    assert sorted(os.listdir(small_tmpfs)) + sorted(os.listdir(cache + ".d")) == before
