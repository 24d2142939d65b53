"""Crash consistency: a kill -9 at every rename / fsync / unlink / link a cache command makes (the
CLIPDET_FAULT_KILL_AT hook in clipdet/cache/files.py, stepped through each point in turn) leaves the
counts, labels and conflicts of an uninterrupted run; a full merge afterwards changes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings

import h5py
import pytest
from test_cache import KEY, shard

from clipdet.cache import FeatureCache
from clipdet.cache.files import FAULT_ENV

HERE = os.path.dirname(__file__)
PRELUDE = f"import sys; sys.path.insert(0, {HERE!r}); from clipdet.cache import FeatureCache; "
COMPACT = PRELUDE + "FeatureCache(sys.argv[1]).compact()"
FULL = PRELUDE + "FeatureCache(sys.argv[1]).compact(full=True)"
REPAIR = PRELUDE + "from clipdet.cache.verify import verify; verify(FeatureCache(sys.argv[1]), repair=True)"
# extract's write path: one more batch (a byte copy of image 1, labelled fake) whose write triggers a merge
WRITE = PRELUDE + ("import clipdet.cache.store as st; from test_cache import shard; st.MERGE_EVERY = 1; "
                   "shard(FeatureCache(sys.argv[1]), [1], label='fake', gen='gx')")


def state(path: str, key: str = KEY) -> tuple:
    """What a user sees: image count, labels and generators per group, conflicts, the rows load() gives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FeatureCache(path)
        info = fc.info()
        feats = [(f["backbone_key"], f["view"], f["images"], f["labels"], f["generators"]) for f in info["features"]]
        rows = fc.load(key, "clean").sha256
        conflicts = sorted((c["sha256"], sorted(c["observations"])) for c in fc.conflicts())
    return info["images"], info["conflicts"], feats, len(rows), sorted(rows), conflicts


def full_merge_rows(path: str) -> tuple[int, int]:
    """(feature rows, image rows) of the one segment a full merge leaves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FeatureCache(path)
        fc.compact(full=True)
        (seg,) = fc.segments()
    with h5py.File(seg, "r") as f:
        return len(f[f"features/{KEY}/clean/sha256"]), len(f["images/sha256"])


def kill_at_each_step(tmp_path, pristine: str, script: str, env: dict, check) -> int:
    """Copy the cache at `pristine`, run `script` on the copy killed at step 1, 2, ... until it runs to the
    end; `check(path)` after each kill. Returns how many steps were killed."""
    n = 0
    while True:
        n += 1
        assert n < 200, "the command never finished"
        work = tmp_path / f"step{n}"
        shutil.copytree(os.path.dirname(pristine), work)
        path = str(work / os.path.basename(pristine))
        r = subprocess.run([sys.executable, "-c", script, path], env={**env, FAULT_ENV: str(n)},
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return n - 1
        assert r.returncode == -signal.SIGKILL, r.stderr
        check(path, n)
        shutil.rmtree(work)


def real_then_fake_copy(tmp_path) -> str:
    """8 real images in 8 batches, then a batch with a byte copy of image 1 labelled fake (a conflict)."""
    fc = FeatureCache(tmp_path / "pristine" / "c.h5")
    for i in range(1, 9):
        shard(fc, [i])
    shard(fc, [1], label="fake", gen="gx")
    return fc.path


@pytest.mark.slow
def test_kill_at_every_step_of_a_merge_changes_nothing(tmp_path, subprocess_env):
    pristine = real_then_fake_copy(tmp_path)
    want = state(pristine)
    assert want[2][0][3] == {"fake": 1, "real": 7} and want[1] == 1
    done = tmp_path / "done"
    shutil.copytree(os.path.dirname(pristine), done)
    subprocess.run([sys.executable, "-c", COMPACT, str(done / "c.h5")], env=subprocess_env, check=True)
    assert len(FeatureCache(done / "c.h5").segments()) == 2 and state(str(done / "c.h5")) == want

    def check(path, n):
        assert state(path) == want, f"killed at step {n}"
        assert state(path) == want, f"killed at step {n} (second reader)"
        assert full_merge_rows(path) == (8, 8), f"killed at step {n}: rows duplicated"
        assert state(path) == want, f"killed at step {n}, then compact --full"

    assert kill_at_each_step(tmp_path, pristine, COMPACT, subprocess_env, check) >= 10


@pytest.mark.slow
def test_kill_at_every_step_of_a_batch_write_and_its_merge(tmp_path, subprocess_env):
    fc = FeatureCache(tmp_path / "pristine" / "c.h5")
    for i in range(1, 9):
        shard(fc, [i])
    before = state(fc.path)
    after = state(real_then_fake_copy(tmp_path / "ref"))

    def check(path, n):
        got = state(path)
        assert got in (before, after), f"killed at step {n}"  # the batch landed whole or not at all
        assert full_merge_rows(path) == (8, 8), f"killed at step {n}: rows duplicated"
        assert state(path) == got, f"killed at step {n}, then compact --full"

    assert kill_at_each_step(tmp_path, fc.path, WRITE, subprocess_env, check) >= 10


@pytest.mark.slow
def test_kill_at_every_step_of_a_repair(tmp_path, subprocess_env):
    from test_cache_review import _flip

    pristine = real_then_fake_copy(tmp_path)
    segs = FeatureCache(pristine).segments()
    _flip(segs[2], f"features/{KEY}/clean/embedding")  # image 3's row fails its checksum
    with open(segs[4], "r+b") as fh:  # image 5's segment is unreadable
        fh.write(b"garbage!")
    done = tmp_path / "done"
    shutil.copytree(os.path.dirname(pristine), done)
    subprocess.run([sys.executable, "-c", REPAIR, str(done / "c.h5")], env=subprocess_env, check=True)
    want = state(str(done / "c.h5"))
    assert want[3] == 6  # images 3 and 5 are gone until re-extracted

    def check(path, n):
        subprocess.run([sys.executable, "-c", REPAIR, path], env=subprocess_env, check=True)
        assert state(path) == want, f"killed at step {n}, then repaired again"
        assert full_merge_rows(path)[0] == 6, f"killed at step {n}: rows duplicated"

    assert kill_at_each_step(tmp_path, pristine, REPAIR, subprocess_env, check) >= 5


@pytest.mark.slow
def test_kill_at_every_step_of_an_upgrade(tmp_path, subprocess_env):
    from test_cache_tools import _write_v1

    pristine = tmp_path / "pristine" / "old.h5"
    pristine.parent.mkdir()
    _write_v1(str(pristine), KEY)
    want = state(str(pristine))

    def check(path, n):
        assert state(path) == want, f"killed at step {n}"
        subprocess.run([sys.executable, "-c", FULL, path], env=subprocess_env, check=True)
        assert state(path) == want, f"killed at step {n}, then upgraded"
        assert full_merge_rows(path) == (4, 4)

    assert kill_at_each_step(tmp_path, str(pristine), FULL, subprocess_env, check) >= 3


def test_merge_output_left_uncommitted_by_clipdet_0_2_is_not_adopted(tmp_path):
    """clipdet 0.2 renamed a merge output to seg-...-PID-m00000.h5 before writing the catalogue; killed in
    between, that file repeats live segments and must not be appended after them."""
    from test_cache import _dead_pid

    path = real_then_fake_copy(tmp_path)
    want = state(path)
    fc = FeatureCache(path)
    out = fc._merge(fc.segments()[:8])
    leftover = os.path.join(fc.seg_dir, f"seg-{'9' * 20}-{_dead_pid()}-m00000.h5")
    os.replace(out, leftover)
    assert state(path) == want
    shard(FeatureCache(path), [20])
    assert leftover not in FeatureCache(path).segments() and not os.path.exists(leftover)
