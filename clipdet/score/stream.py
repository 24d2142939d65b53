"""Streaming scoring: inputs in chunks → (extract what the cache lacks) → detector → rows, in input order.

Memory stays flat: only one chunk of paths, features and rows is held at a time, and rows are
written (and flushed) as each chunk finishes, so an interrupted run keeps what it wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from ..errors import UsageError
from ..extract.discover import ImageRef

DEFAULT_CHUNK = 1024
FIRST_CHUNK = 16


def growing_chunks(items: Iterable, first: int = FIRST_CHUNK, largest: int = DEFAULT_CHUNK) -> Iterator[list]:
    """Lists of consecutive items: `first` items, then twice as many each time, up to `largest`.

    A small first chunk puts the first rows out within seconds; larger later chunks amortise the
    per-chunk cost (cache look-up, model call) over many images.
    """
    n = max(1, min(first, largest))
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
            n = min(2 * n, largest)
    if buf:
        yield buf


def score_refs(
    refs: Iterable[ImageRef],
    detector,
    cache=None,
    device: str = "auto",
    threshold: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    backbone: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    quiet: bool = True,
    view: str | None = None,
    precision: str = "auto",
    first_chunk: int = FIRST_CHUNK,
    on_chunk: Callable[[], None] | None = None,
    captions=None,
    engine: str = "local",
    ray_address: str | None = None,
    stability: Sequence[str] | str | None = None,
    stability_cache: bool = False,
    provenance: bool = True,
) -> Iterator[dict]:
    """Yield one row dict (see `COLUMNS`) per input, in input order.

    Inputs are processed in chunks of `first_chunk` images, doubling up to `chunk`; `on_chunk()` is
    called once the rows of each chunk have been taken (the CLI flushes its output there).

    Images already in the cache for the detector's backbone and view are not run through the model;
    new ones are extracted and added. `backbone` overrides the spec stored in the detector (e.g. the
    weights file moved); it must have the same weights. `view` scores a perturbed view instead.
    Detectors fitted on caption features (image+text, residual) take each image's caption from its
    ref (manifest column) or `captions` (a `clipdet.text.Captions`); an image without one gets
    `MISSING_CAPTION` in its row's error.
    `engine="ray"` first embeds every uncached input on a Ray cluster (one run, into the cache), then
    scores chunk by chunk from the cache as above.
    `stability` (a list of views, or a --stability-views string; None: off) also scores each image on
    those perturbed views and applies the detector's unsure band (`clipdet.score.stability`): rows gain
    stable, score_min, score_max, flips, unsure_reason, and the label "unsure". Their features stay in
    memory unless `stability_cache`. `provenance` fills the `provenance` column (and
    `provenance_details`) from the bytes read for hashing (`clipdet.provenance`; never part of the score).
    """
    from ..cache import FeatureCache
    from ..extract.discover import without_labels
    from ..extract.lazy import LazyBackbone
    from ..extract.run import extract

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if not cache.readonly and not cache.can_write():
        import warnings

        warnings.warn(f"{cache.path}: cache folder not writable; new images are embedded in memory and "
                      "not cached (--cache-readonly says so explicitly)", stacklevel=2)
        cache.readonly = True
    view = view or detector.view
    if backbone:
        check_backbone_override(detector, backbone)
    import numpy as np

    from ..detectors.features import load_kwargs, matrix
    from .plan import read_plan

    kind = detector.layout.get("kind", "embedding")
    order, new_layout = read_plan(cache, detector, view)  # before any extraction: a mismatch is one line
    lazy = LazyBackbone(backbone or detector.backbone.get("spec"), device=device, key=detector.backbone_key,
                        precision=precision, **new_layout)
    load_kw = load_kwargs([kind])
    from ..text.features import CaptionFeatures

    text = CaptionFeatures(detector, cache, captions, backbone, device)
    from .stability import apply_judgement, overlay, stability_views

    stab = None if stability is None else stability_views(stability, view)
    side = overlay(cache, stability_cache) if stab else None
    band = detector.unsure_range(threshold) if stab is not None else None
    t = detector.threshold if threshold is None else threshold

    def head_input(feats, part, summary):
        """(X, ok): the rows the head reads, and which of them could be made (captions)."""
        if text.active:
            return text.features(feats, part, summary.records)
        X = matrix(feats, kind, order=order) if len(feats.sha256) else np.zeros((0, 0), np.float32)
        return X, np.ones(len(X), bool)

    def features(src, v, summary, part):
        feats = src.load(detector.backbone_key, v, shas=[s for _, s, e in summary.records if not e], **load_kw)
        return (feats, *head_input(feats, part, summary))

    if engine != "local":
        refs = list(refs)
        extract(without_labels(refs), "", cache=cache, views=[view], batch_size=batch_size, device=device,
                quiet=quiet, compact=False, lazy=lazy, record_cached=False, engine=engine, ray_address=ray_address)
    for part in growing_chunks(refs, first_chunk, chunk):
        part = without_labels(part)  # scored images are not references: recorded unlabelled
        summary = extract(part, "", cache=cache, views=[view] + (stab if stab and side is cache else []),
                          batch_size=batch_size, workers=workers, device=device, quiet=quiet, compact=False,
                          lazy=lazy, record_cached=False, provenance=provenance)
        shas = [s for _, s, e in summary.records if not e]
        feats = cache.load(detector.backbone_key, view, shas=shas, **load_kw)
        damaged = set(shas) & cache.damaged - set(feats.sha256)
        if damaged:  # rows that failed their checks: embed those files again, then read the new rows
            again = [r for r, (_, s, e) in zip(part, summary.records) if not e and s in damaged]
            import warnings

            warnings.warn(f"{again[0].path if again else ''}: cached features damaged, re-extracted"
                          + (f" (and {len(again) - 1} more)" if len(again) > 1 else ""), stacklevel=2)
            extract(again, "", cache=cache, views=[view], batch_size=batch_size, workers=workers, device=device,
                    quiet=True, compact=False, lazy=lazy, record_cached=False, rehash=True)
            feats = cache.load(detector.backbone_key, view, shas=shas, **load_kw)
        pos = {s: i for i, s in enumerate(feats.sha256)}
        X, ok = head_input(feats, part, summary)
        scored = _score_ok(detector, X, ok, threshold)
        opts = dict(batch_size=batch_size, workers=workers, device=device, lazy=lazy)
        view_scores = _view_scores(detector, stab, side, side is not cache, part, summary, features,
                                   opts) if stab else {}
        for k, (path, sha, error) in enumerate(summary.records):
            row = {"path": path, "sha256": sha, "error": error}
            if not error:
                i = pos.get(sha)
                if i is not None and scored[i] is None:
                    from ..text import MISSING_CAPTION

                    row["error"] = MISSING_CAPTION
                elif i is None:
                    row["error"] = ("cached features damaged and the file could not be embedded again"
                                    if sha in cache.damaged else "no features after extraction")
                else:
                    row.update(scored[i])
                    if stab is not None:
                        apply_judgement(row, {v: vs.get(sha, float("nan")) for v, vs in view_scores.items()},
                                        t, band)
            if provenance:
                _provenance(row, summary.provenance[k] if k < len(summary.provenance) else None)
            if row["error"]:
                row["label"] = "unknown"
            yield row
        if on_chunk is not None:
            on_chunk()
        if cache.readonly:
            cache.drop_memory_segments()
        if side is not None and side.readonly:
            side.drop_memory_segments()
    cache.auto_compact()


def _view_scores(detector, views, src, embed: bool, part, summary, features, options: dict) -> dict:
    """{view: {sha256: score}} of the chunk's readable images on each perturbed view, read from `src`
    (the cache, or its in-memory overlay); `embed`: first run them through the extract path into `src`
    (`options`: batch_size, workers, device, lazy), else the chunk's own extract already did."""
    from ..extract.run import extract

    ok = [r for r, (_, _, e) in zip(part, summary.records) if not e]
    if not ok:
        return {}
    if embed:
        extract(ok, "", cache=src, views=views, quiet=True, compact=False, record_cached=False, **options)
    out = {}
    for v in views:
        feats, X, good = features(src, v, summary, part)
        scores = detector.decision_function(X[good]) if good.any() else []
        shas = [s for s, g in zip(feats.sha256, good) if g]
        out[v] = dict(zip(shas, (float(x) for x in scores)))
    return out


def _provenance(row: dict, found) -> None:
    """Fill the row's provenance columns: from the bytes read for hashing, else (a file the run did not read)
    from the file; nothing for unreadable inputs."""
    if found is None and not row.get("error") and row.get("path"):
        from ..provenance import read_provenance_file

        found = read_provenance_file(row["path"])
    if found is not None:
        row["provenance"] = found.short
        row["provenance_details"] = found.to_dict() if (found.marks or found.problems) else None


def _score_ok(detector, X, ok, threshold) -> list:
    """Result dicts of `detector` for the rows of `X` where `ok`, None for the others."""
    out: list = [None] * len(X)
    idx = [i for i in range(len(X)) if ok[i]]
    if idx:
        for i, r in zip(idx, detector.score_features(X[idx], threshold=threshold)):
            out[i] = r
    return out


def check_backbone_override(detector, backbone: str) -> None:
    """Refuse a `backbone` spec whose weights differ from the detector's, before any feature is read.

    Checked up front, not when the model loads: with every image cached no model is ever loaded, and
    the cached features of the detector's own backbone would be scored under another one's name.
    """
    from ..backbones import describe_backbone

    info = describe_backbone(backbone)
    if info.key != detector.backbone_key:
        want = detector.backbone
        arch = want.get("arch") or str(want.get("spec", "")).partition(":")[0]
        if arch and arch != info.arch:  # the weights ids may well be equal (the same file, or both random)
            raise UsageError(f"--backbone {backbone}: architecture {info.arch}, but the detector's is {arch} "
                             f"({want.get('spec')}); give {arch} with the detector's weights")
        raise UsageError(
            f"--backbone {backbone}: different weights from the detector's ({want.get('spec')}, weights id "
            f"{str(want.get('weights_id', '?'))[:16]}; this one {info.weights_id[:16]}); give the same weights file"
        )


def score_paths(detector, paths: Sequence[str], cache=None, device: str = "auto", **options) -> list[dict]:
    """Score image files or folders with `detector` (extracting what the cache lacks); one row dict
    (see `COLUMNS`) per input file, in input order. `options`: those of `score_refs`."""
    from ..extract.discover import discover

    return list(score_refs(discover(list(paths)), detector, cache=cache, device=device, **options))
