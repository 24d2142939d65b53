"""`cache import` edge cases: a cache extracted with --layers, null rows in a fixed-size-list column (what
`cache export` writes), an embedding column of the wrong type."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hex_sha as _sha
from conftest import unit_rows as _unit

from clipdet.cache import FeatureCache, FeatureRows, ImageMeta

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def key_attrs(tiny_spec):
    from clipdet.backbones.attrs import backbone_attrs

    return backbone_attrs(tiny_spec)


def test_import_into_a_group_extracted_with_layers_is_refused_up_front(tmp_path, tiny_spec, key_attrs, run_cli):
    key, attrs = key_attrs
    dim = attrs["dim"]
    fc = FeatureCache(tmp_path / "c.h5")
    rows = FeatureRows([_sha(1)], _unit(1, dim), layers=_unit(1, dim)[:, None, :])
    fc.write_shard({(key, "clean"): (rows, {**attrs, "layers": [1]})}, images=[ImageMeta(_sha(1), "real")])
    before = fc.segments()
    pq.write_table(pa.table({"sha256": [_sha(2)], "embedding": [list(map(float, _unit(1, dim, 1)[0]))]}),
                   tmp_path / "a.parquet")
    r = run_cli("cache", "import", str(tmp_path / "a.parquet"), "-b", tiny_spec, "-c", fc.path)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and fc.path in lines[0] and "--layers 1" in lines[0], r.output
    assert FeatureCache(fc.path).segments() == before  # nothing landed: the cache is as it was
    (g,) = FeatureCache(fc.path).groups()
    assert g.layers == [1] and g.count == 1


def test_null_row_in_a_fixed_size_list_column_is_rejected_and_named(tmp_path, tiny_spec, key_attrs, run_cli):
    key, attrs = key_attrs
    dim = attrs["dim"]
    x = _unit(3, dim)
    flat = pa.array(x.ravel(), pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array([False, True, False]))
    pq.write_table(pa.table({"sha256": [_sha(1), _sha(2), _sha(3)], "embedding": emb}), tmp_path / "a.parquet")
    r = run_cli("cache", "import", str(tmp_path / "a.parquet"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"))
    assert r.exit_code == 1, r.output
    assert "imported 2 row(s), rejected 1" in r.stdout and "a.parquet row 1: embedding is null" in r.stderr, r.output
    fc = FeatureCache(tmp_path / "c.h5")
    got = fc.load(key, "clean", shas=[_sha(1), _sha(3)])
    np.testing.assert_allclose(got.embedding, x[[0, 2]], atol=2e-3)


@pytest.mark.parametrize("column", [["a", "b"], [1.0, 2.0]])
def test_embedding_column_of_another_type_is_one_line(tmp_path, tiny_spec, column, run_cli):
    pq.write_table(pa.table({"sha256": [_sha(1), _sha(2)], "embedding": column}), tmp_path / "a.parquet")
    r = run_cli("cache", "import", str(tmp_path / "a.parquet"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"))
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "list_value_length" not in r.output
    want = "string" if isinstance(column[0], str) else "double"
    lines = [ln for ln in r.stderr.splitlines() if "rejected:" in ln]
    assert len(lines) == 1 and "a.parquet: column embedding is " + want in lines[0] and "expected a list" in lines[0]
    assert "imported 0 row(s), rejected 2" in r.stdout
