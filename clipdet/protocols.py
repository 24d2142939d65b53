"""Evaluation protocols over cached features: k-shot curves, leave-one-generator-out, robustness.

Everything here works from `Pool`s (labelled cached embeddings, see `clipdet.fewshot`); nothing is
extracted or printed. Each protocol returns `Rows` (a list of plain dicts, one per fitted detector and
test set, plus `notes` saying what was skipped and why); `summarise*` turn them into mean and 95%
t-interval half-widths over seeds (`metrics.mean_ci`).

Honesty rules shared by every protocol:

- references are drawn with `fewshot.sample_shots` from content hashes and a seed, so the same files
  in any order and the same seeds give the same rows;
- the test set never contains a reference (disjoint by SHA-256);
- thresholds come from the references only (out-of-fold calibration at `target_fpr`); with a single
  reference per class there is nothing to calibrate on, the threshold is the head's natural 0 and the
  row's ``calibration`` column says "none" (ranking metrics such as AUC do not depend on it).

`run_bench` runs the selected protocols and `write_bench` writes CSV, JSON and a Markdown report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .fewshot import DEFAULT_TARGET_FPR, Pool, fit_from_pool, sample_shots

#: Per-row metrics, as named by `metrics.binary_report`.
METRICS = ("auc", "ap", "accuracy", "balanced_accuracy", "tpr_at_1pct_fpr", "eer")
#: The issue's K grid (shots per class).
DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100)
DEFAULT_VIEWS = ("jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1", "crop:224")
SHORTCUT_VIEW = "jpeg:95"
PROTOCOLS = ("kshot", "logo", "robustness")


class Rows(list):
    """A list of result rows (dicts) that also carries `notes`: what was skipped, and why."""

    def __init__(self, rows: Iterable[dict] = (), notes: Iterable[str] = ()):
        super().__init__(rows)
        self.notes: list[str] = list(notes)


# --------------------------------------------------------------------------- argument parsing


def parse_seeds(seeds: int | str | Iterable[int]) -> list[int]:
    """Seeds from a count (5 → 0..4) or an explicit list ("0,7,9" or [0, 7, 9]); no repeats."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise UsageError(f"--seeds {seeds}: expected at least 1 seed")
        return list(range(int(seeds)))
    items = seeds.split(",") if isinstance(seeds, str) else list(seeds)
    try:
        out = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise UsageError(f"seeds {seeds!r}: expected integers") from None
    if not out:
        raise UsageError("expected at least 1 seed")
    if len(set(out)) != len(out):
        raise UsageError(f"seeds {out}: repeated seed")
    return out


def parse_ks(ks: str | Iterable[int]) -> list[int]:
    """Shots per class for a k-shot curve from "1,2,5" or a list; sorted, unique, each >= 1."""
    items = ks.split(",") if isinstance(ks, str) else list(ks)
    try:
        out = sorted({int(str(k).strip()) for k in items if str(k).strip()})
    except ValueError:
        raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers like 1,2,5,10") from None
    if not out or out[0] < 1:
        raise UsageError(f"--ks {ks!r}: expected comma-separated positive integers like 1,2,5,10")
    return out


def parse_heads(heads: str | Iterable[str]) -> list[str]:
    """Head names from "svm,logreg" or a list, checked against the head registry (in order, no repeats)."""
    from .detectors import list_heads

    items = heads.split(",") if isinstance(heads, str) else list(heads)
    out: list[str] = []
    for h in (str(x).strip() for x in items):
        if h and h not in out:
            out.append(h)
    if not out:
        raise UsageError("--heads: expected at least one head name")
    unknown = [h for h in out if h not in list_heads()]
    if unknown:
        raise UsageError(f"unknown head(s) {', '.join(unknown)}; heads are: {', '.join(list_heads())}")
    return out


def parse_protocols(spec: str | Iterable[str]) -> list[str]:
    """Protocol names from "kshot,logo", "all" or a list, in canonical order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {str(x).strip().lower() for x in items if str(x).strip()}
    if "all" in names:
        return list(PROTOCOLS)
    unknown = sorted(names - set(PROTOCOLS))
    if unknown or not names:
        raise UsageError(f"--protocol {spec!r}: expected one or more of {', '.join(PROTOCOLS)} or all")
    return [p for p in PROTOCOLS if p in names]


# --------------------------------------------------------------------------- fitting and scoring


def _counts(pool: Pool) -> tuple[int, int]:
    y = pool.y
    return int((y == 0).sum()), int((y == 1).sum())


def _need_both(pool: Pool, what: str) -> None:
    n_real, n_fake = _counts(pool)
    if n_real == 0 or n_fake == 0:
        raise UsageError(f"{what} needs real and fake images; the pool has {n_real} real, {n_fake} fake "
                         "(label by layout real/** and fake/<generator>/**, or --manifest)")


def _fit(train: Pool, head: str, seed: int, target_fpr: float, params: dict | None,
         fit_options: Mapping | None = None, text=None):
    """A detector on `train`, calibrated out-of-fold when every class has >= 2 references.

    `fit_options`: further `fit_from_pool` arguments for every fit (e.g. prune, prune_basis); `text`: the
    `TextEmbedder` prompt heads need; an empty `train` fits a zero-shot head."""
    n_real, n_fake = _counts(train)
    return fit_from_pool(train, head=head, params=params, target_fpr=target_fpr, seed=seed, attribute=False,
                         calibrate=min(n_real, n_fake) >= 2, text=text, **dict(fit_options or {}))


def decide(det, pool: Pool) -> np.ndarray:
    """`det`'s scores on `pool`, from the features its head reads (embedding, heads, layers)."""
    return det.decision_function(pool.matrix(det.layout.get("kind", "embedding"))[0])


def zero_shot_heads(heads: Sequence[str]) -> list[str]:
    """The heads among `heads` that work without references (K = 0 on a k-shot curve)."""
    from .detectors import HEADS

    return [h for h in heads if getattr(HEADS.get(h), "zero_shot", False)]


def _score(det, test: Pool) -> dict:
    """Metrics of `det` on `test` at the detector's own (reference-calibrated) threshold."""
    from .metrics import binary_report

    y = test.y
    s = decide(det, test) if len(test) else np.zeros(0)
    rep = binary_report(y, s, threshold=det.threshold)
    out = {m: rep[m] for m in METRICS}
    flagged = s >= det.threshold
    out.update({
        "fpr": float(flagged[y == 0].mean()) if (y == 0).any() else math.nan,
        "tpr": float(flagged[y == 1].mean()) if (y == 1).any() else math.nan,
        "threshold": float(det.threshold),
        "calibration": det.meta["calibration"]["method"],
        "n_test": int(len(y)), "n_test_real": int((y == 0).sum()), "n_test_fake": int((y == 1).sum()),
    })
    return out


def _train_counts(train: Pool) -> dict:
    n_real, n_fake = _counts(train)
    return {"n_train": len(train), "n_train_real": n_real, "n_train_fake": n_fake}


def split_references(pool: Pool, k: int | None, seed: int, per_generator: bool = False) -> tuple[list[int], list[int]]:
    """(reference indices, test indices) of `pool`: `k` references per class drawn with `seed`; the rest,
    minus anything sharing a reference's SHA-256, is the test set."""
    train = sample_shots(pool.label, pool.generator, k, seed, per_generator, keys=pool.sha256)
    ref_shas = {pool.sha256[i] for i in train}
    test = [i for i in range(len(pool)) if pool.sha256[i] not in ref_shas]
    return train, test


# --------------------------------------------------------------------------- k-shot curve


def _testable_split(pool, shots, seed, per_generator, notes: list, what: str, hint: str = ""):
    """(train, test) indices from `split_references`, or None (with a note) when the test set would
    lack a class."""
    train, test = split_references(pool, shots, seed, per_generator)
    tr, te = _counts(pool.take(test))
    if tr == 0 or te == 0:
        notes.append(f"{what} skipped: the test set would lack {'real' if tr == 0 else 'fake'} images{hint}")
        return None
    return train, test


def kshot_curve(
    pool: Pool,
    heads: str | Sequence[str],
    ks: str | Sequence[int] = DEFAULT_KS,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    params: Mapping[str, dict] | None = None,
    fit_options: Mapping | None = None,
    text=None,
) -> Rows:
    """Metrics vs shots: one row per (head, K, seed); test set = `pool` minus the drawn references.

    Rows hold protocol, head, k, seed, n_train*, the `METRICS`, fpr/tpr at the threshold, threshold,
    calibration and n_test*. A K that leaves no real or no fake image to test on (K >= what a class
    has) is skipped with a note in `Rows.notes`. For a fixed seed the draws are nested: the references
    for K are a subset of those for any larger K. `params` maps a head name to its parameters.
    Heads that work without references (zeroshot) also get one K = 0 row (no references, the whole pool
    is the test set, uncalibrated threshold), with the first seed: nothing in it is random.
    """
    heads, ks, seeds = parse_heads(heads), parse_ks(ks), parse_seeds(seeds)
    _need_both(pool, "k-shot curve")
    n_real, n_fake = _counts(pool)
    rows = Rows()
    splits: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for k in ks:
        if not per_generator and k >= min(n_real, n_fake):
            rows.notes.append(f"k-shot: K={k} skipped: needs more than {k} real and {k} fake images so that some "
                              f"remain for testing (have {n_real} real, {n_fake} fake)")
            continue
        for seed in seeds:
            split = _testable_split(pool, k, seed, per_generator, rows.notes, f"k-shot: K={k} seed {seed}")
            if split is not None:
                splits[(k, seed)] = split
    for head in heads:
        if zero_shot_heads([head]):
            det = _fit(pool.take([]), head, seeds[0], target_fpr, (params or {}).get(head), text=text)
            rows.append({"protocol": "kshot", "head": head, "k": 0, "seed": seeds[0], **_train_counts(pool.take([])),
                         **_score(det, pool)})
        for (k, seed), (train, test) in splits.items():
            tr_pool, te_pool = pool.take(train), pool.take(test)
            det = _fit(tr_pool, head, seed, target_fpr, (params or {}).get(head), fit_options, text)
            rows.append({"protocol": "kshot", "head": head, "k": k, "seed": seed, **_train_counts(tr_pool),
                         **_score(det, te_pool)})
    return rows


# --------------------------------------------------------------------------- summaries


def summarise(rows: Iterable[Mapping], by: Sequence[str], metrics: Sequence[str] = METRICS,
              level: float = 0.95) -> list[dict]:
    """Rows grouped by the `by` columns (first-seen order): n, and per metric `<m>_mean` and `<m>_ci95`
    (half-width of the t-interval over seeds at `level`; NaN values are left out, NaN with one value)."""
    from .metrics import mean_ci

    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(by, key))
        s["n"] = len(rs)
        for m in metrics:
            vals = [float(r[m]) for r in rs if m in r and r[m] is not None and not math.isnan(float(r[m]))]
            mean, half = mean_ci(vals, level)
            s[f"{m}_mean"], s[f"{m}_ci95"] = mean, half
        out.append(s)
    return out


def summarise_kshot(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, k): mean and 95% half-width over seeds of every metric."""
    return summarise(rows, ("head", "k"))


def summarise_logo(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, held-out generator): mean and 95% half-width over seeds, including `auc_seen`."""
    return summarise(rows, ("head", "generator"), METRICS + ("auc_seen",))


def summarise_robustness(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, fit view, test view): mean and 95% half-width over seeds, including `delta_auc`."""
    return summarise(rows, ("head", "fit_view", "view"), METRICS + ("delta_auc",))


# --------------------------------------------------------------------------- leave one generator out


def leave_one_generator_out(
    pool: Pool,
    heads: str | Sequence[str],
    shots: int | None = 10,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    real_holdout: float = 0.5,
    params: Mapping[str, dict] | None = None,
    fit_options: Mapping | None = None,
    text=None,
) -> Rows:
    """For each generator g with fakes: fit on reals + fakes of the other generators, test on g.

    References: `shots` per class drawn from the reals and the other generators' fakes (or all of them
    with `shots=None`, in which case a seeded `real_holdout` fraction of the reals is kept back for
    testing). Test set: the reals not drawn + every fake of g. One row per (head, g, seed) with the
    `METRICS` on that test set, plus `auc_seen`: the same detector's AUC on the other generators' fakes
    that were not references, against the same reals (NaN when none are left) — the gap to `auc`
    is the price of an unseen generator. Fakes without a generator name are training-only.
    """
    heads, seeds = parse_heads(heads), parse_seeds(seeds)
    _need_both(pool, "leave-one-generator-out")
    if not 0 < real_holdout < 1:
        raise UsageError(f"real_holdout {real_holdout}: expected a fraction in (0, 1)")
    labels, gens = pool.label, pool.generator
    named = sorted({g for g, lab in zip(gens, labels) if lab == "fake" and g})
    if len(named) < 2:
        raise UsageError(f"leave-one-generator-out needs fakes from at least 2 named generators (have {len(named)}: "
                         f"{', '.join(named) or 'none'}); name them by layout fake/<generator>/** or --manifest")
    rows = Rows()
    unnamed = sum(1 for g, lab in zip(gens, labels) if lab == "fake" and not g)
    if unnamed:
        rows.notes.append(f"logo: {unnamed} fake image(s) without a generator name are used for training only")
    reals = sorted((i for i in range(len(pool)) if labels[i] == "real"), key=lambda i: pool.sha256[i])
    if shots is not None and shots >= len(reals):
        rows.notes.append(f"logo: skipped: --shots {shots} leaves no real image to test on (have {len(reals)})")
        return rows
    plans = []
    for g in named:
        held = [i for i in range(len(pool)) if labels[i] == "fake" and gens[i] == g]
        others = [i for i in range(len(pool)) if labels[i] == "fake" and gens[i] != g]
        for seed in seeds:
            if shots is None:
                perm = np.random.default_rng(seed).permutation(len(reals))
                n_test = max(1, int(round(real_holdout * len(reals))))
                test_reals = sorted(reals[j] for j in perm[:n_test])
                cand = sorted(set(reals) - set(test_reals)) + others
                train = cand
            else:
                cand = sorted(reals + others)
                sub = sample_shots([labels[i] for i in cand], [gens[i] for i in cand], shots, seed, per_generator,
                                   keys=[pool.sha256[i] for i in cand])
                train = [cand[j] for j in sub]
            ref_shas = {pool.sha256[i] for i in train}
            test_reals = [i for i in reals if pool.sha256[i] not in ref_shas]
            test_g = [i for i in held if pool.sha256[i] not in ref_shas]
            seen = [i for i in others if pool.sha256[i] not in ref_shas and gens[i]]
            if not test_reals or not test_g:
                rows.notes.append(f"logo: generator {g} seed {seed} skipped: no test "
                                  f"{'real' if not test_reals else 'fake'} images left")
                continue
            if _counts(pool.take(train))[1] == 0:
                rows.notes.append(f"logo: generator {g} seed {seed} skipped: no fake references from other generators")
                continue
            plans.append((g, seed, train, test_reals, test_g, seen))
    for head in heads:
        for g, seed, train, test_reals, test_g, seen in plans:
            tr_pool = pool.take(train)
            det = _fit(tr_pool, head, seed, target_fpr, (params or {}).get(head), fit_options, text)
            row = {"protocol": "logo", "head": head, "generator": g, "seed": seed,
                   "shots": "all" if shots is None else shots, **_train_counts(tr_pool),
                   **_score(det, pool.take(test_reals + test_g))}
            if seen:
                from .metrics import roc_auc

                te = pool.take(test_reals + seen)
                row["auc_seen"] = roc_auc(te.y, decide(det, te))
            else:
                row["auc_seen"] = math.nan
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- robustness


def align_views(pools_by_view: Mapping[str, Pool], clean_view: str = "clean") -> tuple[dict[str, Pool], list[str]]:
    """The pools restricted to the images present in every view, in the clean pool's order; labels
    and generators from the clean pool. Returns (aligned pools, notes)."""
    if clean_view not in pools_by_view:
        raise UsageError(f"robustness needs features of the '{clean_view}' view (have: {', '.join(pools_by_view)})")
    clean = pools_by_view[clean_view]
    index = {v: {s: i for i, s in enumerate(p.sha256)} for v, p in pools_by_view.items()}
    keep = [i for i, s in enumerate(clean.sha256) if all(s in idx for idx in index.values())]
    notes = []
    dropped = len(clean) - len(keep)
    if dropped:
        notes.append(f"robustness: {dropped} image(s) lack features of some view and were left out, so every view "
                     "is measured on the same images")
    base = clean.take(keep)
    out = {}
    for v, p in pools_by_view.items():
        q = p.take([index[v][s] for s in base.sha256])
        out[v] = Pool(list(base.sha256), list(base.label), list(base.generator), list(base.path), q.X, q.feats)
    return out, notes


def view_shift(pools_by_view: Mapping[str, Pool], clean_view: str = "clean") -> list[dict]:
    """How far each view moves the embeddings: a check that a perturbation really changed the features.

    Per view: `mean_shift` = mean L2 distance between an image's view and clean embeddings (same images),
    and `relative_shift` = that divided by the clean embeddings' mean distance to their centroid (the
    spread between images). Near 0 means the view leaves the features (almost) untouched.
    """
    pools, _ = align_views(pools_by_view, clean_view)
    clean = pools[clean_view].X.astype(np.float64)
    spread = float(np.linalg.norm(clean - clean.mean(axis=0), axis=1).mean()) if len(clean) else math.nan
    out = []
    for v, p in pools.items():
        if v == clean_view:
            continue
        shift = float(np.linalg.norm(p.X.astype(np.float64) - clean, axis=1).mean()) if len(clean) else math.nan
        out.append({"view": v, "n": len(clean), "mean_shift": shift,
                    "relative_shift": shift / spread if spread else math.nan})
    return out


def robustness(
    pools_by_view: Mapping[str, Pool],
    heads: str | Sequence[str],
    shots: int | None = 10,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    clean_view: str = "clean",
    shortcut_view: str | None = SHORTCUT_VIEW,
    per_generator: bool = False,
    params: Mapping[str, dict] | None = None,
    fit_options: Mapping | None = None,
    text=None,
) -> Rows:
    """AUC per view: fit on the clean features of sampled references, test on every view's features of
    the same non-reference images (real and fake perturbed identically, identical image sets).

    One row per (head, view, seed) with fit_view = clean, the `METRICS` (accuracy at the clean-calibrated
    threshold, so threshold drift shows) and `delta_auc` = AUC(view) - AUC(clean). When `shortcut_view`
    (default jpeg:95: every image re-encoded the same way) is among the views, extra rows with
    fit_view = view = `shortcut_view` fit and test on re-encoded features; see `format_shortcut`.
    """
    from .images import canonical_view

    heads, seeds = parse_heads(heads), parse_seeds(seeds)
    pools, notes = align_views({canonical_view(v): p for v, p in pools_by_view.items()}, canonical_view(clean_view))
    clean_view = canonical_view(clean_view)
    clean = pools[clean_view]
    _need_both(clean, "robustness")
    views = [clean_view] + [v for v in pools if v != clean_view]
    shortcut = canonical_view(shortcut_view) if shortcut_view else None
    rows = Rows(notes=notes)
    if shortcut and shortcut not in pools:
        rows.notes.append(f"robustness: no {shortcut} features, so no format-shortcut check")
        shortcut = None
    plans = []
    for seed in seeds:
        split = _testable_split(clean, shots, seed, per_generator, rows.notes, f"robustness: seed {seed}",
                                hint=" (lower --shots)")
        if split is not None:
            plans.append((seed, *split))
    for head in heads:
        for seed, train, test in plans:
            p = (params or {}).get(head)
            det = _fit(clean.take(train), head, seed, target_fpr, p, fit_options, text)
            base = None
            for v in views:
                r = {"protocol": "robustness", "head": head, "fit_view": clean_view, "view": v, "seed": seed,
                     "shots": "all" if shots is None else shots, **_train_counts(clean.take(train)),
                     **_score(det, pools[v].take(test))}
                base = r["auc"] if v == clean_view else base
                r["delta_auc"] = r["auc"] - base
                rows.append(r)
            if shortcut:
                det2 = _fit(pools[shortcut].take(train), head, seed, target_fpr, p, fit_options, text)
                r = {"protocol": "robustness", "head": head, "fit_view": shortcut, "view": shortcut, "seed": seed,
                     "shots": "all" if shots is None else shots, **_train_counts(clean.take(train)),
                     **_score(det2, pools[shortcut].take(test))}
                r["delta_auc"] = r["auc"] - base
                rows.append(r)
    return rows


def format_shortcut(rows: Iterable[Mapping], view: str = SHORTCUT_VIEW, clean_view: str = "clean",
                    tolerance: float = 0.02) -> list[dict]:
    """The format-shortcut check from robustness rows, one dict per head.

    Compares AUC on the clean files with AUC when every image is re-encoded the same way (`view`):
    `auc_clean`, `auc_reencoded` (clean-fitted detector), `auc_refit` (fitted and tested on re-encoded
    features), `delta` = auc_reencoded - auc_clean with its 95% half-width `delta_ci95` over paired
    seeds, `delta_refit`, and a `verdict`. A drop beyond `tolerance` suggests the detector leans on how
    the files were encoded (e.g. real JPEG vs fake PNG) rather than on content.
    """
    from .images import canonical_view
    from .metrics import mean_ci

    view, clean_view = canonical_view(view), canonical_view(clean_view)
    by: dict[tuple[str, str, str, int], float] = {}
    heads: list[str] = []
    for r in rows:
        by[(r["head"], r["fit_view"], r["view"], r["seed"])] = float(r["auc"])
        if r["head"] not in heads:
            heads.append(r["head"])
    out = []
    for h in heads:
        seeds = sorted(s for (hh, fv, v, s) in by if hh == h and fv == clean_view and v == clean_view)
        pairs = [(by[(h, clean_view, clean_view, s)], by[(h, clean_view, view, s)]) for s in seeds
                 if (h, clean_view, view, s) in by]
        if not pairs:
            continue
        refit = [by[(h, view, view, s)] for s in seeds if (h, view, view, s) in by]
        clean_auc = float(np.mean([a for a, _ in pairs]))
        re_auc = float(np.mean([b for _, b in pairs]))
        delta, half = mean_ci([b - a for a, b in pairs])
        refit_auc = float(np.mean(refit)) if refit else math.nan
        if delta < -tolerance:
            verdict = (f"AUC drops by {-delta:.3f} when every image is re-encoded as {view}: "
                       "the detector may rely on file format or compression, not content")
        elif delta > tolerance:
            verdict = f"AUC rises by {delta:.3f} after re-encoding as {view} (unexpected; check the data)"
        else:
            verdict = f"no sign of a format shortcut (|change| <= {tolerance:g})"
        out.append({"head": h, "view": view, "n": len(pairs), "auc_clean": clean_auc, "auc_reencoded": re_auc,
                    "delta": delta, "delta_ci95": half, "auc_refit": refit_auc,
                    "delta_refit": refit_auc - clean_auc, "verdict": verdict})
    return out


def format_breakdown(pool: Pool, formats: Mapping[str, str]) -> dict:
    """File formats per class (`formats`: sha256 → format, e.g. from the cache's image records).

    Returns {"rows": [{label, format, count, fraction}], "total_variation": distance between the real
    and fake format distributions (0 = identical mix, 1 = no format in common: a shortcut risk)}.
    """
    counts: dict[str, dict[str, int]] = {"real": {}, "fake": {}}
    for s, lab in zip(pool.sha256, pool.label):
        fmt = (formats.get(s) or "unknown").upper()
        counts[lab][fmt] = counts[lab].get(fmt, 0) + 1
    rows = []
    for lab in ("real", "fake"):
        n = sum(counts[lab].values())
        for fmt in sorted(counts[lab]):
            rows.append({"label": lab, "format": fmt, "count": counts[lab][fmt],
                         "fraction": counts[lab][fmt] / n if n else math.nan})
    fmts = set(counts["real"]) | set(counts["fake"])
    nr, nf = sum(counts["real"].values()), sum(counts["fake"].values())
    tv = (0.5 * sum(abs(counts["real"].get(f, 0) / nr - counts["fake"].get(f, 0) / nf) for f in fmts)
          if nr and nf else math.nan)
    return {"rows": rows, "total_variation": float(tv)}


# --------------------------------------------------------------------------- reproducibility


def manifest_hash(pool: Pool) -> str:
    """SHA-256 over the sorted unique "sha256,label,generator" lines of `pool` (order-free)."""
    lines = sorted({f"{s},{lab},{g}" for s, lab, g in zip(pool.sha256, pool.label, pool.generator)})
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def versions() -> dict:
    """Versions of python, clipdet, numpy, scikit-learn, and of torch, open_clip, faiss, h5py, matplotlib.

    Modules already imported report their `__version__`; the others are read from the installed
    package metadata (without importing them), or left out when not installed.
    """
    from importlib import metadata

    import sklearn

    from ._version import __version__

    out = {"python": platform.python_version(), "clipdet": __version__, "numpy": np.__version__,
           "scikit-learn": sklearn.__version__}
    for mod, dist in (("torch", "torch"), ("open_clip", "open_clip_torch"), ("faiss", "faiss-cpu"),
                      ("h5py", "h5py"), ("matplotlib", "matplotlib")):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = str(m.__version__)
            continue
        for d in (dist, "faiss-gpu-cu12") if mod == "faiss" else (dist,):
            try:
                out[mod] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def source_revision() -> dict:
    """The git commit of the clipdet source tree and whether it had uncommitted changes ({} outside git)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def run_record(config: Mapping, pool: Pool | None = None) -> dict:
    """What a run needs to be reproduced and audited: config, seed(s), data manifest hash, versions, machine.

    The manifest hash comes from `pool` when given, else from ``config["manifest_hash"]``.
    """
    cfg = json.loads(json.dumps(dict(config), default=str))
    seeds = cfg.get("seeds", cfg.get("seed"))
    return {
        "config": cfg,
        "seeds": seeds,
        "manifest_hash": manifest_hash(pool) if pool is not None else cfg.get("manifest_hash"),
        "n_images": len(pool) if pool is not None else cfg.get("n_images"),
        "versions": versions(),
        "source": source_revision(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- the whole bench


@dataclass
class BenchResult:
    """Rows, summaries and notes of a `run_bench` call, plus its `record` (see `run_record`)."""

    record: dict
    kshot: Rows = field(default_factory=Rows)
    logo: Rows = field(default_factory=Rows)
    robustness: Rows = field(default_factory=Rows)
    shortcut: list[dict] = field(default_factory=list)
    view_shift: list[dict] = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def summaries(self) -> dict[str, list[dict]]:
        """Per-protocol summaries (mean and 95% half-width over seeds)."""
        return {"kshot": summarise_kshot(self.kshot), "logo": summarise_logo(self.logo),
                "robustness": summarise_robustness(self.robustness)}


def pool_counts(pool: Pool) -> dict:
    """Image counts: real, fake, and fakes per generator."""
    gens: dict[str, int] = {}
    for g, lab in zip(pool.generator, pool.label):
        if lab == "fake":
            gens[g or "unknown"] = gens.get(g or "unknown", 0) + 1
    n_real, n_fake = _counts(pool)
    return {"real": n_real, "fake": n_fake, "generators": dict(sorted(gens.items()))}


def run_bench(
    pools_by_view: Mapping[str, Pool],
    protocols: str | Sequence[str] = PROTOCOLS,
    heads: str | Sequence[str] = ("svm", "logreg"),
    ks: str | Sequence[int] = DEFAULT_KS,
    seeds: int | Sequence[int] = 5,
    shots: int | None = 10,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    formats: Mapping[str, str] | None = None,
    config: Mapping | None = None,
    progress: Callable[[str], None] | None = None,
    params: Mapping[str, dict] | None = None,
    fit_options: Mapping | None = None,
    text=None,
) -> BenchResult:
    """Run the selected protocols on `pools_by_view` ("clean" plus perturbed views for robustness).

    k-shot and leave-one-generator-out use the clean pool; robustness uses every view. `config`
    (e.g. backbone, data paths, command) is stored in the run record with the protocol settings.
    `progress(line)` is called after each protocol (the library itself prints nothing). `params`: head
    name → parameters; `fit_options`: further `fit_from_pool` arguments for every fit (prune, prune_basis).
    `text`: the backbone's `TextEmbedder`, for heads that embed prompts (zeroshot).
    """
    protocols, heads, seeds = parse_protocols(protocols), parse_heads(heads), parse_seeds(seeds)
    ks = parse_ks(ks)
    if "clean" not in pools_by_view:
        raise UsageError(f"run_bench needs the clean view's pool (have: {', '.join(pools_by_view)})")
    clean = pools_by_view["clean"]
    cfg = {**dict(config or {}), "protocols": protocols, "heads": heads, "ks": ks, "seeds": seeds,
           "shots": "all" if shots is None else shots, "target_fpr": target_fpr, "per_generator": per_generator,
           "views": list(pools_by_view)}
    cfg.update({k: dict(v) for k, v in (("params", params), ("fit_options", fit_options)) if v})
    res = BenchResult(record=run_record(cfg, clean), counts=pool_counts(clean))
    if formats:
        res.formats = format_breakdown(clean, formats)
        tv = res.formats["total_variation"]
        if tv == tv and tv > 0.5:
            res.notes.append(f"real and fake images differ in file format (total variation {tv:.2f}): "
                             "a detector can learn the format instead of the content; see the format-shortcut check")
    say = progress or (lambda line: None)
    if "kshot" in protocols:
        t0 = time.perf_counter()
        res.kshot = kshot_curve(clean, heads, ks, seeds, target_fpr, per_generator, params, fit_options, text)
        res.seconds["kshot"] = time.perf_counter() - t0
        say(f"k-shot: {len(res.kshot)} fits in {res.seconds['kshot']:.1f} s")
    if "logo" in protocols:
        t0 = time.perf_counter()
        try:
            res.logo = leave_one_generator_out(clean, heads, shots, seeds, target_fpr, per_generator,
                                               params=params, fit_options=fit_options, text=text)
        except UsageError as e:
            res.logo = Rows(notes=[f"logo: skipped: {e}"])
        res.seconds["logo"] = time.perf_counter() - t0
        say(f"leave-one-generator-out: {len(res.logo)} fits in {res.seconds['logo']:.1f} s")
    if "robustness" in protocols:
        t0 = time.perf_counter()
        rob = robustness(pools_by_view, heads, shots, seeds, target_fpr, per_generator=per_generator, params=params,
                         fit_options=fit_options, text=text)
        if len(pools_by_view) < 2:
            rob.notes.insert(0, "robustness: no perturbed view given, so only the clean AUC is measured")
        res.robustness = rob
        res.shortcut = format_shortcut(res.robustness)
        res.view_shift = view_shift(pools_by_view)
        flat = [r["view"] for r in res.view_shift if r["relative_shift"] < 0.01]
        if flat:
            res.notes.append(f"view(s) {', '.join(flat)} move the embeddings by under 1% of the spread between "
                             "images: their robustness numbers cannot differ from clean")
        res.seconds["robustness"] = time.perf_counter() - t0
        say(f"robustness: {len(res.robustness)} rows in {res.seconds['robustness']:.1f} s")
    res.notes += res.kshot.notes + res.logo.notes + res.robustness.notes
    res.record["seconds"] = dict(res.seconds)
    return res


# --------------------------------------------------------------------------- writing


def write_rows_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> str:
    """Rows as CSV (columns in first-seen order; floats written with repr precision, NaN as 'nan')."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    os.replace(tmp, path)
    return str(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _nan_to_none(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _fmt_ci(mean: float, half: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """'mean ± half', or 'mean (lo–hi)' with the interval clipped to the metric's range [lo, hi]
    (a t-interval over 2 seeds can reach far outside it)."""
    if mean != mean:
        return "n/a"
    if half != half:
        return f"{mean:.3f}"
    if mean - half < lo or mean + half > hi:
        return f"{mean:.3f} ({max(lo, mean - half):.3f}–{min(hi, mean + half):.3f})"
    return f"{mean:.3f} ± {half:.3f}"


def write_bench(result: BenchResult, directory: str | os.PathLike, title: str = "clipdet bench",
                preamble: str = "") -> dict[str, str]:
    """Write kshot.csv, logo.csv, robustness.csv (one row per fit), *_summary.csv, format_shortcut.csv,
    run.json (run record, counts, summaries, notes) and report.md with PNG plots into `directory`
    (created if needed; only these files are replaced). Returns {name: path} of what was written."""
    from .report import markdown_table, plot_bars, plot_kshot, random_weights_warning, write_markdown_report

    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    files: dict[str, str] = {}
    summ = result.summaries()
    for name in PROTOCOLS:
        rows = getattr(result, name)
        if rows:
            files[f"{name}.csv"] = write_rows_csv(rows, os.path.join(d, f"{name}.csv"))
            files[f"{name}_summary.csv"] = write_rows_csv(summ[name], os.path.join(d, f"{name}_summary.csv"))
    if result.shortcut:
        files["format_shortcut.csv"] = write_rows_csv(result.shortcut, os.path.join(d, "format_shortcut.csv"))

    rec = result.record
    cfg = rec["config"]
    sections: list[tuple] = []
    head_txt = (preamble.rstrip() + "\n\n") if preamble else ""
    c = result.counts
    head_txt += (f"Backbone `{cfg.get('backbone', '?')}`; {c.get('real', 0)} real and {c.get('fake', 0)} fake images "
                 f"({len(c.get('generators', {}))} generators); manifest hash `{rec['manifest_hash'][:16]}…`; "
                 f"seeds {cfg['seeds']}; heads {', '.join(cfg['heads'])}; target FPR {cfg['target_fpr']}.\n\n"
                 "Every row of the CSV files is one detector fitted on references drawn with one seed and tested on "
                 "images that are not references (disjoint by SHA-256). Intervals are 95% t-intervals over seeds. "
                 "Accuracy is at the threshold calibrated on the references alone (none with 1 shot per class: "
                 "threshold 0).")
    sections.append(("Run", head_txt))
    gen_rows = [{"generator": g, "fakes": n} for g, n in c.get("generators", {}).items()]
    data_txt = markdown_table(gen_rows, ["generator", "fakes"]) if gen_rows else ""
    if result.formats:
        data_txt += ("\nFile formats per class (total variation between the real and fake mix: "
                     f"{result.formats['total_variation']:.2f}):\n\n"
                     + markdown_table(result.formats["rows"], ["label", "format", "count", "fraction"]))
    if data_txt:
        sections.append(("Data", data_txt))

    if result.kshot:
        imgs = []
        for metric in ("auc", "balanced_accuracy"):
            fn = f"kshot_{metric}.png"
            plot_kshot(result.kshot, os.path.join(d, fn), metric=metric, title=f"{metric} vs shots per class")
            imgs.append(fn)
        table = [{"head": s["head"], "k": s["k"], "seeds": s["n"], "AUC": _fmt_ci(s["auc_mean"], s["auc_ci95"]),
                  "AP": _fmt_ci(s["ap_mean"], s["ap_ci95"]),
                  "bal. acc": _fmt_ci(s["balanced_accuracy_mean"], s["balanced_accuracy_ci95"]),
                  "TPR@1%FPR": _fmt_ci(s["tpr_at_1pct_fpr_mean"], s["tpr_at_1pct_fpr_ci95"]),
                  "EER": _fmt_ci(s["eer_mean"], s["eer_ci95"])} for s in summ["kshot"]]
        sections.append(("K-shot curve", markdown_table(table), imgs))
    if result.logo:
        imgs = []
        for h in cfg["heads"]:
            vals = {s["generator"]: s["auc_mean"] for s in summ["logo"] if s["head"] == h}
            if vals:
                fn = f"logo_{h}.png"
                n_fake = {r["generator"]: r["n_test_fake"] for r in result.logo
                          if r.get("head") == h and "n_test_fake" in r}
                skipped = sorted({n.split()[2] for n in result.logo.notes if n.startswith("logo: generator ")}
                                 - set(vals))
                plot_bars(vals, os.path.join(d, fn), title=f"{h}: AUC on a held-out generator", chance=0.5,
                          counts=n_fake, excluded=[f"{g} (skipped: see notes)" for g in skipped])
                imgs.append(fn)
        table = [{"head": s["head"], "held out": s["generator"], "seeds": s["n"],
                  "AUC (unseen)": _fmt_ci(s["auc_mean"], s["auc_ci95"]),
                  "AUC (seen gens)": _fmt_ci(s["auc_seen_mean"], s["auc_seen_ci95"]),
                  "TPR@1%FPR": _fmt_ci(s["tpr_at_1pct_fpr_mean"], s["tpr_at_1pct_fpr_ci95"])} for s in summ["logo"]]
        text = (f"Fit on {cfg['shots']} references per class from the reals and the other generators; test on the "
                "remaining reals and every fake of the held-out generator. \"seen gens\": the same detector on the "
                "other generators' non-reference fakes.\n\n" + markdown_table(table))
        sections.append(("Leave one generator out", text, imgs))
    if result.robustness:
        imgs = []
        for h in cfg["heads"]:
            vals = {s["view"]: s["auc_mean"] for s in summ["robustness"] if s["head"] == h and s["fit_view"] == "clean"}
            if vals:
                fn = f"robustness_{h}.png"
                plot_bars(vals, os.path.join(d, fn), title=f"{h}: AUC per view (fit on clean)", chance=0.5)
                imgs.append(fn)
        table = [{"head": s["head"], "fit on": s["fit_view"], "test view": s["view"], "seeds": s["n"],
                  "AUC": _fmt_ci(s["auc_mean"], s["auc_ci95"]), "ΔAUC vs clean": _fmt_ci(s["delta_auc_mean"],
                                                                                          s["delta_auc_ci95"], -1.0),
                  "acc": _fmt_ci(s["accuracy_mean"], s["accuracy_ci95"])} for s in summ["robustness"]]
        text = ("Fit on clean features of the references; test on each view of the same non-reference images "
                "(real and fake perturbed identically). Accuracy uses the clean-calibrated threshold.\n\n"
                + markdown_table(table))
        if result.view_shift:
            text += ("\nHow far each view moves the embeddings (mean L2 shift of an image's embedding; relative: "
                     "divided by the mean distance between clean embeddings and their centroid):\n\n"
                     + markdown_table(result.view_shift, ["view", "n", "mean_shift", "relative_shift"]))
        sections.append(("Robustness", text, imgs))
        if result.shortcut:
            cols = ["head", "view", "n", "auc_clean", "auc_reencoded", "delta", "delta_ci95", "auc_refit",
                    "delta_refit", "verdict"]
            sections.append(("Format-shortcut check",
                             "Every image (real and fake) re-encoded the same way; a large AUC drop means the "
                             "detector used the file format or compression as a cue.\n\n"
                             + markdown_table(result.shortcut, cols)))
    if result.notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in result.notes)))
    v = rec["versions"]
    sections.append(("Reproduce", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items())
                     + f"; machine: {rec['machine']['platform']}, {rec['machine']['cpu_count']} CPUs"
                     + (f"; clipdet source commit {rec['source']['git_commit'][:12]}"
                        + (" with uncommitted changes" if rec["source"].get("git_dirty") else "")
                        if rec.get("source") else "") + ".\n\n"
                     "Config and manifest hash: `run.json`."))
    files["report.md"] = str(write_markdown_report(d, title, sections,
                                                   warning=random_weights_warning(cfg.get("backbone_record"))))
    for sec in sections:
        files.update({img: os.path.join(d, img) for img in (sec[2] if len(sec) == 3 else [])})
    run = {**rec, "counts": result.counts, "formats": result.formats, "notes": result.notes,
           "summaries": summ, "format_shortcut": result.shortcut, "view_shift": result.view_shift,
           "files": sorted(files)}
    tmp = os.path.join(d, ".run.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_nan_to_none(json.loads(json.dumps(run, default=_json_default))), f, indent=1)
    os.replace(tmp, os.path.join(d, "run.json"))
    files["run.json"] = os.path.join(d, "run.json")
    return files
