"""Evaluation protocols on synthetic pools (Gaussian clusters on the unit sphere) and `clipdet bench` end to end."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from conftest import clear_tqdm_disable

from clipdet.errors import UsageError
from clipdet.evaluate import bench, common, kshot, logo, parse, record, robustness, shortcut
from clipdet.fit.pools import Pool

D = 32
HEADS = "centroid,logreg"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_pool(n_real=60, n_per_gen=30, gens=("ga", "gb", "gc"), odd="odd", sep=0.8, noise=1.4, seed=0,
              extra_real=None, extra_fake=None) -> Pool:
    """Reals around e0; generators around e0 + sep*e1 (+ a small own direction); `odd` around e0 + sep*e2,
    a direction the others never show. `extra_real`/`extra_fake`: vectors added to every real/fake."""
    rng = np.random.default_rng(seed)
    e = np.eye(D)
    X, lab, gen, sha = [], [], [], []

    def add(center, n, label, g):
        for _ in range(n):
            v = center + noise * rng.normal(size=D) / np.sqrt(D)
            if label == "real" and extra_real is not None:
                v = v + extra_real
            if label == "fake" and extra_fake is not None:
                v = v + extra_fake
            X.append(v)
            lab.append(label)
            gen.append(g)
            sha.append(hashlib.sha256(f"{seed}/{label}/{g}/{len(sha)}".encode()).hexdigest())

    add(e[0], n_real, "real", "")
    for i, g in enumerate(gens):
        add(e[0] + sep * e[1] + 0.3 * e[3 + i], n_per_gen, "fake", g)
    if odd:
        add(e[0] + sep * e[2], n_per_gen, "fake", odd)
    return Pool(sha, lab, gen, [f"/data/{s[:10]}.png" for s in sha], _unit(np.array(X)).astype(np.float32))


def shuffled(pool: Pool, seed: int = 1) -> Pool:
    return pool.take(np.random.default_rng(seed).permutation(len(pool)).tolist())


@pytest.fixture(scope="module")
def pool() -> Pool:
    return make_pool()


# --------------------------------------------------------------------------- k-shot


def test_kshot_rows_and_disjoint_splits(pool):
    ks, seeds = [1, 2, 5, 10], 3
    rows = kshot.kshot_curve(pool, HEADS, ks, seeds)
    assert len(rows) == 2 * len(ks) * seeds and not rows.notes
    assert {(r["head"], r["k"], r["seed"]) for r in rows} == {(h, k, s) for h in ("centroid", "logreg")
                                                              for k in ks for s in range(seeds)}
    for r in rows:
        assert r["n_train_real"] == r["n_train_fake"] == r["k"]
        assert r["n_train"] + r["n_test"] == len(pool)
        assert 0.0 <= r["auc"] <= 1.0
        assert r["calibration"] == ("none" if r["k"] == 1 else r["calibration"])
        assert set(common.METRICS) <= set(r)
    for k in ks:
        train, test = common.split_references(pool, k, seed=0)
        assert not {pool.sha256[i] for i in train} & {pool.sha256[i] for i in test}
        assert sorted(train + test) == list(range(len(pool)))


def test_kshot_nested_draws_and_duplicates_never_leak(pool):
    small, _ = common.split_references(pool, 2, seed=4)
    big, _ = common.split_references(pool, 10, seed=4)
    assert set(small) <= set(big)
    dup = Pool(pool.sha256 + pool.sha256[:5], pool.label + pool.label[:5], pool.generator + pool.generator[:5],
               pool.path + ["/copy"] * 5, np.vstack([pool.X, pool.X[:5]]))
    for seed in range(5):
        train, test = common.split_references(dup, 3, seed)
        assert not {dup.sha256[i] for i in train} & {dup.sha256[i] for i in test}


def test_kshot_skips_k_larger_than_available():
    small = make_pool(n_real=8, n_per_gen=4, gens=("ga", "gb"), odd="")
    rows = kshot.kshot_curve(small, "centroid", [2, 8, 50], 2)
    assert {r["k"] for r in rows} == {2}
    assert len(rows.notes) == 2 and "K=8" in rows.notes[0] and "K=50" in rows.notes[1]


def test_auc_rises_with_k_on_an_easy_task(pool):
    summ = {(s["head"], s["k"]): s for s in kshot.summarise_kshot(kshot.kshot_curve(pool, HEADS, [1, 5, 20], 5))}
    for h in ("centroid", "logreg"):
        a1, a5, a20 = (summ[(h, k)]["auc_mean"] for k in (1, 5, 20))
        assert a1 < a20 and a5 < a20 + 0.02
        assert a20 > 0.85
        assert summ[(h, 20)]["n"] == 5 and summ[(h, 20)]["auc_ci95"] > 0


def test_deterministic_by_seed_and_order_free(pool):
    a = kshot.kshot_curve(pool, HEADS, [2, 10], [0, 1])
    b = kshot.kshot_curve(pool, HEADS, [2, 10], [0, 1])
    assert a == b
    c = kshot.kshot_curve(pool, HEADS, [2, 10], [5, 6])
    assert [r["auc"] for r in a] != [r["auc"] for r in c]
    d = kshot.kshot_curve(shuffled(pool), HEADS, [2, 10], [0, 1])
    for x, y in zip(a, d):
        assert x["n_test"] == y["n_test"] and x["auc"] == pytest.approx(y["auc"], abs=1e-6)


# --------------------------------------------------------------------------- leave one generator out


def test_logo_flags_the_unlike_generator(pool):
    rows = logo.leave_one_generator_out(pool, HEADS, shots=10, seeds=3)
    assert len(rows) == 2 * 4 * 3
    summ = logo.summarise_logo(rows)
    for h in ("centroid", "logreg"):
        auc = {s["generator"]: s["auc_mean"] for s in summ if s["head"] == h}
        assert set(auc) == {"ga", "gb", "gc", "odd"}
        assert auc["odd"] < min(auc["ga"], auc["gb"], auc["gc"]) - 0.2
        seen = {s["generator"]: s["auc_seen_mean"] for s in summ if s["head"] == h}
        assert seen["odd"] > auc["odd"] + 0.2  # the same detectors do fine on generators they saw
    for r in rows:  # the held-out generator is never a reference, and test reals are not references
        assert r["n_test_fake"] == 30 and r["n_test_real"] == 60 - r["n_train_real"]


def test_logo_all_references_keeps_reals_back_and_needs_two_generators(pool):
    rows = logo.leave_one_generator_out(pool, "centroid", shots=None, seeds=2)
    assert rows and all(r["n_test_real"] == 30 and r["shots"] == "all" for r in rows)
    assert all(math.isnan(r["auc_seen"]) for r in rows)
    with pytest.raises(UsageError, match="at least 2 named generators"):
        logo.leave_one_generator_out(make_pool(gens=("ga",), odd=""), "centroid", 5, 2)


# --------------------------------------------------------------------------- robustness


def test_robustness_view_that_destroys_the_signal_scores_lower(pool):
    rng = np.random.default_rng(3)
    noise = Pool(pool.sha256, pool.label, pool.generator, pool.path,
                 _unit(rng.normal(size=pool.X.shape)).astype(np.float32))
    rev = shuffled(pool, 7)  # another view in another order: aligned by content hash
    rows = robustness.robustness({"clean": pool, "blur:1": noise, "crop:224": rev}, HEADS, shots=10, seeds=3)
    assert len(rows) == 2 * 3 * 3 and all(r["fit_view"] == "clean" for r in rows)
    assert any("no jpeg:95 features" in n for n in rows.notes)
    summ = {(s["head"], s["view"]): s for s in robustness.summarise_robustness(rows)}
    for h in ("centroid", "logreg"):
        assert summ[(h, "clean")]["auc_mean"] > 0.8
        assert summ[(h, "crop:224")]["auc_mean"] == pytest.approx(summ[(h, "clean")]["auc_mean"])
        assert summ[(h, "blur:1")]["auc_mean"] < summ[(h, "clean")]["auc_mean"] - 0.2
        assert summ[(h, "blur:1")]["delta_auc_mean"] < -0.2
    assert shortcut.format_shortcut(rows) == []
    views = {"clean": pool, "blur:1": noise, "crop:224": rev}
    shift = {r["view"]: r["relative_shift"] for r in robustness.view_shift(views)}
    assert shift["crop:224"] == 0.0 and shift["blur:1"] > 0.5


def test_robustness_uses_identical_image_sets(pool):
    partial = pool.take(list(range(10, len(pool))))  # a view missing 10 images
    rows = robustness.robustness({"clean": pool, "resize:0.5": partial}, "centroid", shots=5, seeds=2)
    assert any("10 image(s)" in n for n in rows.notes)
    by_seed: dict[int, set] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add((r["n_test"], r["n_test_real"], r["n_test_fake"]))
    assert all(len(v) == 1 for v in by_seed.values())
    with pytest.raises(UsageError, match="clean"):
        robustness.robustness({"jpeg:95": pool}, "centroid", 5, 2)


def test_format_shortcut_delta_is_reported():
    # Real files carry a "format" cue on e6 (say JPEG vs PNG) that re-encoding everything removes;
    # the content signal is weak, so a detector fitted on the clean files leans on the cue.
    cue = np.zeros(D)
    cue[6] = 2.0
    clean = make_pool(sep=0.15, extra_real=cue, seed=2)
    reenc = make_pool(sep=0.15, seed=2)  # same hashes, same noise, no cue
    assert clean.sha256 == reenc.sha256
    rows = robustness.robustness({"clean": clean, "jpeg:95": reenc}, HEADS, shots=10, seeds=3)
    assert {(r["fit_view"], r["view"]) for r in rows} == {("clean", "clean"), ("clean", "jpeg:95"),
                                                           ("jpeg:95", "jpeg:95")}
    checks = shortcut.format_shortcut(rows)
    assert [c["head"] for c in checks] == ["centroid", "logreg"]
    for c in checks:
        assert c["auc_clean"] > 0.95
        assert c["delta"] == pytest.approx(c["auc_reencoded"] - c["auc_clean"])
        assert c["delta"] < -0.2 and "drops" in c["verdict"]
        assert c["delta_refit"] < -0.2 and c["n"] == 3
    same = robustness.robustness({"clean": reenc, "jpeg:95": reenc}, "centroid", shots=10, seeds=2)
    assert shortcut.format_shortcut(same)[0]["delta"] == 0.0
    assert "no sign" in shortcut.format_shortcut(same)[0]["verdict"]


def test_format_breakdown():
    p = make_pool(n_real=4, n_per_gen=2, gens=("ga",), odd="")
    fmts = {s: ("JPEG" if lab == "real" else "PNG") for s, lab in zip(p.sha256, p.label)}
    fb = shortcut.format_breakdown(p, fmts)
    assert fb["total_variation"] == 1.0
    assert {(r["label"], r["format"], r["count"]) for r in fb["rows"]} == {("real", "JPEG", 4), ("fake", "PNG", 2)}
    assert shortcut.format_breakdown(p, {s: "PNG" for s in p.sha256})["total_variation"] == 0.0


# --------------------------------------------------------------------------- reproducibility and parsing


def test_manifest_hash_is_order_free_and_content_sensitive(pool):
    h = record.manifest_hash(pool)
    assert len(h) == 64 and record.manifest_hash(shuffled(pool)) == h
    relabelled = Pool(pool.sha256, ["fake"] + pool.label[1:], ["x"] + pool.generator[1:], pool.path, pool.X)
    assert record.manifest_hash(relabelled) != h
    assert record.manifest_hash(pool.take(range(len(pool) - 1))) != h


def test_run_record(pool):
    rec = record.run_record({"seeds": [0, 1], "heads": ["svm"], "backbone": "x:random"}, pool)
    assert rec["manifest_hash"] == record.manifest_hash(pool) and rec["seeds"] == [0, 1]
    assert rec["config"]["backbone"] == "x:random" and rec["n_images"] == len(pool)
    for key in ("python", "clipdet", "numpy", "scikit-learn"):
        assert rec["versions"][key]
    assert rec["machine"]["cpu_count"] and rec["machine"]["platform"]
    json.dumps(rec)


def test_parsing_and_validation(pool):
    assert parse.parse_seeds(3) == [0, 1, 2] and parse.parse_seeds("4,2") == [4, 2]
    assert parse.parse_ks("10,1,2,2") == [1, 2, 10]
    assert bench.parse_protocols("all") == list(bench.PROTOCOLS)
    assert bench.parse_protocols("robustness,kshot") == ["kshot", "robustness"]
    for bad in (lambda: parse.parse_seeds(0), lambda: parse.parse_seeds("1,1"), lambda: parse.parse_ks("0,1"),
                lambda: parse.parse_ks("a"), lambda: bench.parse_protocols("foo"),
                lambda: parse.parse_heads("svm,nope")):
        with pytest.raises(UsageError):
            bad()
    with pytest.raises(UsageError, match="real and fake"):
        kshot.kshot_curve(pool.take([i for i, lab in enumerate(pool.label) if lab == "real"]), "centroid", [1], 1)


def test_summarise_ignores_nan_and_gives_half_width():
    rows = [{"head": "h", "k": 1, "auc": a} for a in (0.6, 0.7, 0.8, float("nan"))]
    (s,) = common.summarise(rows, ("head", "k"), ("auc",))
    assert s["n"] == 4 and s["auc_mean"] == pytest.approx(0.7)
    assert s["auc_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-4)


def test_run_bench_and_write_bench(tmp_path, pool):
    clean = pool
    pools = {"clean": clean, "jpeg:95": clean}
    fmts = {s: "PNG" for s in clean.sha256}
    res = bench.run_bench(pools, "all", "centroid", [1, 5], 2, 5, formats=fmts, config={"backbone": "syn"})
    assert len(res.kshot) == 4 and len(res.logo) == 8 and len(res.robustness) == 2 * 3
    assert res.record["config"]["backbone"] == "syn" and res.record["manifest_hash"] == record.manifest_hash(clean)
    files = bench.write_bench(res, tmp_path / "out")
    for name in ("kshot.csv", "logo.csv", "robustness.csv", "run.json", "report.md", "kshot_auc.png",
                 "format_shortcut.csv"):
        assert name in files and (tmp_path / "out" / name).is_file()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["heads"] == ["centroid"] and run["summaries"]["kshot"][0]["k"] == 1
    text = (tmp_path / "out" / "report.md").read_text()
    assert "K-shot curve" in text and "Leave one generator out" in text and "Format-shortcut check" in text


# --------------------------------------------------------------------------- CLI end to end


def test_bench_cli_end_to_end(tmp_path, tiny_spec, labelled_tree, monkeypatch):
    """`clipdet bench` on conftest's tiny model and image tree, through a typer app of its own (so the test
    does not depend on cli.py registering the command)."""
    import warnings

    import typer
    from typer.testing import CliRunner

    from clipdet.cli.bench import register

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the CLI changes both
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    clear_tqdm_disable(monkeypatch)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    out = tmp_path / "bench"
    args = ["bench", str(labelled_tree), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"), "--out", str(out),
            "--heads", "centroid,logreg", "--ks", "1,2,4", "--seeds", "2", "--shots", "3", "--views", "jpeg:95,blur:2",
            "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 real, 16 fake images (2 generators)" in r.output and "report:" in r.output
    assert "provenance marks (not in any fit or AUC): real 0/8, fake 0/16" in r.output
    for name in ("kshot.csv", "logo.csv", "robustness.csv", "run.json", "report.md"):
        assert (out / name).is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["views"] == ["clean", "jpeg:95", "blur:2"] and run["config"]["seeds"] == [0, 1]
    assert run["config"]["backbone"] == tiny_spec and len(run["manifest_hash"]) == 64
    assert {r["format"] for r in run["formats"]["rows"]} == {"PNG", "JPEG"}
    assert len((out / "kshot.csv").read_text().splitlines()) == 1 + 2 * 3 * 2
    # Second run: everything cached, same rows.
    first = (out / "kshot.csv").read_text()
    r2 = CliRunner().invoke(app, args[:-1] + ["--protocol", "kshot", "--quiet"])
    assert r2.exit_code == 0, r2.output
    assert (out / "kshot.csv").read_text() == first
    bad = CliRunner().invoke(app, args + ["--heads", "nope"])
    assert bad.exit_code == 2 and "unknown head" in bad.output
