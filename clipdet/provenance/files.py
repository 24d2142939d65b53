"""Provenance of a file on disk that a run did not otherwise read: only its metadata is read.

JPEG: the segments before the image data (APP1 EXIF/XMP, APP11 JUMBF), skipping the others by seek;
PNG: the text, eXIf and caBX chunks, seeking over image data. The kept parts are reassembled into a
small file of the same format for `containers.read_blocks`; a C2PA store (whose signature covers the
whole file) and other formats are read whole, up to `limit` bytes.
"""

from __future__ import annotations

import struct

from .containers import JPEG_SOI, PNG_SIG

PNG_KEEP = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"caBX"}
JPEG_KEEP = {0xE1, 0xEB}


def metadata_bytes(f, limit: int) -> tuple[bytes, bool]:
    """(bytes to read provenance from, whether they are the whole file) for an open binary file."""
    head = f.read(16)
    if head.startswith(JPEG_SOI):
        parts = _jpeg(f, head)
    elif head.startswith(PNG_SIG):
        parts = _png(f, head)
    else:
        parts = None
    if parts is None:
        f.seek(0)
        return f.read(limit), True
    return parts, False


def _jpeg(f, head: bytes) -> bytes | None:
    out = [JPEG_SOI]
    f.seek(2)
    while True:
        hdr = f.read(4)
        if len(hdr) < 4 or hdr[0] != 0xFF:
            break
        marker = hdr[1]
        if marker in (0xDA, 0xD9):
            break
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            f.seek(-2, 1)  # markers without a length: step over two bytes
            continue
        (length,) = struct.unpack(">H", hdr[2:])
        if length < 2:
            return None  # damaged: the full reader reports it
        if marker in JPEG_KEEP:
            body = f.read(length - 2)
            out.append(hdr + body)
        else:
            f.seek(length - 2, 1)
    return b"".join(out) + b"\xff\xd9"


def _png(f, head: bytes) -> bytes | None:
    out = [PNG_SIG]
    f.seek(len(PNG_SIG))
    while True:
        hdr = f.read(8)
        if len(hdr) < 8:
            return None  # truncated: the full reader reports it
        length, ctype = struct.unpack(">I4s", hdr)
        if ctype == b"IEND":
            break
        if ctype in PNG_KEEP:
            out.append(hdr + f.read(length + 4))
        else:
            f.seek(length + 4, 1)
    return b"".join(out) + struct.pack(">I4s", 0, b"IEND") + b"\xaeB`\x82"
