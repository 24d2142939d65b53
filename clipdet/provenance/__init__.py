"""Provenance read from an image's bytes: C2PA manifests, XMP/IPTC DigitalSourceType, generator front
ends' PNG text chunks, EXIF Software of known generators.

Never part of the learned score: a mark is reported beside the verdict (the `provenance` column, serve's
JSON, the page). Missing marks prove nothing (they are stripped by most re-saves and uploads).
Readers never raise on bad input: damaged marks are reported in `Provenance.problems`. No torch, no PIL.

- `containers`: JPEG segments, PNG chunks, an XMP packet anywhere (bytes → `Blocks`).
- `marks`: what those blocks say (`Mark`); `c2pa_read`: C2PA through `c2pa-python` (extra `c2pa`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .containers import read_blocks
from .marks import Mark, exif_marks, png_marks, xmp_marks

MAX_FILE = 256 << 20  # a provenance read of a file not read otherwise stops here


@dataclass
class Provenance:
    """Marks found in one file (possibly none) and problems met reading them."""

    marks: list[Mark] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    format: str = ""

    @property
    def short(self) -> str:
        """The `provenance` column: marks as 'source:value' joined by '; ' ('' when none)."""
        return "; ".join(m.short() for m in self.marks)

    @property
    def ai(self) -> bool:
        """Whether some mark says the image was made (in whole or in part) by a generative model."""
        return any(m.ai for m in self.marks)

    def to_dict(self) -> dict:
        """JSON-able details: format, marks (source, value, ai, details) and problems."""
        return {"format": self.format, "ai": self.ai, "problems": list(self.problems),
                "marks": [{"source": m.source, "value": m.value, "ai": m.ai, **m.details} for m in self.marks]}


def read_provenance(data: bytes) -> Provenance:
    """Every provenance mark in the bytes of one image file; never raises."""
    blocks = read_blocks(bytes(data) if not isinstance(data, bytes) else data)
    out = Provenance(format=blocks.format)
    try:
        if blocks.c2pa:
            from .c2pa_read import c2pa_marks

            out.marks += c2pa_marks(data, blocks.format, blocks.problems)
        out.marks += xmp_marks(blocks.xmp)
        out.marks += png_marks(blocks.texts)
        out.marks += exif_marks(blocks)
    except Exception as e:  # noqa: BLE001 - a reader of untrusted bytes reports, never raises
        blocks.problems.append(f"provenance: {type(e).__name__}: {e}")
    out.problems = blocks.problems
    return out


def read_provenance_file(path: str | os.PathLike) -> Provenance:
    """`read_provenance` of a file on disk (for files a run did not otherwise read), reading only its
    metadata segments or chunks where it can (`files.metadata_bytes`); the whole file when it holds a
    C2PA store. An unreadable file is one problem, not an exception."""
    from .files import metadata_bytes

    try:
        with open(path, "rb") as f:
            data, whole = metadata_bytes(f, MAX_FILE)
            if not whole and read_blocks(data).c2pa:  # a C2PA signature covers every byte: read them all
                f.seek(0)
                data = f.read(MAX_FILE)
            out = read_provenance(data)
    except OSError as e:
        return Provenance(problems=[f"{path}: cannot read ({e.strerror or e})"])
    return out


__all__ = ["Mark", "Provenance", "read_provenance", "read_provenance_file"]
