"""Streaming scoring: inputs in chunks → (extract what the cache lacks) → detector → rows, in input order.

Memory stays flat: only one chunk of paths, features and rows is held at a time, and rows are
written (and flushed) as each chunk finishes, so an interrupted run keeps what it wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import IO, Callable, Iterable, Iterator, Sequence

from .errors import UsageError
from .images import ImageRef

COLUMNS = ["path", "sha256", "score", "p_fake", "label", "generator", "generator_p",
           "nearest_path", "nearest_label", "nearest_similarity", "error"]
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
    """
    from .cache import FeatureCache
    from .extract import LazyBackbone, extract

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

    from . import features

    kind = detector.layout.get("kind", "embedding")
    order, new_layout = features.read_plan(cache, detector, view)  # before any extraction: a mismatch is one line
    lazy = LazyBackbone(backbone or detector.backbone.get("spec"), device=device, key=detector.backbone_key,
                        precision=precision, **new_layout)
    load_kw = features.load_kwargs([kind])
    from .text.features import CaptionFeatures

    text = CaptionFeatures(detector, cache, captions, backbone, device)
    if engine != "local":
        refs = list(refs)
        extract(refs, "", cache=cache, views=[view], batch_size=batch_size, device=device, quiet=quiet,
                compact=False, lazy=lazy, record_cached=False, engine=engine, ray_address=ray_address)
    for part in growing_chunks(refs, first_chunk, chunk):
        summary = extract(part, "", cache=cache, views=[view], batch_size=batch_size, workers=workers,
                          device=device, quiet=quiet, compact=False, lazy=lazy,
                          record_cached=False)
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
        if text.active:
            X, ok = text.features(feats, part, summary.records)
        else:
            X = features.matrix(feats, kind, order=order) if len(feats.sha256) else np.zeros((0, 0), np.float32)
            ok = np.ones(len(X), bool)
        scored = _score_ok(detector, X, ok, threshold)
        for path, sha, error in summary.records:
            row = {"path": path, "sha256": sha, "error": error}
            if not error:
                i = pos.get(sha)
                if i is not None and scored[i] is None:
                    from .text import MISSING_CAPTION

                    row["error"] = MISSING_CAPTION
                elif i is None:
                    row["error"] = ("cached features damaged and the file could not be embedded again"
                                    if sha in cache.damaged else "no features after extraction")
                else:
                    row.update(scored[i])
            if row["error"]:
                row["label"] = "unknown"
            yield row
        if on_chunk is not None:
            on_chunk()
        if cache.readonly:
            cache.drop_memory_segments()
    cache.auto_compact()


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
    from .backbones import describe_backbone

    info = describe_backbone(backbone)
    if info.key != detector.backbone_key:
        want = detector.backbone
        raise UsageError(
            f"--backbone {backbone}: different weights from the detector's ({want.get('spec')}, weights id "
            f"{str(want.get('weights_id', '?'))[:16]}; this one {info.weights_id[:16]}); give the same weights file"
        )


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


class RowWriter:
    """Writes rows as CSV (default, also for '-') or JSONL (by .jsonl suffix), flushing each chunk.

    The output file is opened at the first row (or by `finish` for zero rows): a run that fails
    before scoring anything — weights unavailable, Ctrl-C while the model loads — leaves an existing
    file from an earlier run untouched.
    """

    def __init__(self, out: str | None, columns: Sequence[str] = COLUMNS):
        self.columns = list(columns)
        self.path = out
        self.jsonl = bool(out) and out.lower().endswith((".jsonl", ".ndjson"))
        self._own = False
        self.fh: IO[str] | None = None
        self._csv = None
        if out and out != "-" and os.path.isdir(out):
            raise UsageError(f"--out {out}: is a folder; give a file name ending in .csv or .jsonl")

    def _open(self) -> None:
        if self.fh is not None or not self.path:
            return
        if self.path == "-":
            self.fh = sys.stdout
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._own = True
        if not self.jsonl:
            self._csv = csv.writer(self.fh)
            self._csv.writerow(self.columns)

    def write(self, row: dict) -> None:
        """Write one row."""
        if not self.path:
            return
        self._open()
        if self.jsonl:
            # every column, null when empty: the same keys as the CSV header, whatever the head
            clean = {k: (None if (isinstance(row.get(k), float) and math.isnan(row[k])) or row.get(k) == ""
                         else row.get(k)) for k in self.columns}
            self.fh.write(json.dumps(clean) + "\n")
        else:
            self._csv.writerow([_fmt(row.get(c)) for c in self.columns])

    def flush(self) -> None:
        """Flush to the OS (rows survive an interrupted run)."""
        if self.fh is not None:
            self.fh.flush()

    def finish(self) -> None:
        """The run completed: make sure the output exists (a header-only CSV for zero rows)."""
        self._open()

    def close(self) -> None:
        """Flush and close the file (not stdout)."""
        if self.fh is not None:
            self.fh.flush()
            if self._own:
                self.fh.close()
        self.fh = None


def verdict(row: dict, threshold: float) -> str:
    """A readable one-image verdict."""
    if row.get("error"):
        return f"{row['path']}: could not score ({row['error']})"
    lab = row["label"].upper()
    cmp = ">=" if row["label"] == "fake" else "<"
    text = (f"{row['path']}: {lab} (p_fake {row['p_fake']:.3f}; score {row['score']:.4g} {cmp} "
            f"threshold {threshold:.4g})")
    if row.get("generator"):
        gp = row.get("generator_p")
        text += f"; generator {row['generator']}" + (f" (p {gp:.2f})" if gp is not None and not math.isnan(gp) else "")
    if row.get("nearest_path"):
        text += (f"; nearest reference {row['nearest_path']} ({row['nearest_label']}, "
                 f"similarity {row['nearest_similarity']:.3f})")
    return text


def summarise(rows_label_counts: dict, errors: int, total: int, uncaptioned: int = 0) -> str:
    """'N images: fake A, real B, unknown C; E could not be read[; U without a caption]' (`errors` counts
    every row with an error, `uncaptioned` those whose error is only a missing caption)."""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(rows_label_counts.items()))
    line = f"{total} images: {parts or 'none scored'}; {errors - uncaptioned} could not be read"
    return line + (f"; {uncaptioned} without a caption" if uncaptioned else "")


__all__ = ["COLUMNS", "check_backbone_override", "growing_chunks", "score_refs", "RowWriter", "verdict", "summarise"]
