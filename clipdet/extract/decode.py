"""Safe reading and decoding: size limits, EXIF orientation, any mode to 8-bit RGB, one error line per bad file."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from dataclasses import dataclass

from ..errors import ImageError

#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 64_000_000
#: Files larger than this are refused before reading.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def read_file(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of `path`, or `ImageError` (missing, unreadable, empty, too large)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        if size > max_bytes:
            raise ImageError(path, f"file too large ({size} bytes > {max_bytes})")
        with open(path, "rb") as f:
            return f.read()
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(path, f"unreadable: {e.strerror or e}") from None


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data` (the cache key of an image)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Decoded:
    """A decoded image as 8-bit RGB plus what the file said about itself."""

    image: object  # PIL.Image.Image (kept untyped to avoid importing PIL at module import)
    width: int
    height: int
    format: str


def _to_rgb(im):
    """Any PIL mode → 8-bit RGB: 16-bit and float scaled, alpha composited on white, CMYK converted."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and (arr.max() > 255 or arr.min() < 0):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


_BOMB_FILTER_SET = False


def _quiet_pil_bomb_warning() -> None:
    """Silence PIL's DecompressionBombWarning once: clipdet applies its own `max_pixels` limit from the
    header before decoding. (A global filter, because `warnings.catch_warnings` is not thread-safe and
    decoding runs in loader threads.)"""
    global _BOMB_FILTER_SET
    if not _BOMB_FILTER_SET:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _BOMB_FILTER_SET = True


_TAG_FILTER: list = []  # the filter entry `_tag_warnings_as_errors` adds, once known
_TAG_WARNINGS_LOCK = threading.Lock()


def _tag_warnings_as_errors() -> None:
    """Turn Pillow's EXIF/TIFF-tag `UserWarning`s (which name no file) into exceptions, so that
    `decode_image` can catch them and warn with the file's path instead (see there).

    Checked on every call: the filter must stay first, and the CLI (or a test harness) may have
    reset or prepended filters since the last call.
    """
    if not _TAG_FILTER or warnings.filters[:1] != _TAG_FILTER:
        with _TAG_WARNINGS_LOCK:
            if not _TAG_FILTER or warnings.filters[:1] != _TAG_FILTER:
                warnings.filterwarnings("error", category=UserWarning, module=r"PIL\.TiffImagePlugin")
                _TAG_FILTER[:] = warnings.filters[:1]


def decode_image(
    data: bytes, path: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Decoded:
    """Decode `data` into 8-bit RGB safely, or raise `ImageError` naming `path` and the reason.

    Handles EXIF orientation, CMYK, 16-bit, palette, alpha (composited on white), grayscale and
    animated images (first frame). Truncated files are errors, never silently padded. Images over
    `max_pixels` are refused from their header, before any pixel is decoded. Damaged EXIF or TIFF
    tags are not an error: a warning names the file and the tags are skipped.

    `draft_size`: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as the
    shorter side stays >= `draft_size` (see `extract` for the speed/accuracy trade-off).
    """
    _tag_warnings_as_errors()
    try:
        return _decode(data, path, max_pixels, draft_size)
    except UserWarning as w:  # raised by the filter above: Pillow found damaged EXIF/TIFF tags
        warnings.warn(f"{path}: damaged EXIF/TIFF tags ({w}); decoded without them", stacklevel=2)
        # Decode again with those warnings ignored. catch_warnings swaps the global filter list, so
        # one thread at a time (only this rare path changes the filters).
        with _TAG_WARNINGS_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
            return _decode(data, path, max_pixels, draft_size)


def _decode(data: bytes, path: str, max_pixels: int, draft_size: int | None) -> Decoded:
    """`decode_image` without the handling of damaged tags."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        _quiet_pil_bomb_warning()
        im = Image.open(io.BytesIO(data))  # raises DecompressionBombError far above our own limit
        w, h = im.size
        fmt = im.format or "unknown"
        if w <= 0 or h <= 0:
            raise ImageError(path, f"invalid image size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError(path, f"too many pixels ({w}x{h} > {max_pixels} limit; decompression bomb?)")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        if draft_size and fmt == "JPEG":
            # EXIF rotation by 90° swaps sides, but draft only looks at the shorter one: order-free.
            scale = min(w, h) / float(draft_size)
            if scale >= 2:
                im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        im.load()
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
    except (ImageError, UserWarning):
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            msg = f"truncated image ({msg})"
        raise ImageError(path, f"cannot decode: {msg}") from None
    except Exception as e:  # noqa: BLE001 - a plugin bug must not stop a run of 100,000 files
        raise ImageError(path, f"cannot decode: {type(e).__name__}: {e}") from None
    return Decoded(rgb, w, h, fmt)
