"""A randomized sequence of writes, merges, SIGKILLed writers and mergers, and concurrent readers;
after every step no image is lost or duplicated and every embedding reads back bit-identical."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from clipdet.cache import FeatureCache, FeatureRows, ImageMeta

KEY, DIM = "K", 16
ATTRS = {"backbone": {"spec": "x", "arch": "x", "weights_id": "w", "preprocess": {}}, "layers": [], "dim": DIM}


def sha_of(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def batch(tag: str, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [sha_of(f"{tag}-{i}") for i in range(n)], x.astype(np.float16)


WRITER = """
import sys, json, hashlib, numpy as np
sys.path.insert(0, sys.argv[5])
from test_cache_random import batch, ATTRS, KEY
from clipdet.cache import FeatureCache, FeatureRows, ImageMeta
fc = FeatureCache(sys.argv[1])
for b in range(int(sys.argv[3])):
    shas, x = batch(f"{sys.argv[2]}-{b}", int(sys.argv[4]), b)
    fc.write_shard({(KEY, "clean"): (FeatureRows(shas, x), ATTRS)}, images=[ImageMeta(s, "real") for s in shas])
fc.compact()
"""
MERGER = "import sys; from clipdet.cache import FeatureCache; FeatureCache(sys.argv[1]).compact(full=True)"


def check(path: str, model: dict[str, np.ndarray]) -> None:
    fc = FeatureCache(path)
    rows = fc.load(KEY, "clean")
    assert len(rows.sha256) == len(set(rows.sha256)), "duplicated image"
    lost, extra = set(model) - set(rows.sha256), set(rows.sha256) - set(model)
    assert not lost and not extra, f"lost {len(lost)}, extra {len(extra)}"
    if model:
        want = np.stack([model[s] for s in rows.sha256]).astype(np.float32)
        assert np.array_equal(rows.embedding, want), "an embedding changed"
    assert len(fc.cached_shas(KEY, "clean")) == len(model)
    assert fc.info()["images"] == len(model)


def _reader(path: str, floor: set, stop: threading.Event, problems: list) -> None:
    fc = FeatureCache(path)
    while not stop.is_set():
        try:
            rows = fc.load(KEY, "clean")
            s = set(rows.sha256)
            if len(s) != len(rows.sha256):
                problems.append("duplicate during merge")
            if not floor <= s:
                problems.append(f"reader lost {len(floor - s)} rows")
        except Exception as e:  # noqa: BLE001
            problems.append(repr(e))
        time.sleep(0.002)


@pytest.mark.slow
def test_randomized_writes_merges_kills_and_readers(tmp_path, subprocess_env):
    rng = np.random.default_rng(1234)
    path = str(tmp_path / "c" / "clipdet.h5")
    fc = FeatureCache(path)
    model: dict[str, np.ndarray] = {}
    here = os.path.dirname(__file__)
    step_kinds = []
    for step in range(36):
        kind = rng.choice(["write", "write", "overlap", "compact", "full", "kill_writer", "kill_merger"])
        step_kinds.append(kind)
        if kind in ("write", "overlap"):
            shas, x = batch(f"s{step}", int(rng.integers(1, 40)), step)
            if kind == "overlap" and model:  # rows already cached get other vectors: the first one stays
                old = list(model)[: int(rng.integers(1, min(10, len(model)) + 1))]
                shas += old
                x = np.vstack([x, -np.stack([model[s] for s in old])])
            fc.write_shard({(KEY, "clean"): (FeatureRows(shas, x), ATTRS)},
                           images=[ImageMeta(s, "fake", "g") for s in shas])
            for s, v in zip(shas, x):
                model.setdefault(s, v)
        elif kind == "compact":
            fc.compact()
        elif kind == "full":
            fc.compact(full=True)
        else:
            floor = set(model)
            stop, problems = threading.Event(), []
            reader = threading.Thread(target=_reader, args=(path, floor, stop, problems))
            reader.start()
            try:
                if kind == "kill_writer":
                    n_b, per = 12, 20
                    args = [sys.executable, "-c", WRITER, path, f"w{step}", str(n_b), str(per), here]
                else:
                    args = [sys.executable, "-c", MERGER, path]
                proc = subprocess.Popen(args, env=subprocess_env)
                time.sleep(float(rng.uniform(0.3, 1.6)))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            finally:
                stop.set()
                reader.join()
            assert not problems, problems
            if kind == "kill_writer":  # each batch landed whole or not at all
                have = FeatureCache(path).cached_shas(KEY, "clean")
                for b in range(n_b):
                    shas, x = batch(f"w{step}-{b}", per, b)
                    present = [s in have for s in shas]
                    assert all(present) or not any(present), f"batch {b} landed partly"
                    if all(present):
                        for s, v in zip(shas, x):
                            model.setdefault(s, v)
        check(path, model)
    assert {"kill_writer", "kill_merger", "full"} <= set(step_kinds)
    fc.compact(full=True)
    check(path, model)
    assert len(FeatureCache(path).segments()) == 1
    assert not [n for n in os.listdir(path + ".d") if n.endswith(".tmp") or (n.startswith("mrg-") and
                 os.path.join(path + ".d", n) not in FeatureCache(path).segments())]
    json.dumps(FeatureCache(path).info())
