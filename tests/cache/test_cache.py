"""FeatureCache: shards + compaction, plain-h5py layout, dedup, temp files, locking races, mismatches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from clipdet.backbones import BackboneInfo
from clipdet.cache import FeatureCache, FeatureRows, ImageMeta, read_plain
from clipdet.errors import CacheError, CacheMismatchError

KEY = "clipdet-tiny__file-0123456789abcdef"
PRE = {"size": [64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
INFO = BackboneInfo("clipdet-tiny:/w.safetensors", "clipdet-tiny", "file", "0123456789abcdef" * 4, PRE)
DIM = 8


def sha(i: int) -> str:
    return f"{i:064x}"


def emb(ids, dim=DIM) -> np.ndarray:
    """Deterministic L2-normalised rows, one per id."""
    out = np.stack([np.random.default_rng(i).normal(size=dim) for i in ids])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def attrs(layers=(), info=INFO) -> dict:
    return {"backbone": json.loads(info.to_json()), "layers": list(layers), "dim": DIM}


def shard(c: FeatureCache, ids, view="clean", label="real", gen="", layers=(), errors=(), info=INFO, paths=None):
    rows = FeatureRows([sha(i) for i in ids], emb(ids),
                       np.stack([emb([i + 1000, i + 2000]) for i in ids]) if layers else None)
    metas = [ImageMeta(sha(i), label, gen, 10 + i, 20 + i, "PNG", [paths or f"/img/{i}.png"]) for i in ids]
    return c.write_shard({(info.key if info is not INFO else KEY, view): (rows, attrs(layers, info))},
                         images=metas, errors=errors)


@pytest.fixture
def fc(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "c" / "clipdet.h5")


def plain_read_all(path: str, key: str, view: str = "clean") -> dict[str, np.ndarray]:
    """Read every live segment with nothing but h5py, as the README says: the catalogue names them."""
    out: dict[str, np.ndarray] = {}
    if not os.path.exists(path):
        return out
    with h5py.File(path, "r") as cat:
        assert cat.attrs["kind"] == "catalogue"
        names = [n.decode() for n in cat["segment_names"][()]]
    for n in names:
        with h5py.File(os.path.join(path + ".d", n), "r") as f:
            assert f.attrs["format"] == "clipdet-cache" and f.attrs["kind"] == "segment"
            g = f.get(f"features/{key}/{view}")
            if g is None:
                continue
            for h, e in zip(g["sha256"][()], g["embedding"][()]):
                out.setdefault(h.decode(), e)
    return out


def only_segment(fc) -> str:
    segs = fc.segments()
    assert len(segs) == 1
    return segs[0]


# ------------------------------------------------------------------------------------------ basics
def test_empty_cache(fc):
    assert not fc.exists()
    assert fc.groups() == [] and fc.cached_shas(KEY, "clean") == set() and fc.images() == {}
    assert fc.load(KEY, "clean").embedding.shape[0] == 0
    assert fc.write_shard() is None
    assert fc.compact() == 0
    assert fc.info()["images"] == 0


def test_shards_visible_before_compaction_and_after(fc):
    p1 = shard(fc, [1, 2, 3])
    p2 = shard(fc, [3, 4], label="fake", gen="genA")
    assert os.path.dirname(p1) == fc.seg_dir and p1.endswith(".h5") and p1 != p2
    assert os.path.isfile(fc.path) and fc.segments() == [p1, p2]
    assert fc.cached_shas(KEY, "clean") == {sha(i) for i in (1, 2, 3, 4)}
    before = fc.load(KEY, "clean")
    assert sorted(before.sha256) == [sha(i) for i in (1, 2, 3, 4)]
    assert fc.compact() == 0  # two small segments: below the merge fan-out, nothing rewritten
    assert fc.compact(full=True) == 2
    assert os.path.isfile(fc.path) and not os.path.exists(p1) and len(fc.segments()) == 1
    after = fc.load(KEY, "clean")
    assert after.sha256 == before.sha256
    np.testing.assert_array_equal(after.embedding, before.embedding)
    # content 3 was seen as real then fake/genA: one row, later observation wins
    imgs = fc.images()
    assert set(imgs) == {sha(i) for i in (1, 2, 3, 4)}
    assert (imgs[sha(3)].label, imgs[sha(3)].generator) == ("fake", "genA")
    assert (imgs[sha(1)].label, imgs[sha(1)].width, imgs[sha(1)].height) == ("real", 11, 21)
    # ... but the disagreement is on record, not silently resolved
    conf = fc.conflicts()
    assert [c["sha256"] for c in conf] == [sha(3)]
    assert {o[:2] for o in conf[0]["observations"]} == {("real", ""), ("fake", "genA")}
    assert fc.info()["conflicts"] == 1


def test_load_order_subset_float32_and_fp16_storage(fc):
    shard(fc, [1, 2, 3])
    shard(fc, [4, 5])
    fc.compact(full=True)
    shard(fc, [6])
    r = fc.load(KEY, "clean", shas=[sha(5), sha(99), sha(1), sha(6)])
    assert r.sha256 == [sha(5), sha(1), sha(6)]
    assert r.embedding.dtype == np.float32 and r.embedding.shape == (3, DIM)
    np.testing.assert_allclose(r.embedding, emb([5, 1, 6]), atol=2e-3)  # float16 on disk
    np.testing.assert_allclose(np.linalg.norm(r.embedding, axis=1), 1, atol=2e-3)
    assert fc.load(KEY, "clean", shas=[]).embedding.shape[0] == 0
    assert fc.load(KEY, "jpeg:75").sha256 == []
    with h5py.File(fc.segments()[0], "r") as f:
        assert f[f"features/{KEY}/clean/embedding"].dtype == np.float16
        assert f[f"features/{KEY}/clean/embedding"].fletcher32  # checksummed chunks


def test_plain_h5py_layout_matches_load(fc):
    shard(fc, [1, 2], label="real", errors=[{"sha256": "", "path": "/x/bad.jpg", "reason": "empty file"}])
    shard(fc, [3], label="fake", gen="genB", paths="/img/3.png")
    shard(fc, [3], label="fake", gen="genB", paths="/moved/3.png")
    shard(fc, [1, 2], view="jpeg:75")
    fc.compact(full=True)
    merged = only_segment(fc)
    shard(fc, [7, 1], label="fake", gen="genC")  # a newer segment after the merge
    with h5py.File(fc.path, "r") as cat:
        assert cat.attrs["format"] == "clipdet-cache" and int(cat.attrs["format_version"]) == 2
        assert cat.attrs["kind"] == "catalogue" and len(cat["segment_names"]) == 2
        # external links let plain h5py browse every segment from the catalogue
        link = cat[f"segments/{os.path.basename(merged)}/features/{KEY}/clean/sha256"]
        assert len(link) == 3
    with h5py.File(merged, "r") as f:
        assert f.attrs["format"] == "clipdet-cache" and int(f.attrs["format_version"]) == 2
        assert "clipdet_version" in f.attrs
        g = f[f"features/{KEY}/clean"]
        assert json.loads(g.attrs["backbone"])["weights_id"] == INFO.weights_id
        assert json.loads(g.attrs["layers"]) == [] and int(g.attrs["dim"]) == DIM
        hashes = [h.decode() for h in g["sha256"][()]]
        assert hashes == [sha(1), sha(2), sha(3)]  # no duplicate row for content 3
        im = f["images"]
        rows = {h.decode(): i for i, h in enumerate(im["sha256"][()])}
        i3 = rows[sha(3)]
        labels = json.loads(im["label"].attrs["labels"])
        vocab = [v.decode() for v in im["generator_vocab"][()]]
        assert labels[im["label"][i3]] == "fake" and vocab[im["generator"][i3]] == "genB"
        assert im["paths"][i3].decode().split("\n") == ["/img/3.png", "/moved/3.png"]
        assert (int(im["width"][i3]), int(im["height"][i3])) == (13, 23)
        assert [p.decode() for p in f["errors/path"][()]] == ["/x/bad.jpg"]
    names, e = read_plain(fc.path, KEY)
    loaded = fc.load(KEY, "clean", shas=names)
    np.testing.assert_array_equal(e, loaded.embedding)
    # every segment, read with plain h5py, equal FeatureCache.load over everything
    plain = plain_read_all(fc.path, KEY)
    full = fc.load(KEY, "clean")
    assert sorted(plain) == sorted(full.sha256) == sorted(sha(i) for i in (1, 2, 3, 7))
    for h, row in zip(full.sha256, full.embedding):
        np.testing.assert_array_equal(plain[h].astype(np.float32), row)


def test_compaction_dedups_and_earlier_wins(fc):
    shard(fc, [1, 2])
    fc.compact(full=True)
    other = FeatureRows([sha(2), sha(3)], -emb([2, 3]))  # a different vector for content 2
    fc.write_shard({(KEY, "clean"): (other, attrs())})
    before = fc.load(KEY, "clean")
    np.testing.assert_allclose(before.embedding[1], emb([2])[0], atol=2e-3)  # the older row wins on read
    fc.compact(full=True)
    r = fc.load(KEY, "clean")
    assert r.sha256 == [sha(1), sha(2), sha(3)]
    np.testing.assert_allclose(r.embedding[1], emb([2])[0], atol=2e-3)  # ... and on merge
    with h5py.File(only_segment(fc), "r") as f:
        s = f[f"features/{KEY}/clean/sha256"][()]
        assert len(s) == len(set(s.tolist())) == 3


def test_layers_round_trip(fc):
    shard(fc, [1, 2], layers=(1, 0))
    fc.compact(full=True)
    r = fc.load(KEY, "clean", with_layers=True)
    assert r.layers.shape == (2, 2, DIM) and r.layers.dtype == np.float32
    np.testing.assert_allclose(r.layers[1], emb([1002, 2002]), atol=2e-3)
    shard(fc, [5], view="jpeg:50")
    with pytest.raises(CacheError, match="without --layers"):
        fc.load(KEY, "jpeg:50", with_layers=True)


def test_errors_deduplicated(fc):
    e = {"sha256": "", "path": "/x/a.jpg", "reason": "truncated image"}
    fc.write_shard(errors=[e])
    fc.write_shard(errors=[e, {"sha256": sha(9), "path": "/x/b.jpg", "reason": "not an image"}])
    assert fc.errors() == [e, {"sha256": sha(9), "path": "/x/b.jpg", "reason": "not an image"}]
    fc.compact(full=True)
    fc.write_shard(errors=[e])
    assert len(fc.errors()) == 2


def test_info_counts(fc):
    shard(fc, [1, 2, 3], label="real")
    shard(fc, [4, 5], label="fake", gen="genA")
    shard(fc, [6], label="fake", gen="")
    shard(fc, [7], label="")
    shard(fc, [1, 4], view="blur:1", label="")
    fc.write_shard(errors=[{"path": "/bad.png", "reason": "x"}])
    info = fc.info()
    assert info["images"] == 7 and info["errors"] == 1 and info["segments"] == 6 and info["format_version"] == 2
    groups = {f["view"]: f for f in info["features"]}
    assert groups["clean"]["images"] == 7
    assert groups["clean"]["labels"] == {"fake": 3, "real": 3, "unlabelled": 1}
    assert groups["clean"]["generators"] == {"genA": 2, "unknown": 1}
    assert groups["blur:1"]["labels"] == {"fake": 1, "real": 1}
    assert groups["clean"]["backbone_key"] == KEY and groups["clean"]["dim"] == DIM
    json.dumps(info)


# ------------------------------------------------------------------------------------------ damage & temps
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftover_temp_files_ignored_and_cleaned(fc):
    shard(fc, [1, 2])
    dead = _dead_pid()
    half = os.path.join(fc.seg_dir, f".seg-{time.time_ns():020d}-{dead}-000000.h5.{dead}.tmp")
    with open(half, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a half-written HDF5 file
    live = os.path.join(fc.seg_dir, f".seg-{time.time_ns():020d}-{os.getpid()}-999999.h5.{os.getpid()}.tmp")
    with open(live, "wb") as f:
        f.write(b"in progress")
    merge_out = os.path.join(fc.seg_dir, f"mrg-{dead}-{time.time_ns():020d}.h5")
    with open(merge_out, "wb") as f:
        f.write(b"junk")
    # readers ignore temp files and unfinished merge outputs
    assert fc.cached_shas(KEY, "clean") == {sha(1), sha(2)} and len(fc.segments()) == 1
    assert fc.compact() == 0  # the catalogue update cleans up after dead processes
    assert not os.path.exists(half) and not os.path.exists(merge_out)
    assert os.path.exists(live)  # its writer still runs: left alone
    assert fc.cached_shas(KEY, "clean") == {sha(1), sha(2)}
    os.remove(live)


def test_orphan_segment_of_killed_writer_is_adopted(fc):
    """A writer killed between renaming its segment and updating the catalogue loses nothing."""
    from clipdet.cache.segment import segment_bytes

    shard(fc, [1])
    dead = _dead_pid()
    rows = FeatureRows([sha(2)], emb([2]))
    data = segment_bytes([ImageMeta(sha(2), "fake", "g", 1, 1, "PNG", ["/img/2.png"])], [],
                         {(KEY, "clean"): (rows, attrs())})
    orphan = os.path.join(fc.seg_dir, f"seg-{time.time_ns():020d}-{dead}-000000.h5")
    with open(orphan, "wb") as f:
        f.write(data)
    shard(fc, [3])
    assert orphan in fc.segments()
    assert fc.cached_shas(KEY, "clean") == {sha(1), sha(2), sha(3)}


def test_damaged_and_foreign_files_refused(fc, tmp_path):
    shard(fc, [1])
    p2 = shard(fc, [2])
    shard(fc, [3])
    with open(p2, "r+b") as f:  # a damaged segment: readers skip it with a warning naming it
        f.write(b"garbage!")
    with pytest.warns(UserWarning, match=os.path.basename(p2) + ".*damaged"):
        assert fc.cached_shas(KEY, "clean") == {sha(1), sha(3)}
    assert fc.compact(full=True) == 2  # set aside as .bad (never deleted), the rest merged
    assert os.path.exists(p2 + ".bad") and p2 not in fc.segments()
    assert FeatureCache(fc.path).cached_shas(KEY, "clean") == {sha(1), sha(3)}
    with open(fc.path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(CacheError, match="cannot read the feature cache"):
        fc.cached_shas(KEY, "clean")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(CacheError, match="not a clipdet feature cache"):
        FeatureCache(other).groups()
    newer = FeatureCache(tmp_path / "newer.h5")
    shard(newer, [1])
    with h5py.File(newer.path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="newer clipdet"):
        newer.load(KEY, "clean")


def test_damaged_rows_skipped_and_named(fc):
    """A NaN or flipped bytes in one stored embedding: that row is reported damaged, the rest load."""
    p = shard(fc, [1, 2, 3])
    with h5py.File(p, "r") as f:
        ds = f[f"features/{KEY}/clean/embedding"]
        off = ds.id.get_chunk_info(0).byte_offset
    with open(p, "r+b") as f:  # flip bytes inside row 1's data: the chunk's fletcher32 checksum fails
        f.seek(off + DIM * 2 + 2)
        f.write(b"\xff\x7f")
    shard(fc, [4])
    fresh = FeatureCache(fc.path)
    with pytest.warns(UserWarning, match="3 cached feature row.*damaged"):
        r = fresh.load(KEY, "clean", shas=[sha(1), sha(2), sha(3), sha(4)])
    assert r.sha256 == [sha(4)] and np.isfinite(r.embedding).all()  # the run goes on with the good rows
    assert fresh.damaged == {sha(1), sha(2), sha(3)}
    assert fresh.cached_shas(KEY, "clean") == {sha(4)}  # so extraction re-embeds the damaged ones
    # a NaN written through the library (no checksum failure) is caught by the value check
    nan = FeatureRows([sha(9)], np.full((1, DIM), np.nan, np.float32))
    fc.write_shard({(KEY, "clean"): (nan, attrs())})
    with pytest.warns(UserWarning, match="damaged"):
        assert fc.load(KEY, "clean", shas=[sha(9)]).sha256 == []
    assert sha(9) in fc.damaged and sha(9) not in fc.cached_shas(KEY, "clean")


# ------------------------------------------------------------------------------------------ mismatches
def test_check_compatible(fc):
    shard(fc, [1], layers=(1, 0))
    info = BackboneInfo(INFO.spec, INFO.arch, INFO.weights, INFO.weights_id, PRE)
    fc.check_compatible(info, "clean", (1, 0))  # same settings: fine
    fc.check_compatible(info, "jpeg:75", ())  # no such group yet: fine
    for bad_layers in ((), (1,), (0, 1)):  # (0, 1) holds the same blocks in another order: rows differ
        with pytest.raises(CacheMismatchError, match="layers"):
            fc.check_compatible(info, "clean", bad_layers)
    other_pre = BackboneInfo(INFO.spec, INFO.arch, INFO.weights, INFO.weights_id, {**PRE, "mean": [0, 0, 0]})
    with pytest.raises(CacheMismatchError, match="preprocess"):
        fc.check_compatible(other_pre, "clean", (1, 0))
    # a group whose recorded weights_id differs from the one its key stands for (say hand-edited)
    with h5py.File(fc.segments()[0], "r+") as f:
        g = f[f"features/{KEY}/clean"]
        b = json.loads(g.attrs["backbone"])
        b["weights_id"] = "f" * 64
        g.attrs["backbone"] = json.dumps(b)
    with pytest.raises(CacheMismatchError) as ei:
        fc.check_compatible(info, "clean", (1, 0))
    assert "weights_id" in str(ei.value) and "\n" not in str(ei.value)


def test_compaction_refuses_mismatched_shard_and_keeps_data(fc):
    shard(fc, [1, 2])
    odd = BackboneInfo(INFO.spec, INFO.arch, INFO.weights, "e" * 64, PRE)
    fc.write_shard({(KEY, "clean"): (FeatureRows([sha(3)], emb([3])), attrs(info=odd))})
    with pytest.raises(CacheMismatchError, match="move that segment away"):
        fc.compact(full=True)
    assert os.path.isfile(fc.path) and len(fc.segments()) == 2
    assert not [n for n in os.listdir(fc.seg_dir) if n.endswith(".tmp") or (n.startswith("mrg-") and
                    os.path.join(fc.seg_dir, n) not in fc.segments())]
    assert fc.cached_shas(KEY, "clean") == {sha(1), sha(2), sha(3)}


# ------------------------------------------------------------------------------------------ kill -9
_COMPACT = "import sys; from clipdet.cache import FeatureCache; FeatureCache(sys.argv[1]).compact(full=True)"


@pytest.mark.slow
def test_kill_during_compaction_leaves_cache_readable(tmp_path, subprocess_env):
    """SIGKILL a merge at the moment its output file appears (several tries); nothing is lost."""
    killed_mid = 0
    for attempt in range(4):
        fc = FeatureCache(tmp_path / f"k{attempt}" / "clipdet.h5")
        shard(fc, range(0, 50))
        for start in range(50, 350, 2):  # 150 segments
            shard(fc, [start, start + 1, start - 10])  # each overlaps older content
        want = {sha(i) for i in range(350)}
        proc = subprocess.Popen([sys.executable, "-c", _COMPACT, fc.path], env=subprocess_env)
        while proc.poll() is None and not any(n.startswith("mrg-") for n in os.listdir(fc.seg_dir)):
            time.sleep(0.0005)
        if attempt:
            time.sleep(0.01 * attempt)  # later tries kill later in the merge
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid += proc.wait() == -signal.SIGKILL
        else:
            proc.wait()
        # whatever happened: readable by plain h5py and nothing lost
        assert set(plain_read_all(fc.path, KEY)) == want
        assert fc.cached_shas(KEY, "clean") == want
        fc.compact(full=True)
        assert not [n for n in os.listdir(fc.seg_dir) if n.endswith(".tmp") or (n.startswith("mrg-") and
                    os.path.join(fc.seg_dir, n) not in fc.segments())]
        with h5py.File(only_segment(fc), "r") as f:
            s = f[f"features/{KEY}/clean/sha256"][()]
            assert len(s) == len(set(s.tolist())) == 350
            assert len(f["images/sha256"]) == 350
    assert killed_mid >= 1  # at least one kill landed while the merge ran


def test_tiered_merge_plan():
    """Adjacent runs only; lowest tier first; small segments inside a run of bigger ones go along."""
    from clipdet.cache.merge import FANOUT, plan

    mb = 2**20
    assert plan([1000] * (FANOUT - 1)) is None
    assert plan([1000] * FANOUT) == (0, FANOUT)
    assert plan([500 * mb] + [1000] * FANOUT) == (1, 1 + FANOUT)  # the big one is not rewritten
    batches = ([21 * mb] * 6 + [2 * mb]) * 2  # row-group leftovers between full batches
    assert plan(batches) == (0, 9)
    assert plan([21 * mb] * 3) is None and plan([5, 6], full=True) == (0, 2) and plan([5], full=True) is None
