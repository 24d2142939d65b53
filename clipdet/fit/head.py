"""Fitting a detector on a drawn pool: the head, reference-only calibration, attribution, pruning."""

from __future__ import annotations

import numpy as np

from .._version import __version__
from ..errors import UsageError
from .config import FitConfig, with_options
from .pools import Pool, need_both_classes


def fit_from_pool(
    pool: Pool,
    config: FitConfig | None = None,
    *,
    calibration: Pool | None = None,
    extra: Pool | None = None,
    meta: dict | None = None,
    calibrate: bool = True,
    text=None,
    tiles: list[Pool] | None = None,
    **options,
):
    """Fit a `Detector` on the references in `pool` (already sampled); returns it.

    The config's head, params, target_fpr, seed, attribute, prune and prune_basis apply (`options`:
    `FitConfig` fields replacing the config's); its shots, view and paths were used to draw `pool`.

    `text`: a `clipdet.text.TextEmbedder` for heads that embed prompts (zeroshot). A zero-shot head
    fits with an empty `pool` (--shots 0): threshold at its natural midpoint 0, uncalibrated.

    `tiles`: the references' tile views (`clipdet.fit.tiles.tile_pools`, rows as `pool`) when the config
    asks for `tiles`: the detector also gets an image-level calibration for scoring on them.

    `extra`: additional training rows (e.g. perturbed views of the same references) used for the
    head only. `calibration`: held-out labelled images for threshold and Platt; without it, both come
    from out-of-fold decision values on `pool`. `calibrate=False` skips calibration (threshold 0.0,
    Platt (1.0, 0.0), method "none"), so even 1-shot fits work for ranking metrics such as AUC.
    The head reads the pools' features of its kind (`clipdet.detectors.features`); `prune` K > 0 first removes
    K components chosen on `pool` (`clipdet.fit.prune`), and the detector applies the same removal.
    """
    from sklearn.base import clone

    from ..detectors import create_head
    from ..detectors.calibration import cross_val_decision, reference_threshold
    from ..detectors.detector import Detector
    from ..detectors.openset import OpenSetRule

    cfg = with_options(config, options)
    auto = None
    if cfg.head == "auto":  # choose head, blocks and pruning by CV on these references only
        from .auto import choose

        need_both_classes(pool, "fit --head auto")
        cfg, ranked, cv_kind = choose(pool, cfg)
        chosen = next(c for c in ranked if (c.head, c.blocks, c.prune) == (cfg.head, cfg.blocks, cfg.prune))
        auto = {"cv": cv_kind, "rule": "one-standard-error", "chosen": chosen.as_dict(),
                "ranking": [c.as_dict() for c in ranked]}
    head, params, target_fpr, seed = cfg.head, cfg.params, cfg.target_fpr, cfg.seed
    attribute, prune, prune_basis = cfg.attribute, cfg.prune, cfg.prune_basis
    if not 0 <= target_fpr < 1:
        raise UsageError(f"--target-fpr {target_fpr}: expected a number in [0, 1)")
    from ..detectors.calibration import THRESHOLD_RULES

    if cfg.threshold_rule not in THRESHOLD_RULES:
        raise UsageError(f"--threshold-rule {cfg.threshold_rule!r}: expected {' or '.join(THRESHOLD_RULES)}")
    if not 0.5 <= cfg.unsure_accuracy <= 1:
        raise UsageError(f"--unsure-accuracy {cfg.unsure_accuracy}: expected a number in [0.5, 1]")
    params = dict(params or {})
    base = create_head(head, **params)
    zero = len(pool) == 0 and getattr(base, "zero_shot", False)
    if not zero:
        need_both_classes(pool, "fit")
    if "random_state" in base.get_params() and "random_state" not in params:
        base.set_params(random_state=seed)
    if "calibration_cv" in base.get_params():
        base.set_params(calibration_cv=0)  # the detector calibrates once, below
    trainable = getattr(base, "trainable", True)
    kind, blocks = cfg.kind(getattr(base, "needs", "embedding"))
    X, layout = pool.matrix(kind, blocks)
    blocks = layout.get("blocks") if blocks is not None else None  # resolved: other pools get the same
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
        m = p.matrix(kind, blocks)[0]
        return m if transform is None else transform.transform(m)

    y = pool.y
    tile_X = [features(p) for p in tiles] if tiles else []
    Xfit, yfit, gfit = X, y, list(pool.generator)
    if tile_X:  # the head will judge tiles too: it learns from the references' tiles as well
        Xfit, yfit, gfit = np.vstack([X, *tile_X]), np.tile(y, len(tile_X) + 1), gfit * (len(tile_X) + 1)
    if extra is not None and len(extra):
        Xfit, yfit = np.vstack([Xfit, features(extra)]), np.concatenate([yfit, extra.y])
        gfit = gfit + list(extra.generator)
    fit_kw = {"groups": np.array(gfit, dtype=object)} if getattr(base, "uses_groups", False) else {}
    model = clone(base)
    if getattr(model, "needs_prompts", False):
        from ..text.prompts import embed_prompts

        embed_prompts(model, text, head)
    model = (model.fit_zero_shot(X.shape[1] if X.ndim == 2 and X.shape[1] else None) if zero
             else model.fit(Xfit, yfit, **fit_kw))

    uncalibrated = zero and calibration is None
    if tile_X and (uncalibrated or not calibrate):
        raise UsageError("--tiles calibrates on the references: it needs --shots K > 0 and calibration")
    oof = None
    if tile_X:  # out-of-fold whole-image and tile scores, from fold heads fitted like this one
        from .tiles import out_of_fold

        need_both_classes(pool, "fit --tiles")
        oof = out_of_fold(base, model, X, y, tile_X, seed, trainable)
    if uncalibrated:
        cal_scores, cal_y, cal_method = np.zeros(0), np.zeros(0, dtype=np.int64), "none (zero-shot)"
    elif not calibrate:
        cal_scores, cal_y, cal_method = np.zeros(0), np.zeros(0, dtype=np.int64), "none"
    elif not trainable:  # nothing was learned from the references: their own scores are out-of-sample
        if calibration is not None:
            need_both_classes(calibration, "--calibrate")
        cal_scores = np.asarray(model.decision_function(X if calibration is None else features(calibration)),
                                np.float64)
        cal_y = pool.y if calibration is None else calibration.y
        cal_method = "references" if calibration is None else "held-out"
    elif calibration is not None:
        need_both_classes(calibration, "--calibrate")
        cal_scores = np.asarray(model.decision_function(features(calibration)), dtype=np.float64)
        cal_y = calibration.y
        cal_method = "held-out"
    else:
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2:
            raise UsageError("calibration needs at least 2 references per class (raise --shots or pass --calibrate)")
        if oof is not None:
            cal_scores, cal_method = oof[0], "cross-validation (heads also fitted on the tiles)"
        else:
            cal_scores = cross_val_decision(base, X, y, n_splits=5, random_state=seed)
            cal_method = "cross-validation" if counts.min() >= 5 else "leave-one-out"
        cal_y = y
    notes, threshold_rule = [], "none"
    if uncalibrated:
        threshold, slope = 0.0, float(model.calibration_slope_)
        notes.append("calibration: none - zero-shot detector without references: the threshold is the natural "
                     "midpoint (cosine difference 0) and p_fake = sigmoid(logit_scale x score) is UNCALIBRATED; "
                     "give references (--shots K, or --calibrate PATH) to calibrate them")
    elif not calibrate:  # a head's natural threshold 0; an untrained head keeps its own slope (zeroshot: 100)
        threshold, slope = 0.0, (1.0 if trainable else float(model.calibration_slope_))
    else:
        threshold, threshold_rule = reference_threshold(cal_scores[cal_y == 0], target_fpr, cfg.threshold_rule)
        slope, cal_notes = calibration_slope(cal_scores, cal_y, threshold)
        notes += cal_notes
    band = None
    if len(cal_scores) and calibrate:
        from ..detectors.refcv import unsure_band

        band = {**unsure_band(cal_scores, cal_y, threshold, cfg.unsure_accuracy), "method": cal_method}
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
        "calibration": {"method": cal_method, "n": int(len(cal_y)), "platt": [float(platt[0]), float(platt[1])],
                        "threshold_rule": threshold_rule},
        "counts": {"real": int((y == 0).sum()), "fake": int((y == 1).sum()),
                   "extra_rows": 0 if extra is None else int(len(extra))},
        "generators": named, "reference_sha256": sorted(set(pool.sha256)),
        "calibration_sha256": sorted(set(calibration.sha256)) if calibration is not None else [],
        "clipdet_version": __version__, "notes": notes, "layout": layout,
    })
    if cfg.blocks:
        m["blocks"] = cfg.blocks
    if auto is not None:
        m["auto"] = auto
    if transform is not None:
        m["prune"] = {"k": int(prune), "basis": prune_basis, **transform.info}
        notes.append(transform.describe())
    if uncalibrated:
        m["uncalibrated"] = True
    if band is not None:
        m["unsure"] = band
    if getattr(model, "needs_prompts", False):
        m["prompts"] = model.prompt_sets()
    if oof is not None:
        from ..detectors.tiles import parse_tiles
        from .tiles import calibrate_tiles

        m["tiles"] = calibrate_tiles(oof, y, *parse_tiles(cfg.tiles), target_fpr=target_fpr,
                                     threshold_rule=cfg.threshold_rule, rule=cfg.tile_rule,
                                     unsure_accuracy=cfg.unsure_accuracy, auto_view=auto is not None,
                                     slope_fn=calibration_slope)
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
    from ..detectors.calibration import fit_platt

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


def _unit_dim(X: np.ndarray, layout: dict) -> int:
    """Width of one unit (head contribution, block token) of rows laid out as `layout`."""
    return int(layout.get("dim") or X.shape[1] // max(1, int(layout.get("units", 1))))
