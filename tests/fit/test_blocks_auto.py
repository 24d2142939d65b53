"""Heads reading chosen blocks (--blocks POOL:BLOCKS: CLS tokens, patch-token means, both) and
`--head auto` choosing head, blocks and pruning by cross-validation on the references."""

from __future__ import annotations

import numpy as np
import pytest

from clipdet.detectors.features import parse_blocks, resolve_blocks, select_units
from clipdet.errors import UsageError
from clipdet.fit.config import FitConfig
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def test_parse_resolve_select_blocks():
    assert parse_blocks("mean:6") == ("layers_mean", "6")
    assert parse_blocks("both") == ("layers_both", "all")
    with pytest.raises(UsageError, match="POOL cls, mean or both"):
        parse_blocks("avg:3")
    stored = list(range(12))
    assert resolve_blocks("4-6,9", stored) == [4, 5, 6, 9]
    assert resolve_blocks("-1", stored) == [11]
    assert resolve_blocks("middle", stored) == [3, 4, 5, 6, 7, 8]
    with pytest.raises(UsageError, match="not among the stored blocks"):
        resolve_blocks("12", stored)
    M = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3 * 2 * 4)  # both: 3 blocks x (cls, mean) x 4
    out, lay = select_units(M, {"kind": "layers_both", "blocks": [0, 5, 9], "units": 6}, "9")
    units = M.reshape(2, 6, 4)
    np.testing.assert_array_equal(out, np.hstack([units[:, 2], units[:, 5]]))
    assert lay == {"kind": "layers_both", "blocks": [9], "units": 2, "dim": 4}


def block_pool(n=40, L=4, w=8, gens=("a", "b", "c"), seed=0) -> Pool:
    """Reals and fakes whose block-2 patch means carry the signal; the final embedding is noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    cls = rng.normal(size=(n, L, w))
    mean = rng.normal(size=(n, L, w))
    mean[y == 1, 2, :2] += 3.0
    lay = {"kind": "layers", "blocks": list(range(L)), "units": L, "dim": w}
    return Pool([f"{i:064x}" for i in range(n)], ["fake" if t else "real" for t in y],
                [gens[i % len(gens)] if t else "" for i, t in enumerate(y)], [""] * n, rng.normal(size=(n, w)),
                {"layers": (cls.reshape(n, -1), lay),
                 "layers_mean": (mean.reshape(n, -1), dict(lay, kind="layers_mean"))})


def test_linear_head_reads_one_block_mean():
    pool = block_pool()
    det = fit_from_pool(pool, FitConfig(head="svm", blocks="mean:2"), attribute=False)
    assert det.layout == {"kind": "layers_mean", "blocks": [2], "units": 1, "dim": 8}
    X = pool.matrix("layers_mean", [2])[0]
    from clipdet.evaluate.metrics import roc_auc

    assert roc_auc(pool.y, det.decision_function(X)) > 0.95
    with pytest.raises(UsageError, match="reads heads features"):
        fit_from_pool(pool, FitConfig(head="heads", blocks="mean:2"))


def test_auto_finds_the_block_and_is_deterministic():
    pool = block_pool()
    a = fit_from_pool(pool, FitConfig(head="auto"), attribute=False)
    b = fit_from_pool(pool, FitConfig(head="auto"), attribute=False)
    assert a.meta["auto"] == b.meta["auto"]
    auto = a.meta["auto"]
    assert auto["cv"] == "leave-one-generator-out"
    assert auto["chosen"]["blocks"] in ("mean:2", "mean:middle", "both:middle")
    assert a.meta["head"] == auto["chosen"]["head"] and a.layout["kind"] in ("layers_mean", "layers_both")
    ranking = auto["ranking"]
    finals = [r for r in ranking if r["blocks"] == ""]
    assert finals and max(r["auc"] for r in finals) < ranking[0]["auc"]
    assert len({(r["head"], r["blocks"], r["prune"]) for r in ranking}) == len(ranking)
    # every feature setting with the centroid head; svm and logreg on the final embedding and the best ones
    assert {r["blocks"] for r in ranking if r["head"] == "centroid" and not r["prune"]} == \
        {""} | {f"{p}:{b}" for p in ("cls", "mean") for b in range(4)} | {"cls:middle", "mean:middle", "both:middle"}
    assert {("svm", ""), ("logreg", "")} <= {(r["head"], r["blocks"]) for r in ranking}
    assert any(r["prune"] for r in ranking)


# ---- through the cache and the CLI (tiny model, blocks 0 and 1) -------------------------------------
@pytest.fixture
def blocks_cache(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    import clipdet
    from clipdet.extract.discover import discover
    from clipdet.extract.lazy import LazyBackbone

    cache = str(tmp_path / "b.h5")
    clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone, layers=(0, 1)))
    return cache


def test_cli_blocks_and_auto_fit_score_eval(run_cli, blocks_cache, labelled_tree, tmp_path):
    from clipdet.detectors.detector import Detector

    det = tmp_path / "m.clipdet"
    r = run_cli("fit", "-c", blocks_cache, "--blocks", "mean:1", "-k", "5", "-o", det)
    assert r.exit_code == 0, r.output
    assert Detector.load(det).layout["kind"] == "layers_mean"
    out = tmp_path / "s.csv"
    assert run_cli("score", labelled_tree / "real", "-d", det, "-c", blocks_cache, "-o", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 9
    auto = tmp_path / "a.clipdet"
    r = run_cli("fit", "-c", blocks_cache, "--head", "auto", "-k", "6", "-o", auto)
    assert r.exit_code == 0, r.output
    assert "--head auto:" in r.output and "chosen:" in r.output and "cls:0" in r.output
    d = Detector.load(auto)
    assert d.meta["auto"]["chosen"]["head"] == d.meta["head"]
    r = run_cli("eval", labelled_tree, "-d", auto, "-c", blocks_cache, "--exclude-references", "--json")
    assert r.exit_code == 0, r.output


def test_cli_means_missing_from_an_old_cache_say_how_to_get_them(run_cli, blocks_cache, tmp_path):
    import h5py

    from clipdet.cache import FeatureCache

    for seg in FeatureCache(blocks_cache).segments():  # strip the means: a cache written before they existed
        with h5py.File(seg, "r+") as f:
            for key in f["features"]:
                del f[f"features/{key}/clean/layers_mean"]
    r = run_cli("fit", "-c", blocks_cache, "--blocks", "mean:1", "-k", "5", "-o", tmp_path / "x.clipdet")
    assert r.exit_code == 2 and "extract again into a new cache with --layers" in r.output, r.output
    assert "Traceback" not in r.output
    r = run_cli("fit", "-c", blocks_cache, "--blocks", "cls:1", "-k", "5", "-o", tmp_path / "y.clipdet")
    assert r.exit_code == 0, r.output


def test_cli_bench_takes_head_auto(run_cli, blocks_cache, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", "-c", blocks_cache, "--heads", "svm,auto", "--protocol", "kshot", "--ks", "4",
                "--seeds", "1", "-o", out)
    assert r.exit_code == 0, r.output
    import csv

    rows = list(csv.DictReader((out / "kshot.csv").read_text().splitlines()))
    assert {row["head"] for row in rows} == {"svm", "auto"}


def test_one_standard_error_rule_prefers_the_steadier_setting():
    from clipdet.fit.auto import Candidate, pick

    feats = ["", "mean:middle", "both:middle", "cls:middle", "mean:3"]
    ranked = [Candidate("centroid", "mean:3", 0, 0.90, 0.2, 17), Candidate("svm", "mean:middle", 0, 0.86, 0.2, 17),
              Candidate("svm", "", 0, 0.60, 0.1, 17)]
    assert pick(ranked, feats) is ranked[1]  # 0.86 is within one SE (0.05) of 0.90
    ranked[1].auc = 0.80
    assert pick(ranked, feats) is ranked[0]  # not any more
