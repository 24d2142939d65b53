"""The scoring engine behind `clipdet serve`: uploaded bytes → features → the detector's rows.

Two stages, so decoding never blocks the event loop and the model sees whole batches:

- `Engine.prepare(name, data)` (decode threads): hash the bytes; if the cache has features for them,
  stop there; otherwise decode safely, apply the detector's view and preprocess — the same calls
  `clipdet extract` makes (`decode_image`, `apply_view`, the backbone's `preprocess`).
- `Engine.run_batch(items)` (the one model thread): embed the new images in one forward pass, read
  the cached ones, score everything with the detector. Embeddings are rounded to float16 exactly as
  the feature cache stores them, so a served score equals `clipdet score` on the same bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import ClipdetError, ImageError
from ..extract.decode import DEFAULT_MAX_PIXELS, decode_image, sha256_bytes
from ..extract.views import apply_view
from ..score.output import COLUMNS, JSONL_ONLY
from ..score.stability import STABILITY_COLUMNS, apply_judgement
from ..score.tiles import TILE_COLUMNS


@dataclass
class Item:
    """One uploaded file on its way through the engine."""

    name: str
    sha256: str = ""
    tensor: object = None  # preprocessed image, when its features must be computed
    cached: bool = False  # features come from the cache
    error: str = ""
    meta: dict = field(default_factory=dict)  # width/height/format, for --cache-write
    caption: str = ""  # sent with the upload (form field `captions`), for caption features
    stability: list | None = None  # perturbed views asked for (None: no stability check)
    views: dict = field(default_factory=dict)  # view -> preprocessed tensor, for the stability check
    provenance: object = None  # clipdet.provenance.Provenance of the uploaded bytes
    data: bytes = b""  # the bytes of a cached item, kept to embed it again if its cached row is damaged
    tiles: list = field(default_factory=list)  # preprocessed tiles, when the detector scores on tiles


def public_row(row: dict, stability: bool = False, tiles: bool = False) -> dict:
    """A row as JSON-safe dict with every `clipdet score` column, provenance_details, with `stability`
    the stability columns and with `tiles` the tile columns (NaN and absent values → None)."""
    out = {}
    for k in COLUMNS + JSONL_ONLY + (STABILITY_COLUMNS if stability else []) + (TILE_COLUMNS if tiles else []):
        v = row.get(k)
        out[k] = None if isinstance(v, float) and math.isnan(v) else v
    return out


class Engine:
    """Holds the detector, the (lazily loaded) backbone and the optional feature cache.

    `load()` builds the model (call it once, off the event loop). `prepare` is thread-safe;
    `run_batch` must run on a single thread (it owns the model and the cache handle).
    """

    def __init__(self, detector, cache=None, cache_write: bool = False, device: str = "auto",
                 precision: str = "auto", threshold: float | None = None, backbone: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, captions=None):
        from ..cache import FeatureCache
        from ..errors import UsageError
        from ..extract.lazy import LazyBackbone
        from ..text import Captions, TextEmbedder, needs_captions

        kind = detector.layout.get("kind", "embedding")
        if kind not in ("embedding", "layers", "layers_mean", "layers_both"):
            raise UsageError(f"clipdet serve scores from the embedding or block tokens; this detector's head reads "
                             f"{kind} features (fit --head heads): score with clipdet score instead")
        self.kind = kind
        #: block kinds: the blocks the detector reads, and their positions in a cached row (None: as stored)
        self.blocks = tuple(int(b) for b in detector.layout.get("blocks", ())) if kind != "embedding" else ()
        self.hit_order = None
        self.detector = detector
        self.threshold = detector.threshold if threshold is None else float(threshold)
        self.own_threshold = threshold is None  # no --threshold: a tile calibration's own threshold applies
        self.view = detector.view
        from ..detectors.tiles import TileCalibration

        cal = TileCalibration.from_meta(detector.meta)  # a detector fitted with --tiles as its view scores tiles
        self.tiles = cal if cal is not None and cal.default else None
        self.max_pixels = max_pixels
        self.cache = None if cache is None else (cache if isinstance(cache, FeatureCache) else FeatureCache(cache))
        self.cache_write = bool(cache_write and self.cache is not None)
        self.lazy = LazyBackbone(backbone or detector.backbone.get("spec"), device=device,
                                 key=detector.backbone_key, precision=precision, layers=self.blocks)
        self.cached: set[str] = set()
        self.damaged: set[str] = set()  # cached, but the row failed its checks: embedded again (and rewritten)
        self.written = 0
        self.captions = captions if isinstance(captions, Captions) else Captions()
        self.text = None
        if needs_captions(detector.features):  # caption embeddings: read from the cache, written with --cache-write
            tcache = None if self.cache is None else FeatureCache(self.cache.path, readonly=not self.cache_write)
            self.text = TextEmbedder(backbone or detector.backbone.get("spec"), cache=tcache,
                                     key=detector.backbone_key, device=device)

    # ------------------------------------------------------------------ start-up
    def load(self) -> None:
        """Load the model; with a cache, check it matches and remember which images it already holds."""
        key = self.detector.backbone_key
        if self.cache is not None and self.cache.exists():
            group = self.cache.group(key, self.view)
            if self.blocks and group is not None:  # the cached rows must hold the blocks the detector reads
                from ..score.plan import read_plan

                self.hit_order = read_plan(self.cache, self.detector, self.view)[0]
            if self.cache_write and group is not None:  # keep the group's layers and heads, as `extract` does
                self.lazy.layers = tuple(group.layers or ())
                self.lazy.heads = len(group.heads["blocks"]) if group.heads else 0
            cache = self.cache

            def check(model, layers) -> None:
                if self.cache_write or group is None:
                    cache.check_compatible(model.info, self.view, layers, self.lazy.heads_spec)
                else:  # read-only: only the backbone must match, whatever else the group stores
                    cache.check_compatible(model.info, self.view, group.layers, group.heads)

            self.lazy.on_load(check, key=(cache.path, (self.view,)))
            self.cached = self.cache.cached_shas(key, self.view)
        self.lazy.get()

    def describe(self) -> dict:
        """The detector's metadata for `GET /v1/detector`."""
        m = self.detector.meta
        counts = m.get("counts", {})
        refs = self.detector.references.get("sha256") or []
        return {
            "backbone": self.detector.backbone.get("spec"), "backbone_key": self.detector.backbone_key,
            "view": self.view, "head": m.get("head"), "params": m.get("params", {}),
            "threshold": self.threshold, "calibrated_threshold": self.detector.threshold,
            "target_fpr": m.get("target_fpr"), "generators": list(m.get("generators", [])),
            "attribution": self.detector.attribution is not None,
            "references": {"total": len(refs) or int(counts.get("real", 0)) + int(counts.get("fake", 0)),
                           "real": int(counts.get("real", 0)), "fake": int(counts.get("fake", 0))},
            "shots": m.get("shots"), "seed": m.get("seed"), "nearest": hasattr(self.detector.head, "nearest"),
            "clipdet_version": m.get("clipdet_version"), "cache": self.cache.path if self.cache else None,
            "cache_write": self.cache_write, "features": self.detector.features,
            "unsure_band": list(self.detector.unsure_range(self.threshold) or []) or None,
            "unsure": self.detector.describe_unsure(),
            "tiles": None if self.tiles is None else {
                "size": self.tiles.size, "count": self.tiles.count, "rule": self.tiles.rule,
                "threshold": self.tiles.threshold if self.own_threshold else self.threshold},
        }

    def stability_option(self, value: str | None) -> list | None:
        """The perturbed views a request's `stability` field or query option asks for: None (absent, 0, false,
        off), the default set (1, true, on, yes), [] ('none': the unsure band only) or a list of views
        ('jpeg:75,crop:224'). UsageError for a bad view, or a detector on caption features."""
        from ..errors import UsageError
        from ..score.stability import stability_views

        v = (value or "").strip().lower()
        if v in ("", "0", "false", "off", "no"):
            return None
        if self.tiles is not None:
            raise UsageError("stability: not available yet for a detector that scores tiles (fit --tiles)")
        if self.text is not None:
            raise UsageError("stability: not available for detectors on caption features in serve "
                             "(use clipdet score --stability)")
        return stability_views(None if v in ("1", "true", "on", "yes") else v, self.view)

    # ------------------------------------------------------------------ decode threads
    def prepare(self, name: str, data: bytes, caption: str = "", stability: list | None = None) -> Item:
        """Hash, read provenance marks, and unless cached, decode + view + preprocess one upload; with
        `stability` (perturbed views; [] for the unsure band only) also preprocess each of those views from
        the same decode. Problems become `Item.error`."""
        from ..provenance import read_provenance

        item = Item(name, caption=(caption or "").strip(), stability=stability)
        if not data:
            item.error = "empty file (0 bytes)"
            return item
        item.sha256 = sha256_bytes(data)
        item.provenance = read_provenance(data)
        item.cached = item.sha256 in self.cached and item.sha256 not in self.damaged
        if item.cached:
            item.data = data  # kept to embed it again if its cached row turns out damaged
            if not stability and self.tiles is None:
                return item
        self._decode(item, data, stability)
        return item

    def _decode(self, item: Item, data: bytes, stability: list | None = None) -> None:
        """Decode, view and preprocess `data` into `item.tensor` unless cached, and each `stability` view
        into `item.views` (a problem becomes `item.error`)."""
        try:
            dec = decode_image(data, item.name, max_pixels=self.max_pixels)
            item.meta = {"width": dec.width, "height": dec.height, "format": dec.format}
            if not item.cached:
                item.tensor = self.lazy.preprocess(apply_view(dec.image, self.view))
            for v in stability or ():
                item.views[v] = self.lazy.preprocess(apply_view(dec.image, v))
            if self.tiles is not None:
                from ..extract.views import tile_views

                item.tiles = [self.lazy.preprocess(apply_view(dec.image, v))
                              for v in tile_views(self.tiles.size, self.tiles.count)]
        except ImageError as e:
            item.error = e.reason
        except ClipdetError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad upload never fails the others
            item.error = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------ model thread
    def run_batch(self, items: list[Item]) -> list[dict]:
        """Score a batch of prepared items; one row dict (see `public_row`) per item, in order."""
        key = self.detector.backbone_key
        feats: dict[str, np.ndarray] = {}
        hits = list(dict.fromkeys(it.sha256 for it in items if it.cached and not it.error))
        if hits:
            from ..detectors.features import load_kwargs, matrix

            rows = self.cache.load(key, self.view, shas=hits, **load_kwargs([self.kind]))
            if len(rows.sha256):
                feats.update(zip(rows.sha256, matrix(rows, self.kind, order=self.hit_order)))
        for it in items:  # a damaged cached row (or one gone since start-up): embed those bytes again
            if it.cached and not it.error and it.sha256 not in feats:
                it.cached = False
                self._decode(it, it.data)
                self.damaged.add(it.sha256)  # from now on embedded; --cache-write writes a whole row again
            it.data = b""
        new = [it for it in items if not it.error and not it.cached]
        if new:
            model = self.lazy.get()
            kw = {"heads": self.lazy.heads} if self.lazy.heads else {}
            out = model.embed(model.collate([it.tensor for it in new]), layers=self.lazy.absolute_layers, **kw)
            emb16 = out["embedding"].astype(np.float16)  # what the cache stores and `clipdet score` reads
            X = emb16.astype(np.float32) if not self.blocks else self._block_matrix(out)
            for i, it in enumerate(new):
                feats[it.sha256] = X[i]
            if self.cache_write:
                self._write(model, new, emb16, out)
        scorable = [it for it in items if not it.error and it.sha256 in feats]
        X = np.stack([feats[it.sha256] for it in scorable]) if scorable else None
        if scorable and self.text is not None:
            X, scorable = self._caption_features(X, scorable)
        scored = self.detector.score_features(X, threshold=self.threshold) if scorable else []
        by_item = {id(it): r for it, r in zip(scorable, scored)}
        if self.tiles is not None and scorable:
            self._tile_rows(scorable, scored)
        view_scores = self._view_scores([it for it in scorable if it.stability is not None])
        band = self.detector.unsure_range(self.threshold)
        results = []
        for it in items:
            row = {"path": it.name, "sha256": it.sha256 or None, "error": it.error}
            if it.provenance is not None:
                row["provenance"] = it.provenance.short
                row["provenance_details"] = it.provenance.to_dict() if (it.provenance.marks or
                                                                        it.provenance.problems) else None
            if not it.error:
                if id(it) in by_item:
                    row.update(by_item[id(it)])
                    if it.stability is not None:
                        apply_judgement(row, view_scores.get(id(it), {}), self.threshold, band)
                else:
                    row["error"] = "no features (the model gave none)"
            if row["error"]:
                row["label"] = "unknown"
            else:
                row["error"] = None
            results.append(public_row(row, it.stability is not None, self.tiles is not None))
        return results

    def _tile_rows(self, items: list[Item], rows: list[dict]) -> None:
        """Score `items` on their tiles and put the tile rule's image score and verdict in their `rows`
        (the detector's tile threshold and p_fake, or the server's --threshold), as `clipdet score` does."""
        from ..detectors.tiles import mix, tile_decision

        cal, n = self.tiles, self.tiles.count
        S = self._scores([t for it in items for t in it.tiles]).reshape(len(items), n)
        agg = mix(S, cal.weight)
        t, proba = tile_decision(self.detector, cal, None if self.own_threshold else self.threshold)
        p = proba(agg)
        for row, s, pf, tiles in zip(rows, agg, p, S):
            row.update(score=float(s), p_fake=float(pf), label="fake" if s >= t else "real",
                       tile_scores=";".join(f"{x:.6g}" for x in tiles), tile_rule=cal.rule)

    def _scores(self, tensors: list) -> np.ndarray:
        """The detector's scores of preprocessed images in one forward pass (features rounded to float16 as
        the cache stores them, so they equal `clipdet score` on the same views)."""
        model = self.lazy.get()
        out = model.embed(model.collate(tensors), layers=self.lazy.absolute_layers)
        X = out["embedding"].astype(np.float16).astype(np.float32) if not self.blocks else self._block_matrix(out)
        return np.asarray(self.detector.decision_function(X), np.float64)

    def _view_scores(self, items: list[Item]) -> dict[int, dict[str, float]]:
        """{id(item): {view: score}} for the perturbed views of `items`, in one forward pass (as `_scores`,
        so they equal `clipdet score --stability`)."""
        todo = [(it, v, t) for it in items for v, t in it.views.items()]
        if not todo:
            return {}
        scores = self._scores([t for _, _, t in todo])
        out: dict[int, dict[str, float]] = {}
        for (it, v, _), s in zip(todo, scores):
            out.setdefault(id(it), {})[v] = float(s)
        return out

    def _block_matrix(self, out: dict) -> np.ndarray:
        """The detector's block features from a model output (rounded to float16 as the cache stores them)."""
        from types import SimpleNamespace

        from ..detectors.features import matrix

        have = list(self.lazy.absolute_layers)
        order = np.array([have.index(b) for b in self.blocks], dtype=np.int64)
        rows = SimpleNamespace(**{k: None if out.get(k) is None else out[k].astype(np.float16)
                                  for k in ("embedding", "layers", "layers_mean")})
        return matrix(rows, self.kind, order=order)

    def _caption_features(self, X: np.ndarray, items: list[Item]) -> tuple[np.ndarray, list[Item]]:
        """The detector's caption features for `items`; those without a caption get MISSING_CAPTION."""
        from ..text import MISSING_CAPTION, apply_features

        caps = {}
        for it in items:
            c = it.caption or self.captions.get(it.sha256)
            if c:
                caps.setdefault(it.sha256, c)
        out, ok = apply_features(X, [it.sha256 for it in items], self.detector.features, caps, self.text)
        for it, good in zip(items, ok):
            if not good:
                it.error = MISSING_CAPTION.replace("give --captions FILE.csv or a manifest caption column",
                                                   "send a 'captions' form field per file or start with --captions")
        return out[ok], [it for it, good in zip(items, ok) if good]

    def _write(self, model, items: list[Item], emb16: np.ndarray, out: dict) -> None:
        """--cache-write: add the new features (and upload names) to the cache as one shard."""
        from ..backbones.base import feature_attrs
        from ..cache import FeatureRows, ImageMeta

        fresh = [i for i, it in enumerate(items) if it.sha256 not in self.cached or it.sha256 in self.damaged]
        if not fresh:
            return
        seen, keep = set(), []
        for i in fresh:  # the same bytes twice in one batch: one row
            if items[i].sha256 not in seen:
                seen.add(items[i].sha256)
                keep.append(i)
        extra = {k: out[k][keep] for k in ("layers", "layers_mean", "heads", "heads_rest") if out.get(k) is not None}
        rows = FeatureRows([items[i].sha256 for i in keep], emb16[keep], **extra)
        metas = [ImageMeta(items[i].sha256, "", "", paths=[f"upload:{items[i].name}"], **items[i].meta)
                 for i in keep]
        attrs = feature_attrs(model, self.lazy.absolute_layers, int(emb16.shape[1]), self.lazy.heads_spec)
        self.cache.write_shard({(model.info.key, self.view): (rows, attrs)}, images=metas)
        self.cached.update(items[i].sha256 for i in keep)
        self.damaged.difference_update(items[i].sha256 for i in keep)
        self.written += len(keep)

    def close(self) -> None:
        """Merge the shards --cache-write added into the main cache file."""
        if self.cache is not None and self.written and self.cache.shard_count():
            self.cache.compact()


def default_decode_workers() -> int:
    """Decode threads when none are given: a few, leaving cores to the model."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


__all__ = ["Engine", "Item", "public_row", "default_decode_workers"]
