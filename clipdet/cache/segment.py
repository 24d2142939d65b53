"""One segment file: an immutable HDF5 file holding a batch of images, features and errors.

Layout (format_version 2; version-1 files, written by clipdet 0.1, are read too):

    /                       attrs: format="clipdet-cache", format_version, kind="segment", clipdet_version
    /images/sha256          S64   hex SHA-256 of the file bytes
    /images/label           int8  0 unlabelled, 1 real, 2 fake (attr labels: JSON list)   [v1: strings]
    /images/generator       int32 code into /images/generator_vocab (0 = none)            [v1: strings]
    /images/width, height   int32
    /images/format, paths   strings (paths: every path seen, newline-separated)
    /features/<key>/<view>/sha256     S64
    /features/<key>/<view>/embedding  float16 (n, dim), L2-normalised, chunked + fletcher32 checksums
    /features/<key>/<view>/layers     float16 (n, L, width), when extracted with --layers
    /features/<key>/<view>/layers_mean float16 (n, L, width), those blocks' patch-token means (clipdet >= 0.3)
    /features/<key>/<view>/heads      float16 (n, N × H, dim), per-head contributions, with --heads N
    /features/<key>/<view>/heads_rest float16 (n, dim), the rest of that decomposition
           attrs: backbone (JSON), layers (JSON), dim, clipdet_version[, heads (JSON)]
    /errors/{sha256,path,reason}      strings

Small segments are built in memory and written with plain file I/O (see files.atomic_write_bytes), so
a full disk gives a clean error rather than a half-written HDF5 file.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from .._version import __version__
from ..errors import CacheError, printable
from .model import EXTRAS, FORMAT, FORMAT_VERSION, LABELS, FeatureRows, ImageMeta, decode, str_dtype

#: rows per chunk of embedding datasets: a random read of one row costs one chunk (≈256 KiB)
CHUNK_BYTES = 2**18


def check_header(f, name: str, kinds=("segment",)) -> int:
    """Raise CacheError unless `f` is a clipdet cache file this version reads; returns its version."""
    if f.attrs.get("format") not in (FORMAT, FORMAT.encode()):
        raise CacheError(f"{name}: not a clipdet feature cache")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CacheError(f"{name}: cache made by a newer clipdet (format v{version}); upgrade clipdet")
    kind = f.attrs.get("kind", "segment")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if version >= 2 and kind not in kinds:
        raise CacheError(f"{name}: a clipdet cache {kind}, not a {' or '.join(kinds)}")
    return version


def order_ns(f, name: str) -> int:
    """A segment's position in its cache's order: a merge output takes its first input's (attr
    order_ns), a batch its creation time (attr created_ns, else the seg-<time_ns>-... file name)."""
    import os

    for a in ("order_ns", "created_ns"):
        if a in f.attrs:
            return int(f.attrs[a])
    parts = os.path.basename(name).split("-")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _chunk_rows(dim_bytes: int, n: int) -> int:
    return max(1, min(max(n, 1), CHUNK_BYTES // max(1, dim_bytes)))


def write_header(f, kind: str = "segment") -> None:
    """Root attributes of a version-2 file."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["kind"] = kind
    f.attrs["clipdet_version"] = __version__
    f.attrs["created_ns"] = time.time_ns()


def label_codes(labels) -> np.ndarray:
    """'real'/'fake'/'' → int8 codes (anything else → 0)."""
    lut = {lab: i for i, lab in enumerate(LABELS)}
    return np.array([lut.get(lab or "", 0) for lab in labels], dtype=np.int8)


def write_images(f, sha: np.ndarray, label: np.ndarray, gen_codes: np.ndarray, vocab: list[str],
                 width: np.ndarray, height: np.ndarray, fmt: list[str], paths: list[str]) -> None:
    """Write the /images table from columns (labels and generators already as codes)."""
    sd = str_dtype()
    from .index import KeyTable

    g = f.create_group("images")
    g.create_dataset("sha256", data=np.asarray(sha, dtype="S64"))
    KeyTable.build(np.asarray(sha, dtype="S64")).save(g)
    ds = g.create_dataset("label", data=np.asarray(label, dtype=np.int8))
    ds.attrs["labels"] = json.dumps(list(LABELS))
    g.create_dataset("generator", data=np.asarray(gen_codes, dtype=np.int32))
    g.create_dataset("generator_vocab", data=[printable(v) for v in vocab], dtype=sd)
    g.create_dataset("width", data=np.asarray(width, dtype=np.int32))
    g.create_dataset("height", data=np.asarray(height, dtype=np.int32))
    g.create_dataset("format", data=list(fmt), dtype=sd)
    g.create_dataset("paths", data=[printable(p) for p in paths], dtype=sd)  # HDF5 strings are UTF-8


def write_image_metas(f, images: list[ImageMeta]) -> None:
    """Write the /images table from ImageMeta records."""
    vocab = [""] + sorted({m.generator for m in images if m.generator})
    code = {g: i for i, g in enumerate(vocab)}
    write_images(
        f, np.array([m.sha256.encode() for m in images], dtype="S64"), label_codes([m.label for m in images]),
        np.array([code[m.generator or ""] for m in images], dtype=np.int32), vocab,
        np.array([m.width for m in images], dtype=np.int32), np.array([m.height for m in images], dtype=np.int32),
        [m.format for m in images], ["\n".join(m.paths) for m in images],
    )


def write_errors(f, errors: list[dict]) -> None:
    """Write the /errors table."""
    sd = str_dtype()
    g = f.create_group("errors")
    for name in ("sha256", "path", "reason"):
        g.create_dataset(name, data=[printable(str(e.get(name) or "")) for e in errors], dtype=sd)


def group_attrs(g, attrs: dict) -> None:
    """Record a feature group's backbone, layers, dim and head set (attrs as given by the extractor)."""
    for name, value in attrs.items():
        if name not in ("backbone", "layers", "dim", "heads"):
            g.attrs[name] = value
    if attrs.get("heads") is not None:
        h = attrs["heads"]
        g.attrs["heads"] = h if isinstance(h, str) else json.dumps(h, sort_keys=True)
    b = attrs["backbone"]
    g.attrs["backbone"] = json.dumps(b, sort_keys=True) if isinstance(b, dict) else b
    g.attrs["layers"] = attrs["layers"] if isinstance(attrs.get("layers"), str) else \
        json.dumps(list(attrs.get("layers") or []))
    g.attrs["dim"] = int(attrs["dim"])
    g.attrs.setdefault("clipdet_version", __version__)


def group_heads(attrs) -> dict | None:
    """A feature group's recorded head set ({"blocks", "n_heads"}), or None without --heads."""
    h = attrs.get("heads")
    if h is None:
        return None
    return json.loads(h.decode() if isinstance(h, bytes) else h) if isinstance(h, (str, bytes)) else h


def group_extras(g) -> tuple[str, ...]:
    """The EXTRAS datasets an open feature group holds."""
    return tuple(name for name in EXTRAS if name in g)


def create_feature_datasets(g, n: int, dim: int, extra_shapes: dict[str, tuple] | None = None):
    """Create a group's sha256 / embedding datasets and its EXTRAS datasets (name → per-row shape) for
    `n` rows; returns (sha256, embedding, {name: dataset})."""
    rows = _chunk_rows(2 * dim, n)
    ds_s = g.create_dataset("sha256", shape=(n,), maxshape=(None,), dtype="S64", chunks=(min(rows * 16, 1 << 16),))
    ds_e = g.create_dataset("embedding", shape=(n, dim), maxshape=(None, dim), dtype=np.float16,
                            chunks=(rows, dim), fletcher32=True)
    extra = {}
    for name, shape in (extra_shapes or {}).items():
        if name not in EXTRAS:
            raise CacheError(f"unknown feature array {name!r}")
        shape = tuple(int(x) for x in shape)
        xrows = _chunk_rows(2 * int(np.prod(shape)), n)
        extra[name] = g.create_dataset(name, shape=(n,) + shape, maxshape=(None,) + shape,
                                       dtype=np.float16, chunks=(xrows,) + shape, fletcher32=True)
    return ds_s, ds_e, extra


def write_features(f, features: dict[tuple[str, str], tuple[FeatureRows, dict]]) -> None:
    """Write /features groups from (key, view) → (rows, attrs)."""
    fg = f.create_group("features")
    for (key, view), (rows, attrs) in features.items():
        g = fg.require_group(key).create_group(view)
        group_attrs(g, attrs)
        emb = np.asarray(rows.embedding, dtype=np.float16)
        extras = {name: np.asarray(a, dtype=np.float16) for name, a in rows.extras().items()}
        for name, a in extras.items():
            if len(a) != len(rows.sha256):
                raise CacheError(f"{name}: {len(a)} rows for {len(rows.sha256)} images")
        ds_s, ds_e, ds_x = create_feature_datasets(g, len(rows.sha256), int(emb.shape[1]) if emb.ndim == 2 else
                                                   int(attrs["dim"]), {n: a.shape[1:] for n, a in extras.items()})
        from .index import KeyTable

        sha = np.array([s.encode() for s in rows.sha256], dtype="S64")
        KeyTable.build(sha).save(g)
        if len(rows.sha256):
            ds_s[:] = sha
            ds_e[:] = emb
            for name, ds in ds_x.items():
                ds[:] = extras[name]


def segment_bytes(images: list[ImageMeta] | dict, errors: list[dict],
                  features: dict[tuple[str, str], tuple[FeatureRows, dict]], conflicts=()) -> bytes:
    """A complete segment file, built in memory. `images`: ImageMeta records, or a dict of the
    write_images columns (for bulk writers that never make one object per image)."""
    import h5py

    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        write_header(f)
        if isinstance(images, dict):
            write_images(f, **images)
        else:
            write_image_metas(f, images)
        write_errors(f, errors)
        write_features(f, features)
        if conflicts:
            from .conflicts import write_conflicts

            write_conflicts(f, conflicts)
    return bio.getvalue()


# ---------------------------------------------------------------------------------------------- reading
def image_columns(f, with_sha: bool = True) -> dict:
    """The /images table's index columns: sha256 (S64; None without `with_sha`), label codes (int8),
    generator names per row as (codes int32, vocab list). Works for version-1 files (strings) too."""
    g = f.get("images")
    if g is None or len(g["sha256"]) == 0:
        return {"sha256": np.zeros(0, "S64"), "label": np.zeros(0, np.int8), "gen": np.zeros(0, np.int32),
                "vocab": [""]}
    sha = g["sha256"][()] if with_sha else None
    if g["label"].dtype.kind in "iu":
        return {"sha256": sha, "label": g["label"][()].astype(np.int8), "gen": g["generator"][()].astype(np.int32),
                "vocab": decode(g["generator_vocab"][()])}
    labels = decode(g["label"][()])
    gens = decode(g["generator"][()])
    vocab = [""] + sorted(set(gens) - {""})
    code = {v: i for i, v in enumerate(vocab)}
    return {"sha256": sha, "label": label_codes(labels), "gen": np.array([code[x] for x in gens], np.int32),
            "vocab": vocab}


def image_rows(f, rows: np.ndarray) -> list[ImageMeta]:
    """ImageMeta for the given row numbers of /images (rows sorted ascending)."""
    g = f["images"]
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    pick = _reader(rows)
    sha = decode(pick(g["sha256"]))
    width, height = pick(g["width"]), pick(g["height"])
    fmt, paths = decode(pick(g["format"])), decode(pick(g["paths"]))
    if g["label"].dtype.kind in "iu":
        labels = [LABELS[int(c)] if 0 <= int(c) < len(LABELS) else "" for c in pick(g["label"])]
        vocab = decode(g["generator_vocab"][()])
        gens = [vocab[int(c)] if 0 <= int(c) < len(vocab) else "" for c in pick(g["generator"])]
    else:
        labels, gens = decode(pick(g["label"])), decode(pick(g["generator"]))
    return [ImageMeta(s, lab, gen, int(w), int(h), fm, [p for p in ps.split("\n") if p])
            for s, lab, gen, w, h, fm, ps in zip(sha, labels, gens, width, height, fmt, paths)]


def _reader(rows: np.ndarray):
    """A function reading `rows` of a dataset: one contiguous slice when dense, point reads otherwise."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    dense = (hi - lo) <= 4 * len(rows) + 64

    def pick(ds):
        if dense:
            return ds[lo:hi][rows - lo]
        return ds[rows]

    return pick


def read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, unique) of a dataset, reading a contiguous span when that is cheaper."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return ds[:0]
    return _reader(rows)(ds)


#: tolerance on the L2 norm of a stored (float16, L2-normalised) embedding before it counts as damaged
NORM_TOLERANCE = 0.02


def read_checked(ds, rows: np.ndarray, check_norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Rows (sorted) of a dataset as stored, and which are whole: their chunk passes its checksum
    (on a failure the span is read row by row), their values are finite and, with `check_norm`,
    of unit length."""
    rows = np.asarray(rows, dtype=np.int64)
    try:
        x = read_rows(ds, rows)
        ok = np.ones(len(rows), bool)
    except OSError:  # a fletcher32 failure somewhere in the span
        x = np.zeros((len(rows),) + ds.shape[1:], ds.dtype)
        ok = np.zeros(len(rows), bool)
        for j, r in enumerate(rows):
            try:
                x[j] = ds[int(r)]
                ok[j] = True
            except OSError:
                pass
    flat = x.reshape(len(x), -1).astype(np.float32)
    finite = np.isfinite(flat)
    ok &= finite.all(axis=1)
    if check_norm:
        ok &= np.abs(np.linalg.norm(np.where(finite, flat, 0), axis=1) - 1) <= NORM_TOLERANCE
    return x, ok


def group_rows_checked(g, rows: np.ndarray, extras: tuple[str, ...] = ()):
    """(embeddings, whole-row mask, {name: array} of the `extras` datasets) of `rows` of a feature group:
    a row is whole when its embedding and every requested extra pass read_checked."""
    emb, ok = read_checked(g["embedding"], rows)
    out = {}
    for name in extras:
        out[name], xok = read_checked(g[name], rows, check_norm=False)
        ok &= xok
    return emb, ok, out


def errors_table(f) -> list[dict]:
    """The /errors rows as dicts (sha256, path, reason)."""
    g = f.get("errors")
    if g is None:
        return []
    return [{"sha256": s, "path": p, "reason": r}
            for s, p, r in zip(decode(g["sha256"][()]), decode(g["path"][()]), decode(g["reason"][()]))]


def feature_groups(f) -> list[tuple[str, str]]:
    """The (key, view) feature groups present in `f`."""
    feats = f.get("features")
    if feats is None:
        return []
    return [(key, view) for key in feats for view in feats[key]]
