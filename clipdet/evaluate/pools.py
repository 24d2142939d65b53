"""Labelled pools per view for the benchmark protocols: extract what the cache lacks, then load."""

from __future__ import annotations

from collections.abc import Sequence


def load_pools(
    paths: Sequence[str] | None,
    manifest: str | None,
    cache,
    backbone: str | None,
    views: Sequence[str],
    device: str = "auto",
    quiet: bool = True,
    kinds: Sequence[str] = ("embedding",),
) -> tuple[dict, dict]:
    """Labelled pools per view ("clean" first) and info (backbone record/key, formats, extraction summary).

    With `paths`/`manifest` their images are extracted for every view the cache lacks (labels from the
    layout or manifest); without them, every labelled image already cached for the backbone is used.
    `kinds`: the feature kinds the heads read (`clipdet.detectors.features.kinds_for`).
    """
    from ..cache import FeatureCache
    from ..errors import UsageError
    from ..extract.discover import discover, require_images
    from ..extract.views import parse_views
    from ..fit.pools import load_pool, pool_from_refs, resolve_backbone_key

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    views = parse_views(views)
    summary = None
    if paths or manifest:
        if not backbone:
            from ..extract.run import default_backbone

            backbone = default_backbone(cache)[0]
        refs = discover(list(paths or []), manifest=manifest)
        require_images(refs, list(paths or []))
        clean, key, rec, summary = pool_from_refs(refs, cache, backbone, "clean", views, device, quiet, kinds)
    else:
        if not cache.exists():
            raise UsageError(f"{cache.path}: no feature cache; pass PATHs to extract, or run clipdet extract first")
        key, rec = resolve_backbone_key(cache, backbone, "clean")
        clean = load_pool(cache, key, "clean", kinds=kinds)
    pools = {"clean": clean}
    labels = {s: (lab, g) for s, lab, g in zip(clean.sha256, clean.label, clean.generator)}
    paths_by_sha = dict(zip(clean.sha256, clean.path))
    for v in views[1:]:
        p = load_pool(cache, key, v, shas=clean.sha256, labels=labels, paths=paths_by_sha, kinds=kinds)
        if len(p) == 0:
            raise UsageError(f"{cache.path}: no '{v}' features for {rec.get('spec', key)}; pass PATHs to extract them "
                             f"(or clipdet extract --views {v})")
        pools[v] = p
    images = cache.image_metas(clean.sha256)  # the pool's rows only, not the whole cache
    formats = {s: images[s].format for s in clean.sha256 if s in images}
    notes = [refs.summary()] if (paths or manifest) and hasattr(refs, "summary") and refs.summary() else []
    return pools, {"backbone": rec, "backbone_key": key, "formats": formats, "extract": summary,
                   "input_notes": notes, "refs": refs if (paths or manifest) else []}
