"""The stat index: unchanged cached files are not read again; racy, modified, moved and --rehash cases."""

from __future__ import annotations

import importlib
import os
import time

import pytest

from clipdet.cache import FeatureCache
from clipdet.cache.statindex import RACY_NS, StatIndex, stat_all
from clipdet.extract.discover import discover
from clipdet.extract.lazy import LazyBackbone
from clipdet.extract.run import extract

extract_mod = importlib.import_module("clipdet.extract.pipeline")  # where the reader looks read_file up


def _age(paths, seconds=60):
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


@pytest.fixture
def tree(tmp_path, make_image):
    files = [make_image(tmp_path / "data" / "real" / f"{i}.png", seed=i) for i in range(6)]
    files += [make_image(tmp_path / "data" / "fake" / "g" / f"{i}.png", seed=50 + i) for i in range(4)]
    _age(files)
    return tmp_path / "data", files


def _run(folder, cache, tiny_spec, tiny_backbone, **kw):
    lazy = LazyBackbone(tiny_spec, "cpu", loaded=tiny_backbone)
    return extract(discover([str(folder)]), tiny_spec, cache=cache, lazy=lazy, device="cpu", workers=2, **kw)


def _count_reads(monkeypatch):
    reads = []
    real = extract_mod.read_file

    def counting(path):
        reads.append(os.path.basename(str(path)))
        return real(path)

    monkeypatch.setattr(extract_mod, "read_file", counting)
    return reads


def test_rerun_over_unchanged_files_reads_none(tree, tmp_path, tiny_spec, tiny_backbone, monkeypatch):
    folder, files = tree
    cache = FeatureCache(tmp_path / "c.h5")
    assert _run(folder, cache, tiny_spec, tiny_backbone).new == 10
    reads = _count_reads(monkeypatch)
    s = _run(folder, cache, tiny_spec, tiny_backbone)
    assert (s.cached, s.new, s.errors) == (10, 0, []) and reads == []
    assert sorted(p for p, _, _ in s.records) == sorted(str(f) for f in files)  # hashes still reported
    assert all(sha for _, sha, _ in s.records)
    # --rehash reads everything again
    s = _run(folder, cache, tiny_spec, tiny_backbone, rehash=True)
    assert s.cached == 10 and len(reads) == 10


def test_racy_modified_moved_and_relabelled_files_are_read(tree, tmp_path, tiny_spec, tiny_backbone, monkeypatch,
                                                            make_image):
    folder, files = tree
    fresh = make_image(folder / "real" / "fresh.png", seed=99)  # mtime now: its entry will be racy
    cache = FeatureCache(tmp_path / "c.h5")
    _run(folder, cache, tiny_spec, tiny_backbone)
    # modify one file: same size, other bytes, mtime moved back to an old but different time
    data = bytearray(open(files[0], "rb").read())
    data[-20] ^= 0xFF
    open(files[0], "wb").write(bytes(data))
    _age([files[0]], 30)
    os.rename(files[1], folder / "real" / "moved.png")  # moved: recognised by content
    reads = _count_reads(monkeypatch)
    s = _run(folder, cache, tiny_spec, tiny_backbone)
    assert set(reads) == {"fresh.png", "0.png", "moved.png"}
    assert s.new in (0, 1) and not [e for e in s.errors if "0.png" not in e[0]]
    assert os.path.basename(fresh) in reads
    by_path = {os.path.basename(p): sha for p, sha, _ in s.records}
    import hashlib

    assert by_path["0.png"] == hashlib.sha256(open(files[0], "rb").read()).hexdigest()
    # relabelled through a manifest: not skipped, the new label is recorded (as a conflict)
    reads.clear()
    m = tmp_path / "m.csv"
    m.write_text(f"path,label,generator\n{files[2]},fake,sdxl\n")
    lazy = LazyBackbone(tiny_spec, "cpu", loaded=tiny_backbone)
    extract(discover([], manifest=str(m)), tiny_spec, cache=cache, lazy=lazy, device="cpu", workers=1)
    assert reads == ["2.png"]
    sha2 = hashlib.sha256(open(files[2], "rb").read()).hexdigest()
    assert sha2 in cache.conflicted([sha2])


def test_racy_rule_and_unreadable_index(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    idx = StatIndex(str(tmp_path / "s" / "stat.sqlite"))
    st = stat_all([str(p)])
    idx.record([(str(p), st[0], "a" * 64, True)])
    assert idx.lookup([str(p)], st) == {}  # recorded within RACY_NS of the mtime: not trusted
    old = time.time() - 2 * RACY_NS / 1e9
    os.utime(p, (old, old))
    st = stat_all([str(p)])
    idx.record([(str(p), st[0], "a" * 64, True)])
    assert idx.lookup([str(p)], st) == {0: ("a" * 64, True)}
    idx.record([(str(p), st[0], "a" * 64, False)])  # a scoring run does not erase the metadata flag
    assert idx.lookup([str(p)], st) == {0: ("a" * 64, True)}
    p.write_bytes(b"y")  # changed: size/mtime differ
    assert idx.lookup([str(p)], stat_all([str(p)])) == {}
    (tmp_path / "s" / "stat.sqlite").write_bytes(b"garbage")  # damaged index: just not used
    assert StatIndex(str(tmp_path / "s" / "stat.sqlite")).lookup([str(p)], stat_all([str(p)])) == {}
