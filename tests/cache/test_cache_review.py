"""Regressions from a review of the segment cache: damaged layer rows, 64-bit key collisions, merges over
damaged rows, repairs keeping conflicts, kill windows around a merge's catalogue swap, racy stat entries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from test_cache import KEY, attrs, emb, sha, shard

from clipdet.cache import FeatureCache, FeatureRows, ImageMeta


def _flip(path: str, dataset: str, offset: int = 4) -> None:
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + offset)
        b = fh.read(1)
        fh.seek(off + offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_damaged_layer_rows_are_damaged_rows(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    p = shard(fc, [1, 2, 3], layers=(1, 0))
    _flip(p, f"features/{KEY}/clean/layers")
    fresh = FeatureCache(fc.path)
    with pytest.warns(UserWarning, match="damaged"):
        r = fresh.load(KEY, "clean", shas=[sha(i) for i in (1, 2, 3)], with_layers=True)
    assert r.sha256 == [] and fresh.damaged == {sha(1), sha(2), sha(3)}  # never zeros handed on as tokens


def test_64_bit_key_collision_keeps_labels_right(tmp_path):
    """Two digests with the same search key (their 8-byte words swapped) among many others."""
    fc = FeatureCache(tmp_path / "c.h5")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 32, dtype=np.uint8)
    b = np.concatenate([a[8:16], a[:8], a[16:]])  # XOR of the four words is the same
    others = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(200)]
    shas = [bytes(a).hex(), bytes(b).hex()] + others
    x = emb(range(len(shas)))
    labels = ["real" if i % 2 else "fake" for i in range(len(shas))]
    fc.write_shard({(KEY, "clean"): (FeatureRows(shas, x), attrs())},
                   images=[ImageMeta(s, lab, "g" if lab == "fake" else "") for s, lab in zip(shas, labels)])
    fc.write_shard({(KEY, "clean"): (FeatureRows([sha(5)], emb([999])), attrs())}, images=[ImageMeta(sha(5), "real")])
    lab = fc.labelled(KEY, "clean")["label"]
    assert (lab == 1).sum() == 101 + 1 and (lab == 2).sum() == 101 and (lab == 0).sum() == 0
    got = fc.cached_shas(KEY, "clean")
    assert shas[0] in got and shas[1] in got and len(got) == len(shas) + 1


def test_merges_go_on_over_damaged_rows_and_keep_the_oldest_whole_row(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    bad = FeatureRows([sha(1), sha(2)], np.stack([emb([1])[0] * 3, emb([2])[0]]))  # row 1 not unit length
    fc.write_shard({(KEY, "clean"): (bad, attrs())})
    fc.write_shard({(KEY, "clean"): (FeatureRows([sha(1)], emb([1])), attrs())})  # re-extracted, whole
    p = shard(fc, [7, 8, 9])
    _flip(p, f"features/{KEY}/clean/embedding")  # a checksum failure in another segment
    with pytest.warns(UserWarning, match="damaged feature row"):
        fc.compact(full=True)  # no exception: damaged rows are left out
    r = FeatureCache(fc.path).load(KEY, "clean", shas=[sha(1), sha(2)])
    assert r.sha256 == [sha(1), sha(2)]
    np.testing.assert_allclose(r.embedding[0], emb([1])[0], atol=2e-3)  # the whole copy, not the damaged one


def test_automatic_merge_failure_is_a_warning(tmp_path, monkeypatch):
    from clipdet.cache import merge

    fc = FeatureCache(tmp_path / "c.h5")
    for i in range(7):
        shard(fc, [i])

    def boom(files, out, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(merge, "merge_files", boom)
    fc._written = 63
    with pytest.warns(UserWarning, match="merging segments failed"):
        shard(fc, [10])  # the 64th batch of a run triggers a merge; its failure does not end the run
    assert len(fc.cached_shas(KEY, "clean")) == 8 and len(fc.segments()) == 8


def test_repair_keeps_recorded_conflicts(tmp_path):
    from clipdet.cache.verify import verify

    fc = FeatureCache(tmp_path / "c.h5")
    shard(fc, [1, 2, 3], label="real")
    shard(fc, [1], label="fake", gen="g")
    fc.compact(full=True)
    assert [c["sha256"] for c in fc.conflicts()] == [sha(1)]
    _flip(fc.segments()[0], f"features/{KEY}/clean/embedding")
    rep = verify(FeatureCache(fc.path), repair=True)
    assert rep.repaired and FeatureCache(fc.path).conflicted([sha(1)]) == {sha(1)}


_WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_cache import shard
from clipdet.cache import FeatureCache
fc = FeatureCache(sys.argv[1])
for i in range(8):
    shard(fc, [100 + i])
"""


def test_inputs_left_behind_by_a_killed_merge_are_deleted_not_adopted(tmp_path, subprocess_env):
    """Kill after the catalogue swap but before the inputs are deleted: readers and writers must not
    take the (dead writer's) inputs back as orphans, or every row would be there twice."""
    path = str(tmp_path / "c" / "clipdet.h5")
    subprocess.run([sys.executable, "-c", _WRITER, path, os.path.dirname(__file__)], env=subprocess_env, check=True)
    fc = FeatureCache(path)
    inputs = fc.segments()
    saved = tmp_path / "saved"
    saved.mkdir()
    for s in inputs:
        shutil.copy(s, saved / os.path.basename(s))
    fc.compact(full=True)
    for s in inputs:  # as if the merger died right after writing the catalogue
        shutil.copy(saved / os.path.basename(s), s)
    rows = FeatureCache(path).load(KEY, "clean").sha256
    assert len(rows) == len(set(rows)) == 8
    shard(FeatureCache(path), [200])
    assert not any(os.path.exists(s) for s in inputs)
    rows = FeatureCache(path).load(KEY, "clean").sha256
    assert len(rows) == len(set(rows)) == 9


def test_stat_entry_is_racy_relative_to_when_the_files_were_stated(tmp_path):
    from clipdet.cache.statindex import StatIndex, stat_all

    p = tmp_path / "img.png"
    p.write_bytes(b"A" * 100)
    stat_ns = time.time_ns()
    stats = stat_all([str(p)])
    m = stats[0].st_mtime_ns
    p.write_bytes(b"B" * 100)  # rewritten at once; a coarse-mtime filesystem keeps the same mtime
    os.utime(p, ns=(m, m))
    idx = StatIndex(str(tmp_path / "s.sqlite"))
    idx.record([(str(p), stats[0], "a" * 64, True)], stat_ns=stat_ns)
    assert idx.lookup([str(p)], stat_all([str(p)])) == {}  # not trusted: hashed again next run


def test_read_only_scoring_keeps_memory_bounded(tmp_path, make_image, tiny_spec, tiny_weights):
    """With a read-only cache, each chunk's new features are dropped once the chunk is scored."""
    from clipdet.extract.discover import discover
    from clipdet.fit.run import fit
    from clipdet.score.stream import score_refs

    for i in range(3):
        make_image(tmp_path / "refs" / "real" / f"r{i}.png", seed=i)
        make_image(tmp_path / "refs" / "fake" / "g" / f"f{i}.png", seed=10 + i)
    for i in range(40):
        make_image(tmp_path / "new" / f"n{i:02d}.png", seed=100 + i)
    cache = str(tmp_path / "c.h5")
    det = fit([str(tmp_path / "refs")], backbone=tiny_spec, cache=cache, shots="all", device="cpu")
    ro = FeatureCache(cache, readonly=True)
    seen_memory = []
    rows = []
    for row in score_refs(discover([str(tmp_path / "new")]), det, cache=ro, device="cpu", first_chunk=8, chunk=8,
                          on_chunk=lambda: seen_memory.append(len(ro._memory))):
        rows.append(row)
    assert len(rows) == 40 and not any(r["error"] for r in rows)
    assert ro._memory == [] and max(seen_memory) <= 2  # per chunk, never the whole run
    assert len(FeatureCache(cache).cached_shas(det.backbone_key, "clean")) == 6  # nothing written
