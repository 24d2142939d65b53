"""A damaged catalogue has a way back: `cache verify --repair` rebuilds it from the segment files
(merge outputs say which segments they replaced); other commands say so. A segment that is gone is
reported as missing, never as "set aside as .bad"."""

from __future__ import annotations

import os
import shutil

import pytest
from test_cache import shard
from test_crash_points import state

from clipdet.cache import FeatureCache


def _cache(tmp_path) -> FeatureCache:
    fc = FeatureCache(tmp_path / "c.h5")
    for i in range(1, 9):
        shard(fc, [i])
    shard(fc, [1], label="fake", gen="gx")  # a conflict: the order of segments matters
    inputs = fc.segments()[:8]
    saved = tmp_path / "saved"
    saved.mkdir()
    for s in inputs:
        shutil.copy(s, saved)
    fc.compact()  # 8 batches → one merge output
    for s in inputs:  # as if killed before the merged-away inputs were deleted
        shutil.copy(saved / os.path.basename(s), s)
    shard(fc, [10], label="fake", gen="gy")
    return fc


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_catalogue_is_rebuilt_by_repair_and_named_by_other_commands(tmp_path, run_cli, damage):
    fc = _cache(tmp_path)
    want, segs = state(fc.path), FeatureCache(fc.path).segments()
    size = os.path.getsize(fc.path)
    with open(fc.path, "r+b") as fh:
        if damage == "truncate":
            fh.truncate(size // 2)
        else:
            fh.seek(0)
            fh.write(b"garbage!" * 4)
    for args in (["cache", "info"], ["cache", "verify"], ["cache", "compact"]):
        r = run_cli(*args, "--cache", fc.path)
        assert r.exit_code == 2, r.output
        assert "catalogue is damaged" in r.output and "verify --repair" in r.output and "Traceback" not in r.output
    r = run_cli("cache", "verify", "--repair", "--cache", fc.path)
    assert r.exit_code == 0 and "rebuilt from 3 segment(s)" in r.output, r.output
    assert os.path.exists(fc.path + ".bad")
    assert FeatureCache(fc.path).segments() == segs  # the merged-away inputs left behind are not taken back
    assert state(fc.path) == want
    r = run_cli("cache", "verify", "--cache", fc.path)
    assert r.exit_code == 0, r.output


def test_deleted_segment_is_reported_missing_not_set_aside(tmp_path, run_cli):
    fc = FeatureCache(tmp_path / "c.h5")
    for i in range(3):
        shard(fc, [i])
    gone = fc.segments()[1]
    os.remove(gone)
    r = run_cli("cache", "verify", "--cache", fc.path)
    assert r.exit_code == 1 and f"{gone}: segment missing" in r.output and "1 missing segment" in r.output
    r = run_cli("cache", "verify", "--repair", "--cache", fc.path)
    assert r.exit_code == 0 and "dropped from the catalogue" in r.output, r.output
    assert ".bad" not in r.output and not os.path.exists(gone + ".bad")
    assert gone not in FeatureCache(fc.path).segments() and len(FeatureCache(fc.path).segments()) == 2
