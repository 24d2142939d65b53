"""`fit`: the library form of `clipdet fit`: candidates → drawn shots → `fit_from_pool` → `Detector`.

Calibration never sees evaluation data: the threshold (at `target_fpr` on real images) and the
Platt parameters behind `p_fake` come from out-of-fold decision values on the references
(cross-validation, leave-one-out for tiny sets), or from a separate `calibrate` set when given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UsageError
from .config import FitConfig, check_kinds_features, parse_shots, with_options
from .head import fit_from_pool
from .pools import Pool, load_pool, need_both_classes, pool_from_refs, resolve_backbone_key, sample_from_cache
from .shots import candidate_counts, sample_shots, shots_shortfall


def fit(
    paths: Sequence[str] | None = None,
    config: FitConfig | None = None,
    *,
    backbone: str | None = None,
    cache=None,
    manifest: str | None = None,
    device: str = "auto",
    quiet: bool = True,
    captions=None,
    **options,
):
    """Fit a few-shot detector; the library form of `clipdet fit`. Returns a `Detector`.

    What to fit is a `FitConfig` (`config`), with any of its fields given as keyword `options`
    replacing the config's (`fit(head="svm", shots=10, seed=0, cache=...)`).
    Without `paths`/`manifest`, every labelled image in the cache for the backbone is a candidate.
    With them, only those images are candidates (extracted first if not cached). `prune`,
    `prune_basis`: see `fit_from_pool`. `features`
    (image | image+text | residual) and `captions` (a `clipdet.text.Captions` or a captions CSV
    path; manifests may carry a caption column) choose what the head sees; candidates without a
    caption are left out (noted). `shots=0` fits a zero-shot head (zeroshot) without references.
    """
    from ..cache import FeatureCache
    from ..detectors import kinds_for
    from ..extract.discover import discover, require_images
    from ..extract.views import canonical_view
    from .text import FitText

    cfg = with_options(config, options)
    head, shots, seed = cfg.head, cfg.shots, cfg.seed
    per_generator, exclude_generators, calibrate = cfg.per_generator, cfg.exclude_generators, cfg.calibrate
    augment_views, features, prune = cfg.augment_views, cfg.features, cfg.prune
    kinds = kinds_for([head]) if head != "auto" else ["embedding"]
    if cfg.blocks:
        kinds = ["embedding", cfg.kind(kinds[-1])[0]]
    check_kinds_features(kinds, features)

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    cfg = cfg.replace(view=canonical_view(cfg.view))
    view = cfg.view
    if head == "auto":
        kinds = auto_kinds(cache, backbone, view)
    k = parse_shots(shots)
    ft = FitText(head, features, captions, k)
    if k == 0 and prune:
        raise UsageError("--prune chooses components on the references: it needs --shots K > 0")
    if k == 0 and cfg.tiles:
        raise UsageError("--tiles calibrates on the references: it needs --shots K > 0")
    if k == 0:
        return ft.zero_shot_fit(cache, backbone, cfg, device, unused=bool(paths or manifest), quiet=quiet)
    skipped: list[tuple[str, str]] = []
    refs = None
    if paths or manifest:
        if not backbone:
            from ..backbones import DEFAULT_BACKBONE

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
        need_both_classes(pool, "fit")
        chosen = pool.take(sample_shots(pool.label, pool.generator, k, seed, per_generator, keys=pool.sha256))
        counts = candidate_counts(pool.label, pool.generator)
    # One canonical row order, by content hash: heads and calibration are not order-free to the last bit,
    # so the cache's order (fit from the cache) and the discovery order (fit PATH) must not reach them.
    chosen = chosen.take(np.argsort(np.array(chosen.sha256, dtype=str), kind="stable"))

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
                                                     device, quiet, kinds, references=False)
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
    tiles = None
    if cfg.tiles:
        from ..detectors.tiles import parse_tiles
        from .tiles import tile_pools

        if features != "image":
            raise UsageError(f"--tiles applies to image features, not --features {features}")
        if "heads" in kinds:
            raise UsageError("--tiles works with heads that read the embedding or blocks, not attention heads")
        tiles = tile_pools(chosen, cache, key, rec.get("spec") or backbone, *parse_tiles(cfg.tiles), kinds,
                           device, quiet)
    text = ft.embedder(rec.get("spec") or backbone, cache, key, device)
    chosen, extra, cal_pool = (ft.transform(p, text) for p in (chosen, extra, cal_pool))
    det = fit_from_pool(chosen, cfg, calibration=cal_pool, extra=extra, meta=meta, text=text, tiles=tiles)
    short = shots_shortfall(counts, k, per_generator)
    if short:
        det.meta.setdefault("notes", []).insert(0, short)
    det.meta.setdefault("notes", []).extend(ft.notes)
    det.skipped = skipped
    det.input_notes = [refs.summary()] if refs is not None and hasattr(refs, "summary") and refs.summary() else []
    return det


def auto_kinds(cache, backbone: str | None, view: str) -> list[str]:
    """Feature kinds `--head auto` reads: the embedding, and the block kinds the cache's group holds."""
    if not cache.exists():
        return ["embedding"]
    groups = [g for g in cache.groups(count=False) if g.view == view]
    if backbone:
        from ..backbones import describe_backbone

        key = describe_backbone(backbone).key
        groups = [g for g in groups if g.key == key]
    if len(groups) != 1 or not groups[0].layers:
        return ["embedding"]
    g = groups[0]
    return ["embedding", "layers"] + (["layers_mean"] if "layers_mean" in getattr(g, "extras", ()) else [])
