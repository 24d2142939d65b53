"""Captions of images: a manifest `caption` column, or `--captions FILE.csv` (sha256 or path, caption)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import UsageError

#: The row error of an image scored with caption features but without a caption.
MISSING_CAPTION = "no caption for this image; give --captions FILE.csv or a manifest caption column"


class Captions:
    """Caption look-up by content hash or by file path (absolute); `get(sha, path)` tries both."""

    def __init__(self, by_sha: dict[str, str] | None = None, by_path: dict[str, str] | None = None,
                 source: str = ""):
        self.by_sha = dict(by_sha or {})
        self.by_path = {os.path.abspath(p): c for p, c in (by_path or {}).items()}
        self.source = source

    def __len__(self) -> int:
        return len(self.by_sha) + len(self.by_path)

    def get(self, sha: str = "", path: str = "") -> str | None:
        """The caption of the image with content hash `sha` or at `path`, else None."""
        c = self.by_sha.get(sha) if sha else None
        if c is None and path:
            c = self.by_path.get(os.path.abspath(path))
        return c

    def for_refs(self, refs) -> Captions:
        """These captions plus the `caption` of each ref (manifest column), which wins for its path."""
        extra = {r.path: r.caption for r in refs if getattr(r, "caption", None)}
        if not extra:
            return self
        out = Captions(self.by_sha, self.by_path, self.source)
        out.by_path.update({os.path.abspath(p): c for p, c in extra.items()})
        return out

    def sha_map(self, candidates: dict[str, list[str]]) -> dict[str, str]:
        """Captions of `candidates` (sha → the paths known for it), by hash first, then by any path."""
        out = {}
        for sha, paths in candidates.items():
            c = self.get(sha, "")
            for p in paths:
                if c is not None:
                    break
                c = self.get("", p)
            if c is not None:
                out[sha] = c
        return out


def read_captions(path: str | os.PathLike | None) -> Captions:
    """Read a captions CSV: column `caption` plus `sha256` and/or `path` (relative to the CSV's folder).

    Rows with an empty caption are ignored; a file without the needed columns is a `UsageError`.
    """
    if not path:
        return Captions()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--captions {p}: file not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{p}: not UTF-8 (byte 0x{raw[e.start]:02x} at line {line}); save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = set(reader.fieldnames or [])
    if "caption" not in cols or not cols & {"sha256", "path"}:
        raise UsageError(f"{p}: a captions file needs a 'caption' column and a 'sha256' or 'path' column "
                         f"(got {reader.fieldnames})")
    by_sha, by_path = {}, {}
    try:
        rows = list(reader)
    except csv.Error as e:  # an oversized field, a NUL byte, a quote left open
        raise UsageError(f"{p}: line {reader.line_num}: not a readable CSV row ({e})") from None
    for row in rows:
        cap = (row.get("caption") or "").strip()
        if not cap:
            continue
        sha = (row.get("sha256") or "").strip().lower()
        if sha:
            by_sha[sha] = cap
        fp = (row.get("path") or "").strip()
        if fp:
            by_path[fp if os.path.isabs(fp) else str(p.parent / fp)] = cap
    return Captions(by_sha, by_path, source=str(p))
