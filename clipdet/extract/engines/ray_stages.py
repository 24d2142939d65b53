"""The extraction pipeline as Ray Data stages, and the driver side that feeds clipdet.extract.

    paths → read + SHA-256 (CPU tasks) → decode + views + preprocess (CPU tasks, only what the cache
    lacks) → embed (actor pool: one actor per GPU, else CPU actors; the model loaded once per actor)
    → rows streamed, in input order, to the driver, which writes segments through the normal cache code.

Each stage calls the same functions as the local engine (`read_hashed`, `decode_views`, the backbone's
preprocessor and `embed`), so features, precision rules and per-file error records are the same.
Rows carry plain columns (int, str, bytes): images as the preprocessed array's bytes plus its shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from ...cache import ImageMeta
from ..discover import ImageRef
from ..lazy import LazyBackbone
from ..pipeline import Prepared, decode_views, read_hashed
from ..writer import BatchWriter

#: the model outputs an embedding actor sends back per image and view (those the run asked for)
OUTPUTS = ("embedding", "layers", "layers_mean", "heads", "heads_rest")


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _pack(arr) -> tuple[bytes, str]:
    """An array (numpy, or a torch tensor from a fallback transform) as (bytes, 'dtype:d0,d1,...')."""
    a = np.ascontiguousarray(arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr))
    return a.tobytes(), f"{a.dtype.str}:{','.join(str(d) for d in a.shape)}"


def _unpack(data: bytes, spec: str) -> np.ndarray:
    dtype, _, shape = _s(spec).partition(":")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tuple(int(d) for d in shape.split(",") if d))


def read_batch(batch: dict, views: Sequence[str], cached: dict) -> dict:
    """Stage 1 (CPU task): read and hash each file; keep its bytes only when some view is not cached."""
    n = len(batch["i"])
    sha, err, missing, data = [""] * n, [""] * n, [""] * n, [b""] * n
    for j in range(n):
        ref = ImageRef(_s(batch["path"][j]), error=_s(batch["ref_error"][j]) or None)
        p, raw, miss = read_hashed(ref, views, cached)
        sha[j], err[j], missing[j], data[j] = p.sha256, p.error, ",".join(miss), raw
    return {"i": batch["i"], "path": batch["path"], "sha256": np.array(sha, object), "error": np.array(err, object),
            "missing": np.array(missing, object), "data": np.array(data, object)}


def decode_batch(batch: dict, views: Sequence[str], preprocessor, max_pixels: int, draft_size: int | None) -> dict:
    """Stage 2 (CPU task): decode each file that needs it once, make and preprocess every missing view."""
    n = len(batch["i"])
    err = [_s(e) for e in batch["error"]]
    width, height, fmt = np.zeros(n, np.int64), np.zeros(n, np.int64), [""] * n
    px = {v: [b""] * n for v in views}
    spec = {v: [""] * n for v in views}
    for j in range(n):
        miss = [v for v in _s(batch["missing"][j]).split(",") if v]
        if err[j] or not miss:
            continue
        p = Prepared(ImageRef(_s(batch["path"][j])), _s(batch["sha256"][j]), meta=ImageMeta(_s(batch["sha256"][j])))
        decode_views(p, batch["data"][j], miss, preprocessor, max_pixels, draft_size)
        if p.error:
            err[j] = p.error
            continue
        width[j], height[j], fmt[j] = p.meta.width, p.meta.height, p.meta.format
        for v, t in p.tensors.items():
            px[v][j], spec[v][j] = _pack(t)
    out = {"i": batch["i"], "path": batch["path"], "sha256": batch["sha256"], "error": np.array(err, object),
           "width": width, "height": height, "format": np.array(fmt, object)}
    for k, v in enumerate(views):
        out[f"px{k}"], out[f"spec{k}"] = np.array(px[v], object), np.array(spec[v], object)
    return out


class Embedder:
    """Stage 3 (actor): the backbone loaded once per actor (in the background from the start); embeds
    every view present."""

    def __init__(self, spec: str, device: str, layers: Sequence[int], key: str, precision: str, views: Sequence[str],
                 threads: dict | None = None, heads: int = 0):
        import threading

        self.lazy = LazyBackbone(spec, device, tuple(layers), key=key, precision=precision, heads=heads)
        self.views = list(views)
        self.threads = threads or {}
        # the model loads while the first images are read and decoded; a failure is kept by LazyBackbone and
        # raised by the first batch that needs the model (an all-cached run never does)
        self._loading = threading.Thread(target=self._load, name="clipdet-model", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        if self.threads:
            import ray

            n = self.threads.get(ray.get_runtime_context().get_node_id())
            if n:  # a CPU actor uses its node's cores, as the local engine's model does
                os.environ["CLIPDET_THREADS"] = str(int(n))  # an ONNX backbone's session reads it at load
                try:
                    import torch
                except ImportError:  # a torch-free install (clipdet[onnx])
                    torch = None
                if torch is not None:
                    torch.set_num_threads(int(n))
        try:
            self.lazy.get()
        except Exception:  # noqa: BLE001 - remembered by LazyBackbone, raised again by _model()
            pass

    def _model(self):
        self._loading.join()
        return self.lazy.get()

    def __call__(self, batch: dict) -> dict:
        from ...errors import ClipdetError

        n = len(batch["i"])
        try:
            return self._embed(batch, n)
        except ClipdetError as e:  # the model or its options (precision, --layers, --heads): the run's error,
            # handed to the driver as a column (Ray would lose the exception's type and text on the way)
            out = {c: batch[c] for c in ("i", "sha256", "error", "width", "height", "format")}
            out["fatal"] = np.array([f"{type(e).__name__}\t{e}"] * n, object)
            return out

    def _embed(self, batch: dict, n: int) -> dict:
        out = {c: batch[c] for c in ("i", "sha256", "error", "width", "height", "format")}
        out["fatal"] = np.array([""] * n, object)
        info, layers, heads = "", "", ""
        for k, _v in enumerate(self.views):
            cols = {c: [b""] * n for c in OUTPUTS}
            specs = {c: [""] * n for c in OUTPUTS}
            rows = [j for j in range(n) if len(batch[f"px{k}"][j])]
            if rows:
                model = self._model()
                items = [_unpack(batch[f"px{k}"][j], batch[f"spec{k}"][j]) for j in rows]
                if items[0].dtype != np.uint8:  # open_clip's own float transform: torch tensors, as locally
                    import torch

                    items = [torch.from_numpy(a.copy()) for a in items]
                kw = {"heads": self.lazy.heads} if self.lazy.heads else {}
                res = model.embed(model.collate(items), layers=self.lazy.absolute_layers, **kw)
                for c in OUTPUTS:
                    if res.get(c) is not None:
                        for r, j in enumerate(rows):
                            cols[c][j], specs[c][j] = _pack(np.asarray(res[c][r], np.float32))
                info = model.info.to_json()
                layers = ",".join(str(x) for x in self.lazy.absolute_layers)
                heads = json.dumps(self.lazy.heads_spec) if self.lazy.heads_spec else ""
            for c in OUTPUTS:
                out[f"{c}{k}"], out[f"{c}{k}_spec"] = np.array(cols[c], object), np.array(specs[c], object)
        out["info"] = np.array([info if info else ""] * n, object)
        out["abs_layers"] = np.array([layers] * n, object)
        out["heads_spec"] = np.array([heads] * n, object)
        return out


def _error(fatal: str):
    """The clipdet error an embedding actor reported as "ClassName<TAB>message"."""
    from ... import errors

    name, _, msg = fatal.partition("\t")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ClipdetError)) or cls is errors.ImageError:
        cls = errors.ClipdetError
    return cls(msg)


class RemoteModel:
    """What the driver knows of the model the actors loaded: its identity, resolved layers and head set."""

    def __init__(self, info, absolute_layers: tuple[int, ...], heads_spec: dict | None = None):
        self.info, self.absolute_layers, self.device = info, absolute_layers, "remote"
        self.heads_spec = heads_spec

    def resolve_layers(self, layers) -> tuple[int, ...]:
        """The actors' resolution of the requested layers."""
        return self.absolute_layers

    def resolve_heads(self, n: int) -> dict | None:
        """The actors' resolution of --heads N ({"blocks", "n_heads"})."""
        return self.heads_spec


class EmbeddedWriter(BatchWriter):
    """The cache writer of the local engine, fed rows the actors already embedded ({output: array})."""

    stages: RayStages

    def _model(self):
        return self.stages.model

    def _embed(self, model, tensors: list) -> dict:
        return {c: np.stack([t[c] for t in tensors]) for c in tensors[0]}


class _Unavailable:
    """Stands in for a preprocessor whose backbone could not be loaded: fails only when an image needs it
    (an all-cached run goes through, as with the local engine, which never loads the model then)."""

    def __init__(self, error):
        self.error = error

    def __call__(self, image):
        raise self.error


def preprocessing(spec: str, key: str | None):
    """A Future of (the backbone's picklable preprocessor, its input size), loaded on a CPU in a thread
    (the model is built once on the driver for this; the actors build their own)."""
    from concurrent.futures import Future

    from ...errors import ClipdetError

    fut: Future = Future()

    def run():
        try:
            model = LazyBackbone(spec, "cpu", key=key, precision="fp32").get()
            fut.set_result((model.preprocessor(), int(model.image_size)))
        except ClipdetError as e:
            fut.set_result((_Unavailable(e), None))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)

    import threading

    threading.Thread(target=run, name="clipdet-preprocessor", daemon=True).start()
    return fut


class RayStages:
    """Ray Data in place of clipdet.extract's local reader and embedder (see `extract(stages=...)`)."""

    def __init__(self, spec: str, device: str, precision: str, actors: int, gpus: bool, threads: dict,
                 decode_cpus: float, embed_cpus: float):
        self.spec, self.device, self.precision = spec, device, precision
        self.actors, self.gpus, self.threads = actors, gpus, threads
        self.decode_cpus, self.embed_cpus = decode_cpus, embed_cpus
        self.model: RemoteModel | None = None
        self.preprocessing = None  # a Future of (preprocessor, image size), started early by the driver

    def writer(self, cache, lazy, views, batch_size):
        """The driver's cache writer (`clipdet.extract.BatchWriter` without the model call)."""
        w = EmbeddedWriter(cache, lazy, views, batch_size)
        w.stages = self
        return w

    def dataset(self, refs: list[ImageRef], lazy: LazyBackbone, views, cached, max_pixels, draft, batch_size):
        """The Ray Data pipeline over `refs` (absolute paths; every node must be able to read them)."""
        import ray

        preprocessor, size = (self.preprocessing or preprocessing(lazy.spec, lazy.key)).result()
        draft_size = size if draft else None
        items = [{"i": i, "path": os.path.abspath(r.path), "ref_error": r.error or ""} for i, r in enumerate(refs)]
        per = max(1, min(batch_size, 64))
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per)))
        ds = ds.map_batches(read_batch, batch_size=per, batch_format="numpy", num_cpus=self.decode_cpus,
                            fn_kwargs={"views": list(views), "cached": cached})
        ds = ds.map_batches(decode_batch, batch_size=per, batch_format="numpy", num_cpus=self.decode_cpus,
                            fn_kwargs={"views": list(views), "preprocessor": preprocessor,
                                       "max_pixels": max_pixels, "draft_size": draft_size})
        # Ray Data spreads actors over the nodes by default (DataContext.scheduling_strategy "SPREAD")
        remote = {"num_gpus": 1} if self.gpus else {"num_cpus": self.embed_cpus}
        ds = ds.map_batches(Embedder, batch_size=batch_size, batch_format="numpy",
                            # batches queue at each actor while its model loads: reading runs ahead
                            compute=ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=4),
                            fn_constructor_kwargs={"spec": lazy.spec, "device": self.device, "layers": lazy.layers,
                                                   "heads": lazy.heads, "key": lazy.key, "precision": self.precision,
                                                   "views": list(views),
                                                   "threads": None if self.gpus else self.threads},
                            **remote)
        return ds

    def prepared(self, refs: list[ImageRef], *, lazy, views, cached, max_pixels, draft, batch_size,
                 **_) -> Iterator[Prepared]:
        """`Prepared` results in input order, tensors replaced by the model's outputs per new view."""
        if not refs:
            return
        ds = self.dataset(refs, lazy, views, cached, max_pixels, draft, batch_size)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for j in range(len(batch["i"])):
                yield self._row(batch, j, refs, lazy, views)

    def _row(self, batch: dict, j: int, refs: list[ImageRef], lazy: LazyBackbone, views) -> Prepared:
        from ..pipeline import abs_path

        fatal = _s(batch["fatal"][j]) if "fatal" in batch else ""
        if fatal:
            raise _error(fatal)
        ref = refs[int(batch["i"][j])]
        p = Prepared(ref, _s(batch["sha256"][j]), error=_s(batch["error"][j]))
        if p.error:
            where = abs_path(ref.path)
            p.error = p.error.replace(where, ref.path) if where != ref.path else p.error
            return p
        p.meta = ImageMeta(p.sha256, ref.label or "", ref.generator or "", paths=[os.path.abspath(ref.path)])
        if int(batch["width"][j]):
            p.meta.width, p.meta.height = int(batch["width"][j]), int(batch["height"][j])
            p.meta.format = _s(batch["format"][j])
        info = _s(batch["info"][j])
        if info and self.model is None:
            from ...backbones.base import BackboneInfo

            absl = tuple(int(x) for x in _s(batch["abs_layers"][j]).split(",") if x)
            hs = _s(batch["heads_spec"][j])
            self.model = RemoteModel(BackboneInfo(**json.loads(info)), absl, json.loads(hs) if hs else None)
            lazy.adopt(self.model)  # key check and the cache's compatibility checks, as a local load runs them
        for k, v in enumerate(views):
            if len(batch[f"embedding{k}"][j]):
                p.tensors[v] = {c: _unpack(batch[f"{c}{k}"][j], batch[f"{c}{k}_spec"][j])
                                for c in OUTPUTS if len(batch[f"{c}{k}"][j])}
        return p
