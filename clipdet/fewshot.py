"""Few-shot fitting: pick K references per class (or per generator) with a seed, fit a head, calibrate.

Calibration never sees evaluation data: the threshold (at `target_fpr` on real images) and the
Platt parameters behind `p_fake` come from out-of-fold decision values on the references
(cross-validation, leave-one-out for tiny sets), or from a separate `calibrate` set when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ._version import __version__
from .errors import UsageError

DEFAULT_TARGET_FPR = 0.05


@dataclass
class Pool:
    """Labelled candidate references: hashes, labels ('real'/'fake'), generators, first paths, features."""

    sha256: list[str]
    label: list[str]
    generator: list[str]
    path: list[str]
    X: np.ndarray
    #: other feature kinds (clipdet.features: "heads", "layers") → (flat matrix aligned with X, its layout)
    feats: dict = field(default_factory=dict)

    def take(self, idx: Sequence[int]) -> Pool:
        """The sub-pool at `idx`."""
        idx = list(idx)
        return Pool([self.sha256[i] for i in idx], [self.label[i] for i in idx], [self.generator[i] for i in idx],
                    [self.path[i] for i in idx], self.X[idx], {k: (m[idx], lay) for k, (m, lay) in self.feats.items()})

    def matrix(self, kind: str = "embedding") -> tuple[np.ndarray, dict]:
        """(features of `kind` as a flat matrix, their layout); UsageError when the pool lacks them."""
        if kind == "embedding":
            return self.X, {"kind": "embedding", "units": 1, "dim": int(self.X.shape[1]) if self.X.ndim == 2 else 0}
        if kind not in self.feats:
            from .features import HINTS

            raise UsageError(f"these references have no {kind!r} features; {HINTS.get(kind, '')}")
        return self.feats[kind]

    def __len__(self) -> int:
        return len(self.sha256)

    @property
    def y(self) -> np.ndarray:
        """1 for fake, 0 for real."""
        return np.array([1 if lab == "fake" else 0 for lab in self.label], dtype=np.int64)


def parse_shots(shots: str | int | None) -> int | None:
    """'10' → 10, 'all' or None → None (every reference), '0' → 0 (zero-shot heads only)."""
    if shots is None or (isinstance(shots, str) and shots.strip().lower() == "all"):
        return None
    try:
        k = int(shots)
    except (TypeError, ValueError):
        raise UsageError(f"--shots {shots!r}: expected a positive integer, 0 (zero-shot heads) or 'all'") from None
    if k < 0:
        raise UsageError(f"--shots {shots!r}: expected a positive integer, 0 (zero-shot heads) or 'all'")
    return k


def sample_shots(
    labels: Sequence[str], generators: Sequence[str], shots: int | None, seed: int,
    per_generator: bool = False, keys: Sequence[str] | None = None,
) -> list[int]:
    """Indices of the chosen references: `shots` per class (or per generator for fakes), seeded.

    The draw depends only on (`keys` order-free content, seed): candidates are sorted by `keys`
    (content hashes) before the seeded permutation, so the same files in any order give the same
    shots. With `per_generator`, each named generator gets `shots` fakes and reals get
    `shots` x (number of generators) (capped at what exists). A class with fewer candidates than
    asked contributes all it has.
    """
    n = len(labels)
    keys = list(keys) if keys is not None else [str(i) for i in range(n)]
    order = np.argsort(np.array(keys, dtype=str), kind="stable") if n else np.zeros(0, np.int64)
    names, codes = np.unique(np.array([g or "unknown" for g in generators] or [""], dtype=str), return_inverse=True)
    return draw_shots(order, np.array([lab == "real" for lab in labels], bool),
                      np.array([lab == "fake" for lab in labels], bool), codes.ravel()[:n], list(names),
                      shots, seed, per_generator)


def draw_shots(order: np.ndarray, is_real: np.ndarray, is_fake: np.ndarray, gen_codes: np.ndarray,
               code_names: Sequence[str], shots: int | None, seed: int, per_generator: bool = False) -> list[int]:
    """The seeded draw behind `sample_shots`, on arrays: `order` sorts candidates by content hash,
    `gen_codes` index `code_names` (each fake's generator name, 'unknown' when unnamed). Works on
    millions of candidates without one Python object each."""
    rng = np.random.default_rng(seed)

    def draw(members: np.ndarray, k: int | None) -> list[int]:
        if k is None or k >= len(members):
            return members.tolist()
        perm = rng.permutation(len(members))[:k]
        return members[np.sort(perm)].tolist()

    order = np.asarray(order, dtype=np.int64)
    reals = order[is_real[order]]
    fakes = order[is_fake[order]]
    if not per_generator:
        return sorted(draw(reals, shots) + draw(fakes, shots))
    fake_codes = np.asarray(gen_codes)[fakes]
    present = np.unique(fake_codes)
    gens = sorted({code_names[c] for c in present})
    chosen: list[int] = []
    for g in gens:
        codes = [c for c in present if code_names[c] == g]
        chosen += draw(fakes[np.isin(fake_codes, codes)], shots)
    k_real = None if shots is None else shots * max(1, len(gens))
    return sorted(draw(reals, k_real) + chosen)


def _need_both_classes(pool: Pool, what: str) -> None:
    y = pool.y
    if len(pool) == 0 or y.min() == y.max():
        have = {lab: pool.label.count(lab) for lab in ("real", "fake")}
        raise UsageError(
            f"{what} needs labelled real and fake images; found real {have['real']}, fake {have['fake']} "
            "(label by layout real/** and fake/<generator>/**, or --manifest)"
        )


def fit_from_pool(
    pool: Pool,
    head: str = "svm",
    params: dict | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    seed: int = 0,
    calibration: Pool | None = None,
    attribute: bool = True,
    extra: Pool | None = None,
    meta: dict | None = None,
    calibrate: bool = True,
    prune: int = 0,
    prune_basis: str = "coord",
    text=None,
):
    """Fit a `Detector` on the references in `pool` (already sampled); returns it.

    `text`: a `clipdet.text.TextEmbedder` for heads that embed prompts (zeroshot). A zero-shot head
    fits with an empty `pool` (--shots 0): threshold at its natural midpoint 0, uncalibrated.

    `extra`: additional training rows (e.g. perturbed views of the same references) used for the
    head only. `calibration`: held-out labelled images for threshold and Platt; without it, both come
    from out-of-fold decision values on `pool`. `calibrate=False` skips calibration (threshold 0.0,
    Platt (1.0, 0.0), method "none"), so even 1-shot fits work for ranking metrics such as AUC.
    The head reads the pools' features of its kind (`clipdet.features`); `prune` K > 0 first removes
    K components chosen on `pool` (`clipdet.prune`), and the detector applies the same removal.
    """
    from sklearn.base import clone

    from .attribution import OpenSetRule
    from .calibration import cross_val_decision, threshold_at_fpr
    from .detector import Detector
    from .detectors import create_head

    if not 0 <= target_fpr < 1:
        raise UsageError(f"--target-fpr {target_fpr}: expected a number in [0, 1)")
    params = dict(params or {})
    base = create_head(head, **params)
    zero = len(pool) == 0 and getattr(base, "zero_shot", False)
    if not zero:
        _need_both_classes(pool, "fit")
    if "random_state" in base.get_params() and "random_state" not in params:
        base.set_params(random_state=seed)
    if "calibration_cv" in base.get_params():
        base.set_params(calibration_cv=0)  # the detector calibrates once, below
    trainable = getattr(base, "trainable", True)
    kind = getattr(base, "needs", "embedding")
    X, layout = pool.matrix(kind)
    base.set_params(**base.layout_params(layout))
    transform = None
    if prune and zero:
        raise UsageError("--prune chooses components on the references: it needs --shots K > 0")
    if prune:
        from .prune import fit_pruner

        transform = fit_pruner(X, pool.y, pool.generator, prune, prune_basis, seed,
                               unit_dim=_unit_dim(X, layout) if kind != "embedding" else None)
        X = transform.transform(X)

    def features(p: Pool) -> np.ndarray:
        m = p.matrix(kind)[0]
        return m if transform is None else transform.transform(m)

    y = pool.y
    Xfit, yfit, gfit = X, y, list(pool.generator)
    if extra is not None and len(extra):
        Xfit, yfit, gfit = np.vstack([X, features(extra)]), np.concatenate([y, extra.y]), gfit + list(extra.generator)
    fit_kw = {"groups": np.array(gfit, dtype=object)} if getattr(base, "uses_groups", False) else {}
    model = clone(base)
    if getattr(model, "needs_prompts", False):
        from .text.prompts import embed_prompts

        embed_prompts(model, text, head)
    model = (model.fit_zero_shot(X.shape[1] if X.ndim == 2 and X.shape[1] else None) if zero
             else model.fit(Xfit, yfit, **fit_kw))

    uncalibrated = zero and calibration is None
    if uncalibrated:
        cal_scores, cal_y, cal_method = np.zeros(0), np.zeros(0, dtype=np.int64), "none (zero-shot)"
    elif not calibrate:
        cal_scores, cal_y, cal_method = np.zeros(0), np.zeros(0, dtype=np.int64), "none"
    elif not trainable:  # nothing was learned from the references: their own scores are out-of-sample
        if calibration is not None:
            _need_both_classes(calibration, "--calibrate")
        cal_scores = np.asarray(model.decision_function(X if calibration is None else features(calibration)),
                                np.float64)
        cal_y = pool.y if calibration is None else calibration.y
        cal_method = "references" if calibration is None else "held-out"
    elif calibration is not None:
        _need_both_classes(calibration, "--calibrate")
        cal_scores = np.asarray(model.decision_function(features(calibration)), dtype=np.float64)
        cal_y = calibration.y
        cal_method = "held-out"
    else:
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2:
            raise UsageError("calibration needs at least 2 references per class (raise --shots or pass --calibrate)")
        cal_scores = cross_val_decision(base, X, y, n_splits=5, random_state=seed)
        cal_y = y
        cal_method = "cross-validation" if counts.min() >= 5 else "leave-one-out"
    notes = []
    if uncalibrated:
        threshold, slope = 0.0, float(model.calibration_slope_)
        notes.append("calibration: none - zero-shot detector without references: the threshold is the natural "
                     "midpoint (cosine difference 0) and p_fake = sigmoid(logit_scale x score) is UNCALIBRATED; "
                     "give references (--shots K, or --calibrate PATH) to calibrate them")
    elif not calibrate:  # a head's natural threshold 0; an untrained head keeps its own slope (zeroshot: 100)
        threshold, slope = 0.0, (1.0 if trainable else float(model.calibration_slope_))
    else:
        threshold = threshold_at_fpr(cal_scores[cal_y == 0], target_fpr)
        slope, cal_notes = calibration_slope(cal_scores, cal_y, threshold)
        notes += cal_notes
    # One mapping, monotone in the score, through 0.5 at the threshold: p_fake >= 0.5 exactly when
    # the verdict is fake (see Detector.proba_from_scores).
    platt = (slope, -slope * threshold)

    # Attribution: multi-class over real + named generators, with an open-set "unknown" rule.
    attribution = open_set = None
    named = sorted({g for g, lab in zip(pool.generator, pool.label) if lab == "fake" and g})
    if not trainable and named:
        notes.append(f"the {head} head does not attribute generators")
    elif attribute and len(named) >= 2:
        keep = [i for i in range(len(pool)) if pool.label[i] == "real" or pool.generator[i]]
        classes = np.array(["real" if pool.label[i] == "real" else pool.generator[i] for i in keep], dtype=object)
        counts = {c: int((classes == c).sum()) for c in set(classes)}
        attr_head = create_head(head, **params)
        attr_head.set_params(**attr_head.layout_params(layout))
        if "random_state" in attr_head.get_params() and "random_state" not in params:
            attr_head.set_params(random_state=seed)
        if min(counts.values()) < 5 and "calibration_cv" in attr_head.get_params():
            attr_head.set_params(calibration_cv=0)
        attribution = attr_head.fit(X[keep], classes.astype(str))
        fake_rows = [i for i in keep if pool.label[i] == "fake"]
        try:
            open_set = OpenSetRule().fit(X[fake_rows], [pool.generator[i] for i in fake_rows])
        except UsageError as e:
            notes.append(f"open-set rule not fitted: {e}")
    elif attribute and named:
        notes.append("attribution needs references from at least 2 named generators")

    m = dict(meta or {})
    m.update({
        "head": head, "params": model.get_params(), "seed": seed, "target_fpr": target_fpr,
        "calibration": {"method": cal_method, "n": int(len(cal_y)), "platt": [float(platt[0]), float(platt[1])]},
        "counts": {"real": int((y == 0).sum()), "fake": int((y == 1).sum()),
                   "extra_rows": 0 if extra is None else int(len(extra))},
        "generators": named, "reference_sha256": sorted(set(pool.sha256)),
        "calibration_sha256": sorted(set(calibration.sha256)) if calibration is not None else [],
        "clipdet_version": __version__, "notes": notes, "layout": layout,
    })
    if transform is not None:
        m["prune"] = {"k": int(prune), "basis": prune_basis, **transform.info}
        notes.append(transform.describe())
    if uncalibrated:
        m["uncalibrated"] = True
    if getattr(model, "needs_prompts", False):
        m["prompts"] = model.prompt_sets()
    refs = {"sha256": list(pool.sha256), "path": list(pool.path), "label": list(pool.label),
            "generator": list(pool.generator)}
    if extra is not None and len(extra):
        refs = {k: refs[k] + list(getattr(extra, k)) for k in refs}
    return Detector(head=model, threshold=float(threshold), platt=(float(platt[0]), float(platt[1])), meta=m,
                    attribution=attribution, open_set=open_set, references=refs, transform=transform)


#: Fewer calibration scores than this per class and p_fake is called rough (a note in the detector).
MIN_CALIBRATION_PER_CLASS = 25


def calibration_slope(scores, y, threshold: float) -> tuple[float, list[str]]:
    """Slope `a > 0` of ``p_fake = sigmoid(a * (score - threshold))`` fitted on calibration scores.

    Platt scaling with its intercept pinned so that p_fake is 0.5 at the decision threshold. When
    the scores do not rank fakes above reals (fitted slope <= 0) a fixed slope of one over the
    scores' spread keeps p_fake monotone and ordered; either way the notes say when calibration
    had too little data or no signal.
    """
    from .calibration import fit_platt

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    notes = []
    n_real, n_fake = int((y == 0).sum()), int((y == 1).sum())
    if min(n_real, n_fake) < MIN_CALIBRATION_PER_CLASS:
        notes.append(f"calibration had too little data ({n_real} real and {n_fake} fake scores; "
                     f"{MIN_CALIBRATION_PER_CLASS}+ per class wanted): p_fake and the threshold are rough "
                     "(more references, or --calibrate with held-out images)")
    a, _ = fit_platt(s - threshold, y, fit_intercept=False)
    if not np.isfinite(a) or a <= 0:
        spread = float(np.std(s))
        a = 1.0 / spread if spread > 0 and np.isfinite(spread) else 1.0
        notes.append("calibration scores do not separate real from fake: p_fake uses a fixed slope "
                     "(it orders images and agrees with the verdict, but is not a calibrated probability)")
    return float(a), notes


def resolve_backbone_key(cache, backbone: str | None, view: str = "clean") -> tuple[str, dict]:
    """The cache group key and backbone record for `backbone` (or the cache's only backbone)."""
    groups = [g for g in cache.groups(count=False) if g.view == view]
    if backbone:
        from .backbones import describe_backbone

        key = describe_backbone(backbone).key
        for g in groups:
            if g.key == key:
                return key, g.backbone
        have = sorted({g.backbone.get("spec", g.key) for g in groups})
        raise UsageError(
            f"{cache.path}: no '{view}' features for backbone {backbone}"
            + (f" (cache has: {', '.join(have)})" if have else " (cache is empty)")
            + "; pass PATHs to extract them or run clipdet extract"
        )
    keys = sorted({g.key for g in groups})
    if len(keys) == 1:
        g = next(g for g in groups if g.key == keys[0])
        return g.key, g.backbone
    if not keys:
        raise UsageError(f"{cache.path}: no '{view}' features cached; run clipdet extract first (or pass PATHs)")
    raise UsageError(f"{cache.path} holds several backbones ({', '.join(keys)}); choose one with --backbone")


def load_pool(cache, key: str, view: str, shas: Iterable[str] | None = None,
              labels: dict[str, tuple[str, str]] | None = None, paths: dict[str, str] | None = None,
              kinds: Sequence[str] = ("embedding",)) -> Pool:
    """Labelled cached features of (key, view); labels/paths from the arguments, else cache metadata.

    Without `shas`, every image of the group is read: for whole-cache tools on small caches. `fit`
    samples from the index instead (`sample_from_cache`) and reads only the chosen rows. `kinds`
    beyond "embedding" (clipdet.features: "heads", "layers") are loaded into `Pool.feats`."""
    from . import features

    others = [k for k in kinds if k != "embedding"]
    layouts = {k: features.group_layout(cache, key, view, k) for k in others}
    rows = cache.load(key, view, shas=shas, **features.load_kwargs(others))
    need = [s for s in rows.sha256 if labels is None or s not in labels or not (paths or {}).get(s)]
    images = cache.image_metas(need) if need else {}
    out_s, out_l, out_g, out_p, keep = [], [], [], [], []
    for i, s in enumerate(rows.sha256):
        if labels is not None and s in labels:
            lab, gen = labels[s]
        else:
            m = images.get(s)
            lab, gen = (m.label, m.generator) if m else ("", "")
        if lab not in ("real", "fake"):
            continue
        m = images.get(s)
        p = (paths or {}).get(s) or (m.paths[0] if m and m.paths else "")
        out_s.append(s)
        out_l.append(lab)
        out_g.append(gen or "" if lab == "fake" else "")
        out_p.append(p)
        keep.append(i)
    X = rows.embedding[keep] if keep else np.zeros((0, rows.embedding.shape[1] if rows.embedding.ndim == 2 else 0),
                                                   np.float32)
    feats = {}
    for k in others:
        m = features.matrix(rows, k, keep) if keep else np.zeros((0, 0), np.float32)
        feats[k] = (m, dict(layouts[k], dim=layouts[k].get("dim") or m.shape[1] // max(1, layouts[k]["units"])))
    return Pool(out_s, out_l, out_g, out_p, X, feats)


def sample_from_cache(cache, key: str, view: str, k: int | None, seed: int, per_generator: bool = False,
                      excluded: set[str] = frozenset(), kinds: Sequence[str] = ("embedding",)) -> tuple[Pool, dict]:
    """Draw the shots from the cache's index (no per-image objects) and read only their rows.

    Candidates are the group's images labelled real or fake, without conflicting labels (warned) or
    an excluded generator. The draw equals `sample_shots` over the same candidates. Returns the
    chosen pool (cache order) and the candidate counts per class."""
    import warnings

    from .cache.index import hex_order, raw_to_hex

    cand = cache.labelled(key, view)
    lab, conflict, gcode = cand["label"], cand["conflict"], cand["gen"]
    vocab = cand["vocab"]
    mask = (lab == 1) | (lab == 2)
    n_conf = int((mask & conflict).sum())
    if n_conf:
        warnings.warn(f"{cache.path}: {n_conf} image(s) with conflicting labels left out of the references "
                      "(clipdet cache conflicts lists them)", stacklevel=2)
        mask &= ~conflict
    if excluded:
        have = {vocab[c] for c in np.unique(gcode[mask & (lab == 2)])} - {""}
        unknown = set(excluded) - have
        if unknown:
            raise UsageError(f"--exclude-generator {', '.join(sorted(unknown))}: no such generator among the "
                             f"references (have: {', '.join(sorted(have))})")
        drop = [c for c, v in enumerate(vocab) if v in excluded]
        mask &= ~((lab == 2) & np.isin(gcode, drop))
    idx = np.flatnonzero(mask)
    is_real, is_fake = lab[idx] == 1, lab[idx] == 2
    per_gen: dict[str, int] = {}
    for c, n in zip(*np.unique(gcode[idx][is_fake], return_counts=True)):
        per_gen[vocab[c] or "unknown"] = per_gen.get(vocab[c] or "unknown", 0) + int(n)
    counts = {"real": int(is_real.sum()), "fake": int(is_fake.sum()), "generators": per_gen}
    if not counts["real"] or not counts["fake"]:
        _need_both_classes(Pool([], ["real"] * counts["real"] + ["fake"] * counts["fake"], [], [],
                                np.zeros((0, 0))), "fit")
    names = [v or "unknown" for v in vocab]
    for _ in range(8):  # a drawn row found damaged on reading leaves the candidates; draw again
        order = hex_order(cand["raw"][idx])
        pick = idx[draw_shots(order, lab[idx] == 1, lab[idx] == 2, gcode[idx], names, k, seed, per_generator)]
        shas = raw_to_hex(cand["raw"][pick])
        labels = {s: ("real" if lab[i] == 1 else "fake", vocab[gcode[i]] if lab[i] == 2 else "")
                  for s, i in zip(shas, pick)}
        chosen = load_pool(cache, key, view, shas=shas, labels=labels, kinds=kinds)
        if len(chosen) == len(shas):
            break
        bad = set(shas) - set(chosen.sha256)
        idx = np.array([i for i, s in zip(idx, raw_to_hex(cand["raw"][idx])) if s not in bad], dtype=np.int64)
    return chosen, counts


def drop_conflicts(labels: dict, seen_as: dict[str, list], cache=None) -> set[str]:
    """Remove from `labels` the images whose labels disagree, among these inputs (`seen_as`: sha →
    [(label, generator, path)]) or in the cache's record; warns naming the files. Returns them."""
    import warnings

    from .cache.conflicts import conflicted

    bad = {s for s, obs in seen_as.items() if conflicted([(lab, g) for lab, g, _ in obs])}
    for s in sorted(bad):
        desc = "; ".join(f"{p} as {lab}{'/' + g if g else ''}" for lab, g, p in seen_as[s])
        warnings.warn(f"conflicting labels for the same image ({desc}): left out", stacklevel=3)
    if cache is not None and labels:
        recorded = cache.conflicted(list(labels)) - bad
        if recorded:
            first = sorted(recorded)[0]
            warnings.warn(f"{len(recorded)} image(s) relabelled against the cache's record, e.g. "
                          f"{seen_as.get(first, [('', '', first)])[0][2]}: left out (clipdet cache conflicts "
                          "lists them)", stacklevel=3)
        bad |= recorded
    for s in bad:
        labels.pop(s, None)
    return bad


def pool_from_refs(refs, cache, backbone: str, view: str, views_to_extract: Sequence[str], device: str,
                   quiet: bool = True, kinds: Sequence[str] = ("embedding",)):
    """Extract what the cache lacks for `refs`, then load them as a labelled pool (labels from refs)."""
    from .extract import extract

    summary = extract(refs, backbone, cache=cache, views=list(views_to_extract), device=device, quiet=quiet)
    by_path = {r.path: r for r in refs}
    labels, paths = {}, {}
    seen_as: dict[str, list] = {}
    for path, sha, error in summary.records:  # hashes from the extraction pass: no second read
        r = by_path[path]
        if error or r.label not in ("real", "fake"):
            continue
        labels[sha] = (r.label, r.generator or "")
        paths.setdefault(sha, r.path)
        seen_as.setdefault(sha, []).append((r.label, r.generator or "", r.path))
    drop_conflicts(labels, seen_as, cache)
    key, rec = resolve_backbone_key(cache, backbone, view)
    pool = load_pool(cache, key, view, shas=sorted(labels), labels=labels, paths=paths, kinds=kinds)
    return pool, key, rec, summary


def fit(
    paths: Sequence[str] | None = None,
    *,
    head: str = "svm",
    shots: int | str | None = 10,
    seed: int = 0,
    backbone: str | None = None,
    cache=None,
    manifest: str | None = None,
    view: str = "clean",
    augment_views: bool = False,
    per_generator: bool = False,
    exclude_generators: Sequence[str] = (),
    params: dict | None = None,
    calibrate: Sequence[str] | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    attribute: bool = True,
    device: str = "auto",
    quiet: bool = True,
    prune: int = 0,
    prune_basis: str = "coord",
    features: str = "image",
    captions=None,
):
    """Fit a few-shot detector; the library form of `clipdet fit`. Returns a `Detector`.

    Without `paths`/`manifest`, every labelled image in the cache for the backbone is a candidate.
    With them, only those images are candidates (extracted first if not cached). `prune`,
    `prune_basis`: see `fit_from_pool`. `features`
    (image | image+text | residual) and `captions` (a `clipdet.text.Captions` or a captions CSV
    path; manifests may carry a caption column) choose what the head sees; candidates without a
    caption are left out (noted). `shots=0` fits a zero-shot head (zeroshot) without references.
    """
    from .cache import FeatureCache
    from .features import kinds_for
    from .images import canonical_view, discover, require_images
    from .text.fitting import FitText

    kinds = kinds_for([head])
    check_kinds_features(kinds, features)

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    view = canonical_view(view)
    k = parse_shots(shots)
    ft = FitText(head, features, captions, k)
    if k == 0 and prune:
        raise UsageError("--prune chooses components on the references: it needs --shots K > 0")
    if k == 0:
        return ft.zero_shot_fit(cache, backbone, view, params, seed, target_fpr, device, calibrate=calibrate,
                                unused=bool(paths or manifest), quiet=quiet)
    skipped: list[tuple[str, str]] = []
    refs = None
    if paths or manifest:
        if not backbone:
            from .backbones import DEFAULT_BACKBONE

            specs = {g.backbone.get("spec") for g in ft.image_groups(cache)} if cache.exists() else set()
            if len(specs) > 1:
                raise UsageError(f"{cache.path} holds several backbones ({', '.join(sorted(specs))}); "
                                 "choose one with --backbone")
            backbone = specs.pop() if specs else DEFAULT_BACKBONE
        refs = discover(list(paths or []), manifest=manifest)
        require_images(refs, list(paths or []))
        ft.add_refs(refs)
        pool, key, rec, summary = pool_from_refs(refs, cache, backbone, view, [view], device, quiet, kinds)
        skipped += summary.errors
        pool = ft.captioned(pool, cache, key)
    else:
        if not cache.exists():
            raise UsageError(f"{cache.path}: no feature cache; run clipdet extract first or pass PATHs")
        key, rec = resolve_backbone_key(cache, backbone, view)
        pool = ft.cache_pool(cache, key, view)  # None: sample from the index (image features)
    excluded = set(exclude_generators)
    if pool is None:  # the whole cache: sample from the index, read only the chosen rows
        chosen, counts = sample_from_cache(cache, key, view, k, seed, per_generator, excluded, kinds)
    else:
        if excluded:
            unknown = excluded - set(pool.generator)
            if unknown:
                raise UsageError(f"--exclude-generator {', '.join(sorted(unknown))}: no such generator among "
                                 f"the references (have: {', '.join(sorted(set(pool.generator) - {''}))})")
            pool = pool.take([i for i in range(len(pool)) if pool.generator[i] not in excluded])
        _need_both_classes(pool, "fit")
        chosen = pool.take(sample_shots(pool.label, pool.generator, k, seed, per_generator, keys=pool.sha256))
        counts = candidate_counts(pool.label, pool.generator)

    extra = None
    if augment_views:
        other = sorted({g.view for g in ft.image_groups(cache) if g.key == key} - {view})
        parts = []
        labels = {s: (lab, g) for s, lab, g in zip(chosen.sha256, chosen.label, chosen.generator)}
        pths = dict(zip(chosen.sha256, chosen.path))
        for v in other:
            parts.append(load_pool(cache, key, v, shas=chosen.sha256, labels=labels, paths=pths, kinds=kinds))
        parts = [p for p in parts if len(p)]
        if parts:
            extra = Pool(sum((p.sha256 for p in parts), []), sum((p.label for p in parts), []),
                         sum((p.generator for p in parts), []), sum((p.path for p in parts), []),
                         np.vstack([p.X for p in parts]),
                         {kd: (np.vstack([p.feats[kd][0] for p in parts]), parts[0].feats[kd][1])
                          for kd in parts[0].feats})
    cal_pool = None
    if calibrate:
        cal_refs = discover(list(calibrate))
        ft.add_refs(cal_refs)
        cal_pool, _, _, cal_summary = pool_from_refs(cal_refs, cache, rec.get("spec") or backbone, view, [view],
                                                     device, quiet, kinds)
        skipped += cal_summary.errors
        cal_pool = ft.captioned(cal_pool, cache, key, what="--calibrate")
        overlap = set(cal_pool.sha256) & set(chosen.sha256)
        if overlap:
            raise UsageError(f"--calibrate images overlap the fit references ({len(overlap)} shared by content)")
    meta = {
        "backbone": rec, "backbone_key": key, "view": view, "shots": "all" if k is None else k,
        "per_generator": per_generator, "exclude_generators": sorted(excluded), "augment_views": augment_views,
        "candidates": {"real": counts["real"], "fake": counts["fake"]}, "features": ft.features,
    }
    text = ft.embedder(rec.get("spec") or backbone, cache, key, device)
    chosen, extra, cal_pool = (ft.transform(p, text) for p in (chosen, extra, cal_pool))
    det = fit_from_pool(chosen, head=head, params=params, target_fpr=target_fpr, seed=seed, calibration=cal_pool,
                        attribute=attribute, extra=extra, meta=meta, prune=prune, prune_basis=prune_basis,
                        text=text)
    short = shots_shortfall(counts, k, per_generator)
    if short:
        det.meta.setdefault("notes", []).insert(0, short)
    det.meta.setdefault("notes", []).extend(ft.notes)
    det.skipped = skipped
    det.input_notes = [refs.summary()] if refs is not None and hasattr(refs, "summary") and refs.summary() else []
    return det


def _unit_dim(X: np.ndarray, layout: dict) -> int:
    """Width of one unit (head contribution, block token) of rows laid out as `layout`."""
    return int(layout.get("dim") or X.shape[1] // max(1, int(layout.get("units", 1))))


def check_kinds_features(kinds: Sequence[str], features: str) -> None:
    """UsageError when heads reading attention heads / block tokens are asked for caption features."""
    other = [k for k in kinds if k != "embedding"]
    if other and features not in (None, "image"):
        raise UsageError(f"--features {features} applies to the image embedding; heads reading {other[0]} "
                         "features take --features image")


def candidate_counts(labels: Sequence[str], generators: Sequence[str]) -> dict:
    """Candidates per class and fakes per generator ('unknown' when unnamed): shots_shortfall's input."""
    gens: dict[str, int] = {}
    for g, lab in zip(generators, labels):
        if lab == "fake":
            gens[g or "unknown"] = gens.get(g or "unknown", 0) + 1
    return {"real": list(labels).count("real"), "fake": list(labels).count("fake"), "generators": gens}


def shots_shortfall(counts: dict, k: int | None, per_generator: bool = False) -> str:
    """A note when `k` shots per class (or per generator) exceed the candidates `counts`
    (from candidate_counts), else ''."""
    if k is None:
        return ""
    have = {"real": counts["real"], "fake": counts["fake"]}
    want = {"real": k, "fake": k}
    if per_generator:
        gens = counts["generators"]
        want["real"] = k * max(1, len(gens))
        have.pop("fake")
        want.pop("fake")
        have.update({f"fake/{g}": n for g, n in sorted(gens.items())})
        want.update({f"fake/{g}": k for g in gens})
    short = [f"{have[c]} {c}" for c in have if have[c] < want[c]]
    if not short:
        return ""
    return (f"--shots {k} asks for more references than there are ({', '.join(short)} available): "
            "all of those were used, so this fit has fewer (and unbalanced) references")


def parse_params(items: Sequence[str]) -> dict:
    """`--param key=value` pairs → dict; values parsed as JSON when possible (numbers, true, null)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
