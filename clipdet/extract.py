"""One-pass extraction: reader (hash, skip cached, decode, views, preprocess) → embedder → cache writer.

The stages are separate functions so each can be tested and tuned alone:

- `prepare(ref, ...)` reads one file, hashes it, and — only if some requested view is not cached —
  decodes it once and preprocesses every missing view. Runs in loader threads.
- `Backbone.embed(batch)` runs the model on a batch of preprocessed tensors (main thread).
- `FeatureCache.write_shard(...)` makes each finished batch durable (one atomic shard per batch).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._version import __version__
from .cache import FeatureCache, FeatureRows, ImageMeta
from .cache.statindex import stat_all
from .errors import BackboneError, ClipdetError, ImageError, UsageError
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageRef,
    apply_view,
    decode_image,
    parse_views,
    read_file,
    sha256_bytes,
)


@dataclass
class Prepared:
    """Output of the reader stage for one input file."""

    ref: ImageRef
    sha256: str = ""
    meta: ImageMeta | None = None
    tensors: dict = field(default_factory=dict)  # view -> preprocessed tensor (missing views only)
    error: str = ""
    unchanged: bool = False  # known from the stat index: not read, nothing new to record


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
) -> Prepared:
    """Reader stage for one file: read, hash, skip if cached, else decode once and make every missing view.

    Per-file problems become `Prepared.error`; a `ClipdetError` that is not about the file (say the
    model cannot be loaded) propagates and stops the run. The two halves, `read_hashed` and
    `decode_views`, are also run apart (the Ray engine runs them as separate stages).
    """
    out, data, missing = read_hashed(ref, views, cached)
    return decode_views(out, data, missing, preprocess, max_pixels, draft_size)


def read_hashed(ref: ImageRef, views: Sequence[str], cached: dict[str, set[str]]) -> tuple[Prepared, bytes, list[str]]:
    """First half of `prepare`: read and hash one file; returns (Prepared, its bytes, views not cached).

    The bytes are returned only when some view is missing (else b"")."""
    out = Prepared(ref)
    if ref.error:  # discovery already knows this input cannot be used (e.g. a folder it could not list)
        out.error = ref.error
        return out, b"", []
    try:
        data = read_file(ref.path)
        out.sha256 = sha256_bytes(data)
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


class LazyBackbone:
    """A backbone loaded on first use (from any thread), so an all-cached run never loads a model.

    `key` is the backbone's cache key; given explicitly (e.g. from a detector file) it lets a run
    that needs no model skip even describing the spec, and a loaded model must then match it.
    Checks registered with `on_load` run once, when the model is loaded (or at once if it is).
    """

    def __init__(self, spec: str, device: str = "auto", layers: Sequence[int] = (), key: str | None = None,
                 loaded=None, precision: str = "auto", heads: int = 0):
        self.spec, self.device, self.layers, self.precision = spec, device, tuple(layers), precision
        self.heads = int(heads or 0)  # --heads N: decompose the last N blocks' attention heads
        self.heads_spec: dict | None = None  # {"blocks", "n_heads"} once the model is loaded
        # asked for by the caller (not copied from a cache group): checked against the cache even when
        # nothing is new
        self.explicit = bool(self.layers) or bool(self.heads)
        self._key = key if key is not None else (loaded.info.key if loaded is not None else None)
        self._model = None
        self._lock = threading.RLock()
        self._checks: list[Callable] = []
        self._check_keys: set = set()
        self._failed: ClipdetError | None = None
        self.absolute_layers: tuple[int, ...] = ()
        if loaded is not None:
            self._install(loaded)

    @property
    def key(self) -> str:
        """Cache key of the backbone (describes the spec if needed; hashes a local weights file once)."""
        if self._key is None:
            from .backbones import describe_backbone

            self._key = describe_backbone(self.spec).key
        return self._key

    @property
    def loaded(self) -> bool:
        """Whether the model has been built."""
        return self._model is not None

    def _install(self, model) -> None:
        if self._key is not None and model.info.key != self._key:
            raise UsageError(
                f"backbone {self.spec} has key {model.info.key}, but {self._key} is required "
                "(different weights from the ones the features/detector were made with)"
            )
        self._key = model.info.key
        self.absolute_layers = model.resolve_layers(self.layers) if hasattr(model, "resolve_layers") else self.layers
        if self.heads:
            if not hasattr(model, "resolve_heads"):
                raise UsageError(f"--heads: backbone {self.spec} cannot decompose its embedding into attention heads")
            self.heads_spec = model.resolve_heads(self.heads)
        self._model = model
        for check in self._checks:
            check(model, self.absolute_layers)

    def adopt(self, model) -> None:
        """Take `model` as the loaded backbone unless one is loaded: e.g. the description of the model a
        Ray actor loaded (`.info`, `.resolve_layers`). The key must match; `on_load` checks run as for a load."""
        with self._lock:
            if self._model is None:
                self._install(model)
            elif model.info.key != self.key:
                raise UsageError(f"backbone {self.spec}: workers loaded {model.info.key}, expected {self.key}")

    def on_load(self, check: Callable, key=None) -> None:
        """Run `check(model, absolute_layers)` when the model is loaded (now, if it already is).

        A check registered again under the same `key` (e.g. each chunk of a scoring run against the
        same cache and views) is not added or run twice.
        """
        with self._lock:
            if key is not None:
                if key in self._check_keys:
                    return
                self._check_keys.add(key)
            self._checks.append(check)
            if self._model is not None:
                check(self._model, self.absolute_layers)

    def get(self):
        """The loaded backbone (built on first call).

        A failed load (or failed check) is remembered and re-raised: the loader threads waiting on it
        must not each retry it (N model builds, N network probes), nor report it as a per-file error.
        """
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._model is None:
                from .backbones import create_backbone

                try:
                    self._install(create_backbone(self.spec, device=self.device, precision=self.precision))
                except ClipdetError as e:
                    self._model, self._failed = None, e
                    raise
                except Exception as e:  # noqa: BLE001 - a model bug is a backbone error, not a bad image
                    self._model = None
                    self._failed = BackboneError(f"{self.spec}: cannot load the backbone ({type(e).__name__}: {e})")
                    raise self._failed from None
            return self._model

    def preprocess(self, image):
        """Preprocess with the backbone's transform (loading it if needed)."""
        return self.get().preprocess(image)

    def image_size(self) -> int:
        """The backbone's input size in pixels."""
        return int(self.get().image_size)


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


def likely_cuda(device: str) -> bool:
    """Whether `device` is (or 'auto' will probably resolve to) CUDA, without importing torch."""
    if device == "auto":
        return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""
    return device.startswith("cuda")


def default_batch_size(device: str) -> int:
    """Batch size for `device` when the user gives none (GPU: large batches keep the GPU busy)."""
    return 256 if likely_cuda(device) else 32


def default_workers(device: str) -> int:
    """Loader threads for `device` when the user gives none.

    On a GPU machine decoding is the bottleneck: use most cores. On CPU the model itself needs the
    cores; one loader thread overlaps decoding with inference (benchmarks/extract_speed.py).
    """
    n = os.cpu_count() or 1
    if likely_cuda(device):
        return max(2, min(n - 1, 16))
    return 1 if n <= 4 else min(n // 4, 4)


class _Progress:
    """A progress bar on a terminal (tqdm), silent otherwise or with quiet=True."""

    def __init__(self, total: int, quiet: bool, desc: str):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def extract(
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
    engine: str = "local",
    ray_address: str | None = None,
    stages=None,
) -> ExtractSummary:
    """Embed `refs` with `backbone` into the feature cache; returns an `ExtractSummary`.

    Files whose content is already cached (for every requested view) are hashed but not decoded, and
    the model is not loaded when nothing is new. Bad files are recorded (summary and the cache's error
    record) and skipped. Each batch is written as its own shard, so a crash loses at most the batch
    in flight; the run ends by compacting the shards into the main file (unless `compact=False`).
    Pass a `LazyBackbone` as `lazy` to share one loaded model across calls (`backbone` is then ignored).
    `record_cached=False` skips recording paths and labels of already-cached files (scoring uses it,
    so re-scoring a cached folder writes nothing); otherwise only new paths or labels are recorded.
    Without `layers`, the layer set the cache already stores for this backbone is kept, so adding
    images (from extract, fit PATH or score) never changes a group's layout.
    Files unchanged since an earlier run (the cache's stat index) are not read at all; `rehash=True`
    hashes every file regardless. `heads` N also stores the attention-head decomposition of the last N
    blocks (`Backbone.embed(heads=N)`); like `layers`, without it a group's stored head set is kept.
    `engine="ray"` runs the reader and embedder stages on a Ray cluster (`ray_address`, else
    $RAY_ADDRESS, else a local Ray started for the run; see clipdet.engine.ray_driver); the results and the
    cache writes are the same. `stages` (internal) replaces the local reader/embedder with another
    engine's: an object with `prepared(refs, **context)` and `writer(cache, lazy, views, batch_size)`.
    """
    if engine != "local":
        from .engine import run_extract

        return run_extract(engine, refs, backbone, cache=cache, views=views, batch_size=batch_size, device=device,
                           layers=layers, quiet=quiet, max_pixels=max_pixels, draft=draft, precision=precision,
                           record_cached=record_cached, compact=compact, lazy=lazy, rehash=rehash,
                           ray_address=ray_address, heads=heads)
    t0 = time.perf_counter()
    refs = list(refs)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    views = parse_views(views)
    explicit_layers = bool(layers) or bool(heads) or (lazy is not None and lazy.explicit)
    lazy = lazy if lazy is not None else LazyBackbone(backbone, device, layers or (), precision=precision,
                                                      heads=heads or 0)
    summary = ExtractSummary(total=len(refs), backbone_key=lazy.key, views=list(views))
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
                       draft_size=lazy.image_size if draft else None)

    def read(rs: list[ImageRef]) -> Iterator[Prepared]:
        if stages is not None:
            return stages.prepared(rs, lazy=lazy, views=views, cached=cached, max_pixels=max_pixels, draft=draft,
                                   batch_size=batch_size)
        return iter_prepared(rs, workers, fn, prefetch)

    abs_paths = [_abs(r.path) for r in refs]
    stat_ns = time.time_ns()  # before the stats: a file changed after this is never trusted unread
    stats = stat_all(abs_paths)
    known_files = {} if rehash else _unchanged(cache, refs, abs_paths, stats, cached, views, record_cached)

    progress = _Progress(len(refs), quiet, "extract")
    writer = (stages.writer if stages is not None else _BatchWriter)(cache, lazy, views, batch_size)
    seen: set[str] = set()
    already: list[ImageMeta] = []  # cached images whose metadata may be new: checked in batches
    try:
        for p in _with_known(refs, abs_paths, known_files, read):
            progress.update()
            summary.records.append((p.ref.path, p.sha256, p.error))
            if p.error:
                summary.errors.append((p.ref.path, p.error))
                writer.errors.append({"sha256": p.sha256, "path": os.path.abspath(p.ref.path), "reason": p.error})
                continue
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


def _abs(path: str) -> str:
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


def feature_attrs(model, layers: Sequence[int], dim: int, heads: dict | None = None) -> dict:
    """The attributes a feature group is written with (backbone record, layer set, dim, version, and
    with --heads the head set {"blocks": [absolute block indices], "n_heads": H})."""
    return {"backbone": json.loads(model.info.to_json()), "layers": list(layers), "dim": int(dim),
            "clipdet_version": __version__, "heads": heads}


class _BatchWriter:
    """Collects preprocessed tensors per view, embeds full batches and writes each as one shard."""

    def __init__(self, cache: FeatureCache, lazy: LazyBackbone, views: Sequence[str], batch_size: int | None):
        self.cache, self.lazy, self.views = cache, lazy, list(views)
        self.batch_size = batch_size
        self.pending: dict[str, list[tuple[str, object]]] = {v: [] for v in views}
        self.metas: list[ImageMeta] = []
        self.errors: list[dict] = []
        self.embedded = 0
        self.segments = 0

    def add(self, sha: str, tensors: dict) -> None:
        """Queue one image's tensors; embeds and writes every view whose batch is full."""
        if self.batch_size is None:
            self.batch_size = default_batch_size(getattr(self.lazy.get(), "device", "cpu"))
        for v, t in tensors.items():
            self.pending[v].append((sha, t))
        for v in self.views:
            if len(self.pending[v]) >= self.batch_size:
                self._flush(v)

    def _embed(self, model, tensors: list) -> dict:
        """The model's outputs for a batch of preprocessed tensors: embedding, and layers / heads /
        heads_rest when the run stores them."""
        kw = {"heads": self.lazy.heads} if self.lazy.heads else {}
        return model.embed(model.collate(tensors), layers=self.lazy.absolute_layers, **kw)

    def _model(self):
        """The model whose identity the written features get (the one that embeds them)."""
        return self.lazy.get()

    def _flush(self, view: str) -> None:
        items, self.pending[view] = self.pending[view], []
        model = self._model()
        out = self._embed(model, [t for _, t in items])
        emb = out["embedding"]
        attrs = feature_attrs(model, self.lazy.absolute_layers, int(emb.shape[1]), self.lazy.heads_spec)
        rows = FeatureRows([s for s, _ in items], emb.astype(np.float16), out.get("layers"),
                           heads=out.get("heads"), heads_rest=out.get("heads_rest"))
        self.cache.write_shard({(model.info.key, view): (rows, attrs)}, images=self.metas, errors=self.errors)
        self.metas, self.errors = [], []
        self.embedded += len(items)
        self.segments += 1

    def close(self) -> None:
        """Flush partial batches and any remaining metadata/errors."""
        for v in self.views:
            if self.pending[v]:
                self._flush(v)
        if self.metas or self.errors:
            self.cache.write_shard(images=self.metas, errors=self.errors)
            self.metas, self.errors = [], []
            self.segments += 1
