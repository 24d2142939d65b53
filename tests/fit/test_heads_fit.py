"""Embedding pruning, attention-head selection and the layers head: planted signals are found, fits are
deterministic, and fit/score/eval read head contributions and block tokens from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipdet.cache import FeatureCache
from clipdet.evaluate.metrics import roc_auc
from clipdet.fit.head import fit_from_pool
from clipdet.fit.pools import Pool


def planted_pool(gens, n_per_gen=12, n_real=24, d=16, shortcut=3, seed=0, flip=()):
    """Reals and fakes in `d` dims: fakes shift weakly along coordinates 0-2 (every generator) and
    strongly along `shortcut`, positively except for generators in `flip` (negatively)."""
    rng = np.random.default_rng(seed)
    X = [rng.normal(size=(n_real, d))]
    labels, generators = ["real"] * n_real, [""] * n_real
    for g in gens:
        f = rng.normal(size=(n_per_gen, d))
        f[:, :3] += 0.9
        f[:, shortcut] += -2.5 if g in flip else 2.5
        X.append(f)
        labels += ["fake"] * n_per_gen
        generators += [g] * n_per_gen
    X = np.vstack(X).astype(np.float32)
    shas = [f"{seed}-{i}" for i in range(len(X))]
    return Pool(shas, labels, generators, shas, X)


def shortcut_refs(seed):
    """References from A, B (shortcut holds) and a few of C (shortcut flips)."""
    refs = planted_pool(["A", "B", "C"], n_per_gen=8, flip=("C",), seed=seed)
    c = [i for i, g in enumerate(refs.generator) if g == "C"]
    return refs.take([i for i, g in enumerate(refs.generator) if g != "C"] + c[:4])


def test_pruning_removes_a_shortcut_that_flips_on_an_unseen_generator():
    rises = []
    for seed in range(3):
        refs = shortcut_refs(seed)
        test = planted_pool(["D"], n_per_gen=60, n_real=60, seed=100 + seed, flip=("D",))  # D flips it too
        plain = fit_from_pool(refs, head="svm", attribute=False)
        pruned = fit_from_pool(refs, head="svm", attribute=False, prune=1)
        assert pruned.transform.removed.tolist() == [3]
        assert pruned.meta["prune"]["cv"] == "leave-one-generator-out"
        auc_plain = roc_auc(test.y, plain.decision_function(test.X))
        rises.append(roc_auc(test.y, pruned.decision_function(test.X)) - auc_plain)
    assert min(rises) > 0.03 and np.mean(rises) > 0.1, rises
    refs = shortcut_refs(0)
    test = planted_pool(["D"], n_per_gen=60, n_real=60, seed=100, flip=("D",))
    pca = fit_from_pool(refs, head="logreg", attribute=False, prune=1, prune_basis="pca")
    assert pca.transform.components.shape == (1, 16) and abs(pca.transform.components[0, 3]) > 0.5
    assert roc_auc(test.y, pca.decision_function(test.X)) > roc_auc(
        test.y, fit_from_pool(refs, head="logreg", attribute=False).decision_function(test.X))


def test_pruned_detector_round_trips(tmp_path):
    from clipdet.detectors.detector import Detector

    refs = planted_pool(["A", "B", "C"], flip=("C",))
    for head in ("knn", "mlp"):  # every head goes through the same transform
        det = fit_from_pool(refs, head=head, prune=2, params={"max_epochs": 20} if head == "mlp" else None)
        back = Detector.load(det.save(tmp_path / f"{head}.clipdet"))
        np.testing.assert_array_equal(back.decision_function(refs.X), det.decision_function(refs.X))
        assert back.transform.removed.tolist() == det.transform.removed.tolist()


def test_prune_errors_are_usage_errors():
    from clipdet.errors import UsageError

    refs = planted_pool(["A", "B"])
    with pytest.raises(UsageError, match="--prune 16"):
        fit_from_pool(refs, prune=16)
    with pytest.raises(UsageError, match="--prune-basis"):
        fit_from_pool(refs, prune=1, prune_basis="ica")


def planted_heads(n_per_class=16, units=6, dim=8, good=4, seed=0):
    """Rows of `units` head contributions; only head `good` separates fakes of both generators,
    head 1 separates only genA's fakes (a leave-one-generator-out selection must prefer `good`)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3 * n_per_class, units, dim))
    y = np.repeat([0, 1, 1], n_per_class)
    gens = np.array([""] * n_per_class + ["genA"] * n_per_class + ["genB"] * n_per_class, dtype=object)
    X[y == 1, good, :2] += 1.2
    X[gens == "genA", 1, :] += 2.0
    return X.reshape(len(X), -1), y, gens


def test_head_selection_recovers_the_planted_head():
    from clipdet.detectors import create_head

    X, y, gens = planted_heads()
    h = create_head("heads", k=1, n_units=6).fit(X, y, groups=gens)
    assert h.selected_.tolist() == [4] and h.selection_cv_ == "leave-one-generator-out"
    assert int(np.argmax(h.unit_auc_)) == 4
    h2 = create_head("heads", k=2, n_units=6).fit(X, y)  # no generator names: stratified folds
    assert 4 in h2.selected_ and h2.selection_cv_ == "stratified-k"
    lines = h.describe_fit({"kind": "heads", "blocks": [10, 11, 12], "n_heads": 2})
    assert "12.0 (AUC" in lines[0]  # unit 4 = block 12 (third block), head 0


def test_layers_head_learns_which_block_matters():
    from clipdet.detectors import create_head

    rng = np.random.default_rng(3)
    n, L, w = 60, 3, 8
    X = rng.normal(size=(n, L, w))
    y = np.repeat([0, 1], n // 2)
    X[y == 1, 2, :3] += 1.5  # only the last block carries the signal
    h = create_head("layers", n_units=L, hidden_size=16, max_epochs=80, lr=1e-2, calibration_cv=0)
    h.fit(X.reshape(n, -1), y)
    assert roc_auc(y, h.decision_function(X.reshape(n, -1))) > 0.95
    assert int(np.argmax(h.block_weights_)) == 2 and abs(h.block_weights_.sum() - 1) < 1e-9


# ---- through the cache and the CLI (tiny model) ----------------------------------------------------
@pytest.fixture
def heads_cache(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    """The labelled tree extracted with --heads 2 and --layers 0,1 (tiny model) into tmp_path/h.h5."""
    import clipdet
    from clipdet.extract.discover import discover
    from clipdet.extract.lazy import LazyBackbone

    cache = str(tmp_path / "h.h5")
    s = clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                        lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone, heads=2, layers=(0, 1)))
    assert s.ok and s.new == 24
    return cache


def test_fit_score_eval_with_heads_and_layers(run_cli, heads_cache, labelled_tree, tmp_path, make_image):
    out = {}
    for head, extra in (("heads", ["-p", "k=2"]), ("layers", ["-p", "hidden_size=16", "-p", "max_epochs=30"])):
        paths = []
        for i in range(2):  # twice with the same seed: the same bytes
            p = tmp_path / f"{head}{i}.clipdet"
            r = run_cli("fit", "-c", heads_cache, "--head", head, "-k", "5", "-o", p, "--prune", "2", *extra)
            assert r.exit_code == 0, r.output
            paths.append(p)
        assert paths[0].read_bytes() == paths[1].read_bytes()
        out[head] = r.output
        r = run_cli("eval", labelled_tree, "-d", paths[0], "-c", heads_cache, "--exclude-references", "--json")
        assert r.exit_code == 0, r.output
    assert "attention heads used (layer.head" in out["heads"] and "pruned coordinates" in out["heads"]
    assert "block importances: 0:" in out["layers"]
    # New images into a fresh cache: scoring extracts the head contributions the detector reads.
    new = make_image(tmp_path / "new" / "x.png", seed=77)
    r = run_cli("score", new.parent, "-d", tmp_path / "heads0.clipdet", "-c", tmp_path / "fresh.h5", "-o", "-")
    assert r.exit_code == 0, r.output
    assert "x.png" in r.output and ",," in r.output


def test_missing_heads_or_layers_is_a_one_line_error(run_cli, fitted):
    _, cache, _ = fitted  # extracted without --heads or --layers
    for head, hint in (("heads", "extract with --heads 4 first"), ("layers", "extract with --layers")):
        r = run_cli("fit", "-c", cache, "--head", head, "-k", "4", "-o", Path(cache).with_suffix(".d"))
        assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith("clipdet: error")]) == 1


def test_extract_heads_beyond_the_blocks_is_a_usage_error(run_cli, tiny_spec, labelled_tree, tmp_path):
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", tmp_path / "x.h5", "--heads", "3", "-q")
    assert r.exit_code == 2 and "--heads 3" in r.output and "Traceback" not in r.output


def test_bench_runs_the_new_heads_with_pruning(run_cli, heads_cache, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", "-c", heads_cache, "--heads", "heads,layers,svm", "--ks", "3", "--seeds", "1", "--shots", "3",
                "--protocol", "kshot,logo", "--prune", "1", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    for head in ("heads", "layers", "svm"):
        assert f"k-shot {head}" in r.output and f"logo   {head}" in r.output
    import json

    assert json.loads((out / "run.json").read_text())["config"]["fit_options"] == {"prune": 1, "prune_basis": "coord"}


def test_serve_refuses_a_heads_detector_in_one_line(heads_cache, tmp_path):
    from clipdet.errors import UsageError
    from clipdet.fit.run import fit
    from clipdet.serve.engine import Engine

    det = fit(head="heads", shots=4, cache=heads_cache)
    with pytest.raises(UsageError, match="clipdet score instead"):
        Engine(det)


def test_column_auc_ranks_ties_like_scipy():
    from scipy.stats import rankdata

    from clipdet.detectors.refcv import average_ranks, column_auc

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 30):
        S = rng.integers(0, 4, size=(n, 5)).astype(float)  # many ties
        np.testing.assert_allclose(average_ranks(S), rankdata(S, axis=0))
    y = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(column_auc(np.array([[0, 1, 1.0], [1, 0, 1], [2, 0, 1], [3, 1, 1]]), y), [1, 0.5, 0.5])


def test_serve_with_a_cache_that_stores_heads(heads_cache, tmp_path, make_image):
    """Read-only serving only needs the backbone to match; --cache-write keeps the group's heads and layers."""
    from clipdet.cache import FeatureCache
    from clipdet.extract.decode import sha256_bytes
    from clipdet.fit.run import fit
    from clipdet.serve.engine import Engine

    det = fit(head="svm", shots=4, cache=heads_cache)
    data = make_image(tmp_path / "up.png", size=(80, 60), seed=91).read_bytes()
    scores = []
    for write in (False, True):
        engine = Engine(det, cache=heads_cache, cache_write=write, device="cpu")
        engine.load()
        scores.append(engine.run_batch([engine.prepare("up.png", data)])[0]["score"])
    assert scores[0] == pytest.approx(scores[1])
    rows = FeatureCache(heads_cache).load(det.backbone_key, "clean", shas=[sha256_bytes(data)], with_heads=True,
                                          with_layers=True)
    assert rows.heads.shape == (1, 4, 32) and rows.layers.shape[1] == 2


def test_heads_reading_blocks_refuse_caption_features_and_zero_shot_refuses_pruning(run_cli, heads_cache,
                                                                                    tmp_path):
    for cmd in (["fit", "-o", tmp_path / "x.clipdet", "-k", "4"], ["bench", "-o", tmp_path / "b", "--ks", "2"]):
        head_opt = ["--head", "heads"] if cmd[0] == "fit" else ["--heads", "heads"]
        r = run_cli(*cmd, "-c", heads_cache, *head_opt, "--features", "image+text")
        assert r.exit_code == 2 and "take --features image" in r.output and "Traceback" not in r.output
    r = run_cli("fit", "-c", heads_cache, "--head", "zeroshot", "--shots", "0", "--prune", "2",
                "-o", tmp_path / "z.clipdet")
    assert r.exit_code == 2 and "--prune" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "z.clipdet").exists()


def test_scoring_checks_the_cache_holds_what_the_detector_reads(run_cli, heads_cache, labelled_tree, tmp_path,
                                                                tiny_spec, tiny_backbone, fitted):
    import clipdet
    from clipdet.detectors.detector import Detector
    from clipdet.extract.discover import discover
    from clipdet.extract.lazy import LazyBackbone

    lay, hd = tmp_path / "l.clipdet", tmp_path / "h.clipdet"
    for head, out, extra in (("layers", lay, ["-p", "hidden_size=16", "-p", "max_epochs=20"]), ("heads", hd, [])):
        r = run_cli("fit", "-c", heads_cache, "--head", head, "-k", "5", "-o", out, *extra)
        assert r.exit_code == 0, r.output
    real = labelled_tree / "real"
    # the same blocks stored in the other order: read in the detector's order, same scores
    other = str(tmp_path / "rev.h5")
    clipdet.extract(discover([str(real)]), tiny_spec, cache=other,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone, layers=(1, 0)))
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run_cli("score", real, "-d", lay, "-c", heads_cache, "-o", a).exit_code == 0
    assert run_cli("score", real, "-d", lay, "-c", other, "-o", b).exit_code == 0
    assert a.read_text() == b.read_text()
    # other blocks / heads, or none: one line naming the cache and what differs, before any extraction
    one = str(tmp_path / "one.h5")
    clipdet.extract(discover([str(real)]), tiny_spec, cache=one,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone, layers=(1,), heads=1))
    _, plain, _ = fitted
    for det, cache, says in ((hd, one, "hold the heads of blocks [1]"), (lay, one, "CLS tokens of blocks [1]"),
                             (hd, plain, "no attention-head contributions"), (lay, plain, "no block CLS tokens")):
        for cmd in ("score", "eval"):
            r = run_cli(cmd, real if cmd == "score" else labelled_tree, "-d", det, "-c", cache)
            assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
            assert len([ln for ln in r.output.splitlines() if ln.startswith("clipdet: error")]) == 1
    # --prune on block tokens removes the same coordinates from every token (indices within one token)
    r = run_cli("fit", "-c", heads_cache, "--head", "layers", "-k", "5", "--prune", "3", "-o", tmp_path / "p.clipdet",
                "-p", "hidden_size=16", "-p", "max_epochs=20")
    assert r.exit_code == 0, r.output
    t = Detector.load(tmp_path / "p.clipdet").transform
    width = FeatureCache(heads_cache).load(tiny_backbone.info.key, "clean", with_layers=True).layers.shape[2]
    assert t.dim == width and len(t.removed) == 3 and t.removed.max() < width
