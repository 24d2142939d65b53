"""Metadata blocks of an image file, from its bytes: JPEG segments, PNG chunks, an XMP packet anywhere.

Pure byte parsing (no PIL, no torch). Every reader stops at the first damaged structure and says so
in `Blocks.problems`; none raises on bad input.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

JPEG_SOI = b"\xff\xd8"
PNG_SIG = b"\x89PNG\r\n\x1a\n"
XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
EXIF_JPEG = b"Exif\x00\x00"
MAX_TEXT = 1 << 20  # a text chunk inflated beyond 1 MB is cut (zip bombs)


@dataclass
class Blocks:
    """What a file carries besides pixels: `texts` (PNG text key → value), `xmp` packets, `exif` (TIFF
    blocks), `c2pa` (whether a C2PA/JUMBF store is present), the container `format` and `problems`."""

    format: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    xmp: list[str] = field(default_factory=list)
    exif: list[bytes] = field(default_factory=list)
    c2pa: bool = False
    problems: list[str] = field(default_factory=list)


def sniff(data: bytes) -> str:
    """'jpeg', 'png', 'webp', 'tiff', 'heif' or '' from the first bytes."""
    if data.startswith(JPEG_SOI):
        return "jpeg"
    if data.startswith(PNG_SIG):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[4:8] == b"ftyp":
        return "heif"
    return ""


def read_blocks(data: bytes) -> Blocks:
    """Every metadata block of `data` that clipdet reads; never raises."""
    out = Blocks(format=sniff(data))
    try:
        if out.format == "jpeg":
            _jpeg(data, out)
        elif out.format == "png":
            _png(data, out)
        else:
            if out.format == "tiff":
                out.exif.append(data[:1 << 20])
            _scan_xmp(data, out)
            out.c2pa = b"c2pa" in data and b"jumb" in data
    except Exception as e:  # noqa: BLE001 - a reader of untrusted bytes reports, never raises
        out.problems.append(f"{out.format or 'file'}: unreadable metadata ({type(e).__name__}: {e})")
    return out


def _jpeg(data: bytes, out: Blocks) -> None:
    """APP1 (EXIF, XMP), APP11 (JUMBF: C2PA) up to the start of scan."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            out.problems.append(f"jpeg: bad segment marker at byte {i}")
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end: no metadata after this in practice
            return
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2 or i + 2 + length > n:
            out.problems.append(f"jpeg: segment at byte {i} runs past the end of the file")
            return
        body = data[i + 4:i + 2 + length]
        if marker == 0xE1 and body.startswith(EXIF_JPEG):
            out.exif.append(body[len(EXIF_JPEG):])
        elif marker == 0xE1 and body.startswith(XMP_JPEG):
            out.xmp.append(body[len(XMP_JPEG):].decode("utf-8", "replace"))
        elif marker == 0xEB and b"jumb" in body[:64]:
            out.c2pa = True
        i += 2 + length


def _png(data: bytes, out: Blocks) -> None:
    """tEXt / zTXt / iTXt (text, XMP), eXIf, caBX (C2PA), walking the chunks."""
    i, n = len(PNG_SIG), len(data)
    while i + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[i:i + 8])
        if i + 12 + length > n:
            out.problems.append(f"png: chunk {ctype!r} at byte {i} runs past the end of the file")
            return
        body = data[i + 8:i + 8 + length]
        if ctype == b"IEND":
            return
        try:
            if ctype == b"tEXt":
                k, _, v = body.partition(b"\x00")
                _text(out, k.decode("latin-1"), v.decode("latin-1"))
            elif ctype == b"zTXt":
                k, _, rest = body.partition(b"\x00")
                _text(out, k.decode("latin-1"), _inflate(rest[1:]).decode("latin-1"))
            elif ctype == b"iTXt":
                k, _, rest = body.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\x00")
                _tkey, _, text = rest.partition(b"\x00")
                _text(out, k.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8", "replace"))
            elif ctype == b"eXIf":
                out.exif.append(body)
            elif ctype == b"caBX":
                out.c2pa = True
        except Exception as e:  # noqa: BLE001 - one bad chunk: reported, the others still read
            out.problems.append(f"png: unreadable {ctype.decode('latin-1')} chunk ({type(e).__name__}: {e})")
        i += 12 + length


def _inflate(blob: bytes) -> bytes:
    d = zlib.decompressobj()
    return d.decompress(blob, MAX_TEXT)


def _text(out: Blocks, key: str, value: str) -> None:
    if key == "XML:com.adobe.xmp":
        out.xmp.append(value)
    else:
        out.texts[key] = value[:MAX_TEXT]


def _scan_xmp(data: bytes, out: Blocks) -> None:
    """An XMP packet anywhere in the bytes (WebP XMP chunk, HEIF, TIFF)."""
    start = data.find(b"<x:xmpmeta")
    if start < 0:
        return
    end = data.find(b"</x:xmpmeta>", start)
    if end < 0:
        out.problems.append("xmp: packet without its end")
        return
    out.xmp.append(data[start:end + 12].decode("utf-8", "replace"))


def exif_software(tiff: bytes) -> str | None:
    """The EXIF/TIFF `Software` tag (0x0131) of IFD0 in a TIFF block; None when absent. Raises ValueError
    on a damaged block (the caller reports it)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        raise ValueError("not a TIFF header")
    e = "<" if tiff[:2] == b"II" else ">"
    (off,) = struct.unpack(e + "I", tiff[4:8])
    if off + 2 > len(tiff):
        raise ValueError("IFD0 past the end")
    (count,) = struct.unpack(e + "H", tiff[off:off + 2])
    for k in range(min(count, 512)):
        p = off + 2 + 12 * k
        if p + 12 > len(tiff):
            raise ValueError("IFD0 entry past the end")
        tag, typ, n = struct.unpack(e + "HHI", tiff[p:p + 8])
        if tag != 0x0131 or typ != 2:
            continue
        raw = tiff[p + 8:p + 8 + n] if n <= 4 else tiff[struct.unpack(e + "I", tiff[p + 8:p + 12])[0]:][:n]
        return raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    return None
