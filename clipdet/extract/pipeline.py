"""One-pass extraction: reader (hash, skip cached, decode, views, preprocess) → embedder → cache writer.

The stages are separate functions so each can be tested and tuned alone:

- `prepare(ref, ...)` reads one file, hashes it, and — only if some requested view is not cached —
  decodes it once and preprocesses every missing view. Runs in loader threads.
- `Backbone.embed(batch)` runs the model on a batch of preprocessed tensors (main thread).
- `FeatureCache.write_shard(...)` makes each finished batch durable (one atomic shard per batch).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..cache import FeatureCache, ImageMeta
from ..cache.statindex import stat_all
from ..errors import ClipdetError, ImageError
from .decode import DEFAULT_MAX_PIXELS, decode_image, read_file, sha256_bytes
from .discover import ImageRef
from .lazy import LazyBackbone, default_workers
from .progress import Progress
from .views import apply_view, parse_views
from .writer import BatchWriter


@dataclass
class Prepared:
    """Output of the reader stage for one input file."""

    ref: ImageRef
    sha256: str = ""
    meta: ImageMeta | None = None
    tensors: dict = field(default_factory=dict)  # view -> preprocessed tensor (missing views only)
    error: str = ""
    unchanged: bool = False  # known from the stat index: not read, nothing new to record
    provenance: object = None  # clipdet.provenance.Provenance of the bytes, when the run asked for it


@dataclass
class ExtractSummary:
    """What one extraction run did."""

    total: int = 0
    cached: int = 0
    new: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    backbone_key: str = ""
    views: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0  # forward passes (images x views)
    records: list[tuple[str, str, str]] = field(default_factory=list)  # (path, sha256, error) in input order
    provenance: list = field(default_factory=list)  # with provenance=True: Provenance or None, aligned with records

    @property
    def ok(self) -> bool:
        """True when every input was either cached or extracted."""
        return not self.errors

    def line(self) -> str:
        """One-line summary, e.g. '120 images: 100 cached, 18 new, 2 skipped (errors) in 3.1 s'."""
        rate = f", {self.embedded / self.seconds:.1f} img/s" if self.embedded and self.seconds > 0 else ""
        return (
            f"{self.total} images: {self.cached} cached, {self.new} new, {len(self.errors)} skipped"
            f" [{self.backbone_key}; views {','.join(self.views)}] in {self.seconds:.1f} s{rate}"
        )


def prepare(
    ref: ImageRef,
    views: Sequence[str],
    cached: dict[str, set[str]],
    preprocess: Callable,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | Callable[[], int | None] | None = None,
    provenance: bool = False,
) -> Prepared:
    """Reader stage for one file: read, hash, skip if cached, else decode once and make every missing view.

    Per-file problems become `Prepared.error`; a `ClipdetError` that is not about the file (say the
    model cannot be loaded) propagates and stops the run. The two halves, `read_hashed` and
    `decode_views`, are also run apart (the Ray engine runs them as separate stages).
    """
    out, data, missing = read_hashed(ref, views, cached, provenance)
    return decode_views(out, data, missing, preprocess, max_pixels, draft_size)


def read_hashed(ref: ImageRef, views: Sequence[str], cached: dict[str, set[str]],
                provenance: bool = False) -> tuple[Prepared, bytes, list[str]]:
    """First half of `prepare`: read and hash one file; returns (Prepared, its bytes, views not cached).

    The bytes are returned only when some view is missing (else b""). `provenance` also reads the
    file's provenance marks from the same bytes (`Prepared.provenance`; clipdet.provenance)."""
    out = Prepared(ref)
    if ref.error:  # discovery already knows this input cannot be used (e.g. a folder it could not list)
        out.error = ref.error
        return out, b"", []
    try:
        data = read_file(ref.path)
        out.sha256 = sha256_bytes(data)
        if provenance:
            from ..provenance import read_provenance

            out.provenance = read_provenance(data)
        out.meta = ImageMeta(out.sha256, ref.label or "", ref.generator or "", paths=[os.path.abspath(ref.path)])
        missing = [v for v in views if out.sha256 not in cached.get(v, ())]
        return out, (data if missing else b""), missing
    except Exception as e:  # noqa: BLE001 - sorted out by _file_error
        _file_error(out, e)
    return out, b"", []


def decode_views(out: Prepared, data: bytes, missing: Sequence[str], preprocess: Callable,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | Callable[[], int | None] | None = None) -> Prepared:
    """Second half of `prepare`: decode `data` once and preprocess every view in `missing` into `out.tensors`."""
    if out.error or not missing:
        return out
    try:
        # Perturbed views are made from the full-resolution decode; only a clean-only file may use draft.
        ds = draft_size() if callable(draft_size) else draft_size
        dec = decode_image(data, out.ref.path, max_pixels=max_pixels,
                           draft_size=ds if list(missing) == ["clean"] else None)
        out.meta.width, out.meta.height, out.meta.format = dec.width, dec.height, dec.format
        for v in missing:
            out.tensors[v] = preprocess(apply_view(dec.image, v))
    except Exception as e:  # noqa: BLE001 - sorted out by _file_error
        _file_error(out, e)
    return out


def _file_error(out: Prepared, e: Exception) -> None:
    """A per-file problem becomes `out.error`; a ClipdetError about something else (the model) propagates."""
    if isinstance(e, ImageError):
        out.error = e.reason
    elif isinstance(e, ClipdetError):
        raise e
    else:  # one file never stops a run
        out.error = f"{type(e).__name__}: {e}"


def iter_prepared(
    refs: Sequence[ImageRef], workers: int, fn: Callable[[ImageRef], Prepared], prefetch: int
) -> Iterator[Prepared]:
    """Run `fn` over `refs` on `workers` threads with at most `prefetch` in flight; yields in input order."""
    if workers <= 0:
        for r in refs:
            yield fn(r)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipdet-reader") as pool:
        pending: deque = deque()
        it = iter(refs)
        for r in it:
            pending.append(pool.submit(fn, r))
            if len(pending) >= prefetch:
                break
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()


def extract_local(
    refs: Iterable[ImageRef],
    backbone: str,
    cache: FeatureCache | str | None = None,
    views: Iterable[str] | str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    layers: Sequence[int] | None = None,
    quiet: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = False,
    precision: str = "auto",
    record_cached: bool = True,
    compact: bool = True,
    lazy: LazyBackbone | None = None,
    rehash: bool = False,
    heads: int | None = None,
    stages=None,
    provenance: bool = False,
) -> ExtractSummary:
    """The local engine of `clipdet.extract.extract`: reader threads and the embedder in this process.

    Parameters as there (`stages`, internal: another engine's reader/embedder, see there). `provenance`:
    also read each file's provenance marks from the bytes read for hashing, into `summary.provenance`
    (None for files not read: known unchanged from the stat index, or read by another engine).
    """
    t0 = time.perf_counter()
    refs = list(refs)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    views = parse_views(views)
    explicit_layers = bool(layers) or bool(heads) or (lazy is not None and lazy.explicit)
    lazy = lazy if lazy is not None else LazyBackbone(backbone, device, layers or (), precision=precision,
                                                      heads=heads or 0)
    summary = ExtractSummary(total=len(refs), backbone_key=lazy.key, views=list(views))
    if lazy.explicit and not lazy.loaded and cache.exists():
        _refuse_missing_extras(cache, lazy, views)
    if not (lazy.layers and lazy.heads) and not lazy.loaded and cache.exists():
        groups = [g for g in cache.groups(count=False) if g.key == lazy.key and g.view in views]
        stored = [g.layers for g in groups if g.layers]
        if stored and not lazy.layers:
            lazy.layers = tuple(stored[0])
        stored_h = [g.heads for g in groups if g.heads]
        if stored_h and not lazy.heads:
            lazy.heads = len(stored_h[0]["blocks"])
    cached = {v: cache.cached_shas(lazy.key, v) for v in views}

    def check(model, abs_layers) -> None:
        for v in views:
            cache.check_compatible(model.info, v, abs_layers, lazy.heads_spec)

    lazy.on_load(check, key=(cache.path, tuple(views)))
    if explicit_layers and any(cached.values()):
        # --layers resolve against the model: check them even when nothing is new, or a re-run with
        # other layers would report "all cached" while the cache holds none of the requested tokens
        lazy.get()
    workers = default_workers(device) if workers is None else workers
    prefetch = max(2 * (batch_size or 32), 4 * workers)

    def fn(r: ImageRef) -> Prepared:
        return prepare(r, views, cached, lazy.preprocess, max_pixels=max_pixels,
                       draft_size=lazy.image_size if draft else None, provenance=provenance)

    def read(rs: list[ImageRef]) -> Iterator[Prepared]:
        if stages is not None:
            return stages.prepared(rs, lazy=lazy, views=views, cached=cached, max_pixels=max_pixels, draft=draft,
                                   batch_size=batch_size)
        return iter_prepared(rs, workers, fn, prefetch)

    abs_paths = [abs_path(r.path) for r in refs]
    stat_ns = time.time_ns()  # before the stats: a file changed after this is never trusted unread
    stats = stat_all(abs_paths)
    known_files = {} if rehash else _unchanged(cache, refs, abs_paths, stats, cached, views, record_cached)

    progress = Progress(len(refs), quiet, "extract")
    writer = (stages.writer if stages is not None else BatchWriter)(cache, lazy, views, batch_size)
    seen: set[str] = set()
    already: list[ImageMeta] = []  # cached images whose metadata may be new: checked in batches
    also = {r.path: r.also for r in refs if r.also}  # a manifest's other labels for a path (discover)
    try:
        for p in _with_known(refs, abs_paths, known_files, read):
            progress.update()
            summary.records.append((p.ref.path, p.sha256, p.error))
            if provenance:
                summary.provenance.append(p.provenance)
            if p.error:
                summary.errors.append((p.ref.path, p.error))
                writer.errors.append({"sha256": p.sha256, "path": os.path.abspath(p.ref.path), "reason": p.error})
                continue
            if p.ref.path in also and record_cached:  # recorded as further observations: a label conflict
                already += [ImageMeta(p.sha256, lab or "", gen or "", paths=list(p.meta.paths))
                            for lab, gen in also[p.ref.path]]
            if not p.tensors or p.sha256 in seen:
                summary.cached += 1
                if record_cached and not p.unchanged:
                    already.append(p.meta)
                    if len(already) >= KNOWN_BATCH:
                        writer.metas += _new_metas(cache, already, seen)
                        already = []
                continue
            writer.metas.append(p.meta)
            seen.add(p.sha256)
            summary.new += 1
            writer.add(p.sha256, p.tensors)
        writer.metas += _new_metas(cache, already, seen)
        writer.close()
    finally:
        progress.close()
    cache.stat_index().record(
        ((abs_paths[i], stats[i], sha, record_cached) for i, (path, sha, error) in enumerate(summary.records)
         if not error and sha and stats[i] is not None and i not in known_files), stat_ns=stat_ns)
    summary.embedded = writer.embedded
    if compact and writer.segments:
        cache.auto_compact()
    summary.seconds = time.perf_counter() - t0
    return summary


KNOWN_BATCH = 4096


def _refuse_missing_extras(cache: FeatureCache, lazy: LazyBackbone, views) -> None:
    """--layers / --heads into a cache whose feature group was extracted without them: refused at once,
    before any model is built (its rows cannot gain the arrays, nor new rows lack them)."""
    from ..errors import CacheMismatchError

    for g in cache.groups(count=False):
        if g.key != lazy.key or g.view not in views:
            continue
        for asked, have, opt in ((lazy.layers, g.layers, "--layers"), (lazy.heads, g.heads, "--heads")):
            if asked and not have:
                raise CacheMismatchError(
                    f"{cache.path}: features {g.key}/{g.view} were extracted without {opt}; extract with "
                    f"{opt} into another --cache (or leave {opt} out to use this one)")


def abs_path(path: str) -> str:
    """os.path.abspath, without the work for paths that are already absolute and normal."""
    p = os.fspath(path)
    odd = "//" in p or "/./" in p or "/../" in p or p.endswith(("/", "/.", "/.."))
    if p.startswith("/") and not odd:
        return p
    return os.path.abspath(p)


def _unchanged(cache: FeatureCache, refs: list[ImageRef], abs_paths: list[str], stats: list, cached: dict, views,
               record_cached: bool):
    """Positions of files the stat index knows unchanged, already cached for every view, with nothing
    new to record: {position: sha256}. These are not read again."""
    if not refs or not cache.exists():
        return {}
    hits = cache.stat_index().lookup(abs_paths, stats)
    if record_cached:
        hits = {i: h for i, h in hits.items() if h[1]}  # only files whose path the cache has recorded
    if not hits:
        return {}
    pos = list(hits)
    shas = [hits[i][0] for i in pos]
    ok = np.ones(len(pos), bool)
    for v in views:
        ok &= cached[v].contains_many(shas)
    if record_cached:
        labs, gens = cache.index_labels(shas)
        for j, i in enumerate(pos):
            r = refs[i]
            if r.label and (r.label != labs[j] or (r.label == "fake" and (r.generator or "") != gens[j])):
                ok[j] = False  # a new label or generator: goes the normal way and is recorded
    return {i: shas[j] for j, i in enumerate(pos) if ok[j]}


def _with_known(refs: list[ImageRef], abs_paths: list[str], known: dict[int, str],
                read: Callable[[list[ImageRef]], Iterator[Prepared]]):
    """Prepared results in input order: files in `known` without reading them, the rest through `read`
    (which yields them in input order)."""
    if not known:
        yield from read(refs)
        return
    rest = iter(read([r for i, r in enumerate(refs) if i not in known]) if len(known) < len(refs) else ())
    for i, r in enumerate(refs):
        sha = known.get(i)
        if sha is None:
            yield next(rest)
        else:
            yield Prepared(r, sha, ImageMeta(sha, r.label or "", r.generator or "", paths=[abs_paths[i]]),
                           unchanged=True)


def _new_metas(cache: FeatureCache, metas: list[ImageMeta], seen: set[str]) -> list[ImageMeta]:
    """Of cached images' observations, those adding a path, label or generator (one index lookup)."""
    if not metas:
        return []
    known = cache.image_metas([m.sha256 for m in metas if m.sha256 not in seen])
    return [m for m in metas if m.sha256 in seen or _new_information(m, known.get(m.sha256))]


def _new_information(meta: ImageMeta, known: ImageMeta | None) -> bool:
    """Whether `meta` adds a path, label or generator the cache does not have yet."""
    if known is None:
        return True
    return (any(p not in known.paths for p in meta.paths) or bool(meta.label and meta.label != known.label)
            or bool(meta.generator and meta.generator != known.generator))
