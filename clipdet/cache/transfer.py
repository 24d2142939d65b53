"""Import and export of embeddings: Parquet (pyarrow) and clip-retrieval output folders.

Parquet columns: `sha256` (64 hex chars) or `path` (a readable file, hashed), `embedding` (list or
fixed-size list of D floats; L2-normalised here, stored float16), optional `label` (real/fake/0/1),
`generator`, `path`. A clip-retrieval folder holds embeddings/img_emb/img_emb_N.npy and
metadata/metadata_N.parquet (column `image_path`); row i of one pairs with row i of the other.
Both stream in batches: memory stays flat in the number of rows. Bad rows are counted and named
(first few), the good rows land.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .index import hex_to_raw, valid_raw
from .model import FeatureRows
from .segment import label_codes

BATCH_ROWS = 1 << 14
LABEL_VALUES = {"real": "real", "fake": "fake", "0": "real", "1": "fake", "": ""}


@dataclass
class ImportSummary:
    """What an import did: rows landed, rows rejected (with the first few reasons)."""

    rows: int = 0
    rejected: int = 0
    examples: list[str] = field(default_factory=list)

    def reject(self, where: str, reason: str, n: int = 1) -> None:
        """Count `n` rejected rows; keep the first few messages."""
        self.rejected += n
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def _sha_of_file(path: str) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _embeddings(col, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list / fixed-size-list Arrow column → (n, dim) float32, a mask of rows of the right length, and
    a mask of null rows (no embedding at all)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        if width != dim:
            return np.zeros((n, dim), np.float32), np.zeros(n, bool), null
        # the child array holds a slot for every row, null rows included (flatten() would skip them)
        vals = col.values.slice(col.offset * width, n * width)
        out = np.asarray(vals.to_numpy(zero_copy_only=False), np.float64).astype(np.float32).reshape(n, dim)
        return out, ~null, null
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy().astype(np.int64)
    ok = lengths == dim
    out = np.zeros((n, dim), np.float32)
    if ok.any():
        good = col.filter(pa.array(ok))
        out[ok] = np.asarray(good.flatten().to_numpy(zero_copy_only=False), np.float64).astype(np.float32) \
            .reshape(-1, dim)
    return out, ok, null


def embedding_type_problem(t, dim: int) -> str | None:
    """Why an Arrow type cannot hold embeddings (None when it is a list of numbers)."""
    import pyarrow as pa

    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and \
            (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return None
    return f"column embedding is {t}; expected a list of {dim} floats (list<float> or fixed_size_list<float, {dim}>)"


def _batches(sources: list[str], summary: ImportSummary, dim: int) -> Iterator[tuple[str, int, dict]]:
    """(file, first row number, columns as Python/numpy) over Parquet files and clip-retrieval folders;
    a file whose embedding column is not a list of numbers is rejected whole (in `summary`)."""
    import pyarrow.parquet as pq

    for src in sources:
        if os.path.isdir(src) and os.path.isdir(os.path.join(src, "embeddings", "img_emb")):
            embs = sorted(glob.glob(os.path.join(src, "embeddings", "img_emb", "img_emb_*.npy")))
            if not embs:
                raise UsageError(f"{src}: no embeddings/img_emb/img_emb_*.npy (not a clip-retrieval output?)")
            for e in embs:
                suffix = os.path.basename(e)[len("img_emb_"):-len(".npy")]
                meta = os.path.join(src, "metadata", f"metadata_{suffix}.parquet")
                if not os.path.exists(meta):
                    raise UsageError(f"{meta}: missing (pairs with {e})")
                arr = np.load(e, mmap_mode="r")
                pf = pq.ParquetFile(meta)
                start = 0
                for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=["image_path"]):
                    n = b.num_rows
                    yield meta, start, {"path": b.column(0).to_pylist(),
                                        "embedding_np": np.asarray(arr[start:start + n])}
                    start += n
            continue
        files = sorted(glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True)) if os.path.isdir(src) else [src]
        if not files:
            raise UsageError(f"{src}: no .parquet files")
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a user input error
                raise UsageError(f"{f}: not a readable Parquet file ({e})") from None
            names = set(pf.schema_arrow.names)
            if "embedding" not in names or not ({"sha256", "path"} & names):
                raise UsageError(f"{f}: needs columns embedding and sha256 or path (has: {', '.join(sorted(names))})")
            why = embedding_type_problem(pf.schema_arrow.field("embedding").type, dim)
            if why:
                summary.reject(f, why, pf.metadata.num_rows)
                continue
            cols = [c for c in ("sha256", "path", "embedding", "label", "generator") if c in names]
            start = 0
            for rg in range(pf.num_row_groups):  # one row group at a time (iter_batches keeps them alive)
                table = pf.read_row_group(rg, columns=cols)
                for b in table.to_batches(max_chunksize=BATCH_ROWS):
                    d = {c: (b.column(c) if c == "embedding" else b.column(c).to_pylist()) for c in cols}
                    yield f, start, d
                    start += b.num_rows
                del table


def import_rows(cache, sources: list[str], key: str, attrs: dict, view: str = "clean") -> ImportSummary:
    """Import embeddings into `cache` for the feature group (key, view) written with `attrs` (the
    backbone's, from `clipdet.backbones.backbone_attrs`); see the module docstring for the formats."""
    dim = attrs["dim"]
    summary = ImportSummary()
    if cache.exists():
        _refuse_richer_group(cache, key, view)
    cached = cache.cached_shas(key, view) if cache.exists() else None
    seen: set[str] = set()  # imported in this run
    for where, start, d in _batches(sources, summary, dim):
        n = len(d["embedding_np"]) if "embedding_np" in d else len(d["embedding"])
        if "embedding_np" in d:
            x = d["embedding_np"].astype(np.float32)
            ok = np.full(n, x.ndim == 2 and x.shape[1] == dim)
            if x.ndim != 2 or x.shape[1] != dim:
                summary.reject(where, f"embedding size {x.shape[-1]}, the backbone's is {dim}", n)
                continue
        else:
            x, ok, null = _embeddings(d["embedding"], dim)
            if null.any():
                i = int(np.flatnonzero(null)[0])
                summary.reject(f"{where} row {start + i}", "embedding is null", int(null.sum()))
            if (~ok & ~null).any():
                i = int(np.flatnonzero(~ok & ~null)[0])
                summary.reject(f"{where} row {start + i}", f"embedding is not {dim} numbers (the backbone's "
                               "embedding size)", int((~ok & ~null).sum()))
        norms = np.linalg.norm(np.where(np.isfinite(x), x, 0), axis=1)
        bad_val = ok & (~np.isfinite(x).all(axis=1) | (norms == 0))
        if bad_val.any():
            i = int(np.flatnonzero(bad_val)[0])
            summary.reject(f"{where} row {start + i}", "embedding has NaN/inf or is all zeros", int(bad_val.sum()))
            ok &= ~bad_val
        paths = d.get("path") or [""] * n
        if "sha256" in d:
            shas = [(s or "").strip().lower() if isinstance(s, str) else "" for s in d["sha256"]]
            raw = hex_to_raw(np.array([s.encode()[:64] for s in shas], dtype="S64"))
            good_sha = valid_raw(raw) & np.array([len(s) == 64 for s in shas])
        else:
            shas = [(_sha_of_file(p) if isinstance(p, str) else None) or "" for p in paths]
            good_sha = np.array([bool(s) for s in shas])
            for i in np.flatnonzero(ok & ~good_sha)[:1]:
                summary.reject(f"{where} row {start + i}", f"{paths[i]}: not a readable file",
                               int((ok & ~good_sha).sum()))
            ok &= good_sha
        if "sha256" in d and (ok & ~good_sha).any():
            i = int(np.flatnonzero(ok & ~good_sha)[0])
            summary.reject(f"{where} row {start + i}", f"sha256 {d['sha256'][i]!r} is not 64 hex characters",
                           int((ok & ~good_sha).sum()))
            ok &= good_sha
        labels = [LABELS_OF(v) for v in d.get("label", [""] * n)]
        bad_lab = ok & np.array([lab is None for lab in labels])
        if bad_lab.any():
            i = int(np.flatnonzero(bad_lab)[0])
            summary.reject(f"{where} row {start + i}", f"label {d['label'][i]!r} is not real/fake/0/1",
                           int(bad_lab.sum()))
            ok &= ~bad_lab
        gens = d.get("generator") or [""] * n
        keep_rows = []
        cand = np.flatnonzero(ok)
        in_cache = cached.contains_many([shas[i] for i in cand]) if cached is not None and len(cand) else \
            np.zeros(len(cand), bool)
        for i, old in zip(cand, in_cache):
            s = shas[i]
            if old or s in seen:
                summary.reject(f"{where} row {start + i}", f"duplicate sha256 {s} (already imported or cached)")
                continue
            seen.add(s)
            keep_rows.append(i)
        if not keep_rows:
            continue
        idx = np.array(keep_rows)
        e = x[idx] / norms[idx, None]
        rows = FeatureRows([shas[i] for i in idx], e.astype(np.float16))
        lab = [labels[i] for i in idx]
        gen = [(gens[i] or "") if labels[i] == "fake" else "" for i in idx]
        vocab = [""] + sorted(set(gen) - {""})
        code = {g: c for c, g in enumerate(vocab)}
        metas = {
            "sha": np.array([shas[i].encode() for i in idx], "S64"), "label": label_codes(lab),
            "gen_codes": np.array([code[g] for g in gen], np.int32), "vocab": vocab,
            "width": np.zeros(len(idx), np.int32), "height": np.zeros(len(idx), np.int32),
            "fmt": [""] * len(idx), "paths": [paths[i] if isinstance(paths[i], str) else "" for i in idx],
        }
        cache.write_shard({(key, view): (rows, attrs)}, images=metas)
        summary.rows += len(idx)
    cache.auto_compact()
    return summary


def _refuse_richer_group(cache, key: str, view: str) -> None:
    """Imported rows carry an embedding only: refuse (before reading any source) to add them to a group
    extracted with --layers or --heads, whose every row must hold those too."""
    g = cache.group(key, view)
    if g is None or not (g.layers or g.heads):
        return
    what = f"--layers {','.join(map(str, g.layers))}" if g.layers else \
        f"--heads {len(g.heads.get('blocks', []))}"
    raise UsageError(f"{cache.path}: features {key}/{view} were extracted with {what}; imported embeddings "
                     "have no such rows and cannot join them: import into another --cache")


def LABELS_OF(v) -> str | None:  # noqa: N802 - a mapping, read as a table
    """'real'/'fake'/0/1/'' (any case) → 'real'/'fake'/''; None for anything else."""
    if v is None:
        return ""
    if isinstance(v, bool):
        v = int(v)
    return LABEL_VALUES.get(str(v).strip().lower())


def export_parquet(cache, out: str, key: str, view: str = "clean") -> int:
    """Write the (key, view) features with sha256, label, generator, path columns; returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .index import raw_to_hex

    lab = cache.labelled(key, view)
    shas = raw_to_hex(lab["raw"])
    vocab = lab["vocab"]
    tmp = out + ".tmp"
    writer = None
    n = 0
    try:
        for s in range(0, len(shas), BATCH_ROWS):
            part = shas[s:s + BATCH_ROWS]
            rows = cache.load(key, view, shas=part)
            metas = cache.image_metas(rows.sha256)
            where = {h: i for i, h in enumerate(part)}
            labels = ["" if lab["label"][s + where[h]] == 0 else ("real" if lab["label"][s + where[h]] == 1 else "fake")
                      for h in rows.sha256]
            gens = [vocab[lab["gen"][s + where[h]]] for h in rows.sha256]
            dim = rows.embedding.shape[1]
            table = pa.table({
                "sha256": rows.sha256,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.embedding.ravel(), pa.float32()), dim),
                "label": labels, "generator": gens,
                "path": [(metas[h].paths[0] if h in metas and metas[h].paths else "") for h in rows.sha256],
            })
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            n += len(rows.sha256)
        if writer is None:
            raise UsageError(f"{cache.path}: no {view} features for {key} to export")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
