"""A flipped bit in a segment's search index or hash column never hands out another image's features:
readers cross-check the index (sorted, digests, row range) and each row they read (its stored hash),
verify names the damage once, repair rewrites the segment."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_cache import KEY, emb, sha, shard

from clipdet.cache import FeatureCache
from clipdet.cache.verify import verify

IDS = list(range(1, 9))


def _one_segment(tmp_path) -> tuple[FeatureCache, str]:
    fc = FeatureCache(tmp_path / "c.h5")
    for i in IDS:
        shard(fc, [i])
    fc.compact(full=True)
    (seg,) = fc.segments()
    return fc, seg


def _xor_byte(path: str, dataset: str, at: int, mask: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        off = ds.id.get_offset()
        if off is None:  # chunked (no filter): bytes of the first chunk
            off = ds.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + at)
        b = fh.read(1)[0]
        fh.seek(off + at)
        fh.write(bytes([b ^ mask]))


def _rows_are_their_own(path) -> dict:
    got = {}
    with pytest.warns(UserWarning):
        r = FeatureCache(path).load(KEY, "clean", shas=[sha(i) for i in IDS])
    for s, e in zip(r.sha256, r.embedding):
        i = int(s, 16)
        np.testing.assert_allclose(e, emb([i])[0], atol=2e-3, err_msg=f"image {i} got another image's row")
        got[i] = e
    return got


@pytest.mark.parametrize("table", [f"features/{KEY}/clean", "images"])
def test_flipped_bit_in_the_search_index_is_found_and_reads_stay_right(tmp_path, table, run_cli):
    fc, seg = _one_segment(tmp_path)
    _xor_byte(seg, f"{table}/_index_row", 0, 1)  # row of the first key: now a neighbour's row
    with pytest.warns(UserWarning, match="search index damaged"):
        FeatureCache(fc.path).cached_shas(KEY, "clean")
    assert len(_rows_are_their_own(fc.path)) == len(IDS)
    lab = FeatureCache(fc.path).labelled(KEY, "clean")
    assert (lab["label"] == 1).all() and len(lab["label"]) == len(IDS)
    r = run_cli("cache", "verify", "--cache", fc.path)
    assert r.exit_code == 1 and "search index damaged" in r.output and "1 damaged index" in r.stdout, r.output
    r = run_cli("cache", "verify", "--repair", "--cache", fc.path)
    assert r.exit_code == 0, r.output
    rep = verify(FeatureCache(fc.path))
    assert rep.ok and rep.rows == len(IDS)


def test_flipped_hash_character_is_a_damaged_row_not_another_image(tmp_path, run_cli):
    fc, seg = _one_segment(tmp_path)
    with h5py.File(seg, "r") as f:
        col = f[f"features/{KEY}/clean/sha256"][()]
    row = int(np.flatnonzero(col == sha(2).encode())[0])
    _xor_byte(seg, f"features/{KEY}/clean/sha256", row * 64 + 63, ord("2") ^ ord("3"))  # now reads sha(3)
    fresh = FeatureCache(fc.path)
    with pytest.warns(UserWarning, match="damaged"):
        r = fresh.load(KEY, "clean", shas=[sha(2)])
    assert r.sha256 == [] and fresh.damaged == {sha(2)}  # re-extracted, never image 3's row
    got = _rows_are_their_own(fc.path)
    assert 2 not in got and 3 in got
    rep = verify(FeatureCache(fc.path))
    assert not rep.ok and [d[2] for d in rep.damaged] == [sha(3)]  # the row as stored, named once
    r = run_cli("cache", "verify", "--repair", "--cache", fc.path)
    assert r.exit_code == 0, r.output
    rep = verify(FeatureCache(fc.path))
    assert rep.ok and rep.rows == len(IDS) - 1
    r = FeatureCache(fc.path).load(KEY, "clean")
    assert sorted(r.sha256) == sorted(sha(i) for i in IDS if i != 2)


def test_flipped_hash_in_the_images_table_never_lends_metadata_to_another_image(tmp_path):
    fc = FeatureCache(tmp_path / "c.h5")
    for i in IDS:
        shard(fc, [i], paths=f"/img/{i}.png")
    fc.compact(full=True)
    (seg,) = fc.segments()
    with h5py.File(seg, "r") as f:
        col = f["images/sha256"][()]
    row = int(np.flatnonzero(col == sha(2).encode())[0])
    _xor_byte(seg, "images/sha256", row * 64 + 63, ord("2") ^ ord("3"))  # row of image 2 now reads sha(3)
    metas = FeatureCache(fc.path).image_metas([sha(2), sha(3)])
    assert metas[sha(3)].paths == ["/img/3.png"] and sha(2) not in metas
    rep = verify(FeatureCache(fc.path))
    assert [d[1:] for d in rep.damaged] == [("images", sha(3))]
