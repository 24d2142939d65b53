"""One-file, pickle-free bundles for fitted detectors (safetensors + JSON metadata).

Layout: a standard safetensors file. The arrays are safetensors tensors; the safetensors
``__metadata__`` holds exactly one entry, ``"clipdet"``, whose value is a canonical JSON string::

    {"format": KIND, "format_version": N, "meta": {...}, "sha256": HEX}

(one entry rather than several because safetensors writes its metadata map in a random order,
which would make the bytes differ between runs). ``sha256`` covers the format name, the version,
the canonical JSON of ``meta`` and every array's name, dtype, shape and bytes, so any edit to the
arrays or the metadata is detected on load.

Loading parses JSON and raw little-endian buffers only (no pickle-based loader of any library),
so a detector file can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .errors import DetectorFileError, UsageError

__all__ = ["DEFAULT_KIND", "FORMAT_VERSION", "SUPPORTED_DTYPES", "load_bundle", "save_bundle"]

DEFAULT_KIND = "clipdet-detector"
FORMAT_VERSION = 1
_META_KEY = "clipdet"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

#: numpy dtypes that round-trip through a bundle
SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")
)


# --------------------------------------------------------------------------- helpers


def _json_default(obj):
    if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _canonical_json(obj) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _digest(kind: str, version: int, meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()

    def _chunk(b: bytes) -> None:  # length-prefixed so that fields cannot run into each other
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    _chunk(b"clipdet-bundle")
    _chunk(kind.encode("utf-8"))
    _chunk(str(int(version)).encode("ascii"))
    _chunk(meta_json.encode("utf-8"))
    for name in sorted(arrays):
        a = arrays[name]
        _chunk(_canonical_json([name, a.dtype.str, list(a.shape)]).encode("utf-8"))
        _chunk(a.tobytes(order="C"))
    return h.hexdigest()


def _prepare_arrays(arrays) -> dict[str, np.ndarray]:
    if not isinstance(arrays, dict):
        raise UsageError(f"arrays must be a dict of name -> numpy array, got {type(arrays).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise UsageError(f"array names must be non-empty strings other than '__metadata__', got {name!r}")
        if not isinstance(a, np.ndarray):
            raise UsageError(f"array {name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype.kind in "USO":
            raise UsageError(f"array {name!r} holds {a.dtype} values; store strings in meta, not arrays")
        if a.dtype.newbyteorder("=") not in SUPPORTED_DTYPES and a.dtype not in SUPPORTED_DTYPES:
            raise UsageError(
                f"array {name!r} has unsupported dtype {a.dtype}; use one of "
                + ", ".join(str(d) for d in SUPPORTED_DTYPES)
            )
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"))
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
        out[name] = a
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- public API


def save_bundle(
    path,
    meta: dict,
    arrays: dict[str, np.ndarray],
    kind: str = DEFAULT_KIND,
    version: int = FORMAT_VERSION,
) -> Path:
    """Write ``meta`` (JSON-able dict) and ``arrays`` to one safetensors file at ``path``.

    Atomic (temporary file in the same folder, then ``os.replace``) and deterministic: the same
    inputs give identical bytes. numpy scalars in ``meta`` are stored as plain numbers and tuples
    come back as lists. Array dtypes: float16/32/64, int32/64, uint8, bool (zero-size arrays
    included); strings belong in ``meta``. Returns the path written.
    """
    from safetensors.numpy import save as st_save

    if not isinstance(meta, dict):
        raise UsageError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(kind, str) or not kind:
        raise UsageError(f"kind must be a non-empty string, got {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"version must be a positive integer, got {version!r}")
    try:
        meta_json = _canonical_json(meta)
    except (TypeError, ValueError) as e:
        raise UsageError(f"meta is not JSON-serialisable: {e}") from None
    meta_obj = json.loads(meta_json)  # plain JSON types, as they will be read back
    arrs = _prepare_arrays(arrays)
    header = {
        "format": kind,
        "format_version": version,
        "meta": meta_obj,
        "sha256": _digest(kind, version, meta_json, arrs),
    }
    data = st_save(arrs, metadata={_META_KEY: _canonical_json(header)})
    path = Path(path)
    _atomic_write(path, data)
    return path


def load_bundle(path, kind: str = DEFAULT_KIND, max_version: int = FORMAT_VERSION) -> tuple[dict, dict]:
    """Read a bundle written by `save_bundle`; returns ``(meta, arrays)``.

    Raises `DetectorFileError` with a one-line message naming the file when it is missing,
    truncated, not a safetensors file, of another kind, from a newer format version than
    ``max_version``, or fails its checksum (arrays or metadata edited). Never runs code.
    """
    p = Path(path)

    def fail(reason: str) -> DetectorFileError:
        return DetectorFileError(f"{p}: {reason}")

    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not a detector file") from None
    except OSError as e:
        raise fail(f"cannot read ({e.strerror or e})") from None

    # --- safetensors framing: u64 header length, JSON header, data
    if len(raw) == 0:
        raise fail("empty file")
    if len(raw) < 8:
        raise fail("truncated (shorter than a safetensors header)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen == 0 or hlen > _MAX_HEADER or (len(raw) > 8 and raw[8:9] != b"{"):
        raise fail("not a safetensors file")
    if len(raw) < 8 + hlen:
        raise fail(f"truncated (header needs {8 + hlen} bytes, file has {len(raw)})")
    try:
        header = json.loads(raw[8 : 8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise fail("not a safetensors file (unreadable header; corrupted?)") from None
    if not isinstance(header, dict):
        raise fail("not a safetensors file (header is not a JSON object)")
    data_len = len(raw) - 8 - hlen
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            _start, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise fail(f"corrupted header (tensor {name!r} has no valid data_offsets)") from None
        needed = max(needed, end)
    if data_len < needed:
        raise fail(f"truncated (data needs {needed} bytes, file has {data_len})")
    if data_len > needed:
        raise fail(f"corrupted ({data_len - needed} unexpected trailing bytes)")

    # --- clipdet envelope
    st_meta = header.get("__metadata__")
    if not isinstance(st_meta, dict) or _META_KEY not in st_meta:
        raise fail(f"not a clipdet file (safetensors without clipdet metadata; expected a {kind!r} file)")
    try:
        env = json.loads(st_meta[_META_KEY])
    except (TypeError, ValueError):
        raise fail("corrupted clipdet metadata (not valid JSON)") from None
    if not isinstance(env, dict):
        raise fail("corrupted clipdet metadata (not a JSON object)")
    got_kind = env.get("format")
    if got_kind != kind:
        raise fail(f"wrong kind of file: it is a {got_kind!r} file, expected {kind!r}")
    ver = env.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
        raise fail(f"corrupted clipdet metadata (format_version {ver!r})")
    if ver > max_version:
        raise fail(
            f"format version {ver} was made by a newer clipdet (this one reads up to {max_version}); upgrade"
        )
    meta = env.get("meta")
    if not isinstance(meta, dict) or not isinstance(env.get("sha256"), str):
        raise fail("corrupted clipdet metadata (meta or sha256 missing)")

    # --- arrays (plain buffers; safetensors does not deserialise objects)
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    try:
        arrays = st_load(raw)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise fail(f"corrupted safetensors data ({msg})") from None
    arrays = {name: arrays[name] for name in sorted(arrays)}

    expected = _digest(kind, ver, _canonical_json(meta), arrays)
    if expected != env["sha256"]:
        raise fail("checksum mismatch: the arrays or metadata were edited or corrupted")
    return meta, arrays
