"""`extract`: the extraction stage's entry point; runs the pipeline on the chosen engine.

Above both the local pipeline and the engines (the Ray engine's child runs the same pipeline), so
neither needs to import the other.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..cache import FeatureCache
from .discover import ImageRef
from .pipeline import ExtractSummary, extract_local


def default_backbone(cache: FeatureCache | str | None) -> tuple[str, bool]:
    """The backbone to use when none is named: the cache's only one, else ViT-L-14:openai (the default).

    Returns (spec, whether it came from the cache); `fit`, `eval`, `bench` and `extract` agree on it."""
    from ..backbones import DEFAULT_BACKBONE

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    specs = {g.backbone.get("spec") for g in cache.groups(count=False)} - {None} if cache.exists() else set()
    return (specs.pop(), True) if len(specs) == 1 else (DEFAULT_BACKBONE, False)


def extract(
    refs: Iterable[ImageRef],
    backbone: str,
    cache: FeatureCache | str | None = None,
    views: Iterable[str] | str | None = None,
    *,
    engine: str = "local",
    ray_address: str | None = None,
    **options,
) -> ExtractSummary:
    """Embed `refs` with `backbone` into the feature cache; returns an `ExtractSummary`.

    Files whose content is already cached (for every requested view) are hashed but not decoded, and
    the model is not loaded when nothing is new. Bad files are recorded (summary and the cache's error
    record) and skipped. Each batch is written as its own shard, so a crash loses at most the batch
    in flight; the run ends by compacting the shards into the main file (unless `compact=False`).
    `options` are the pipeline's (`extract_local`): batch_size, workers, device, layers, quiet, max_pixels,
    draft, precision, record_cached, compact, lazy, rehash, heads, stages.
    Pass a `LazyBackbone` as `lazy` to share one loaded model across calls (`backbone` is then ignored).
    `record_cached=False` skips recording paths and labels of already-cached files (scoring uses it,
    so re-scoring a cached folder writes nothing); otherwise only new paths or labels are recorded.
    Without `layers`, the layer set the cache already stores for this backbone is kept, so adding
    images (from extract, fit PATH or score) never changes a group's layout.
    Files unchanged since an earlier run (the cache's stat index) are not read at all; `rehash=True`
    hashes every file regardless. `heads` N also stores the attention-head decomposition of the last N
    blocks (`Backbone.embed(heads=N)`); like `layers`, without it a group's stored head set is kept.
    `engine="ray"` runs the reader and embedder stages on a Ray cluster (`ray_address`, else
    $RAY_ADDRESS, else a local Ray started for the run; see clipdet.extract.engines.ray_driver); the results
    and the cache writes are the same. `stages` (internal) replaces the local
    reader/embedder with another engine's: an object with `prepared(refs, **context)` and
    `writer(cache, lazy, views, batch_size)` (the Ray engine's child process passes its own).
    """
    if engine == "local":
        return extract_local(refs, backbone, cache=cache, views=views, **options)
    from .engines import run_extract

    return run_extract(engine, refs, backbone, cache=cache, views=views, ray_address=ray_address, **options)
