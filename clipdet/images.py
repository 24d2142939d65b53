"""Image discovery (labels from layout or manifest), safe decoding, and perturbation views."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageError, NoImagesError, UsageError

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm",
    ".avif",
}
#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 64_000_000
#: Files larger than this are refused before reading.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

REAL, FAKE = "real", "fake"


@dataclass(frozen=True)
class ImageRef:
    """One input image: its path and, when known, its label ("real"/"fake") and generator."""

    path: str
    label: str | None = None
    generator: str | None = None
    error: str | None = None  # set by discovery for an input that cannot be used (e.g. an unreadable folder)
    caption: str | None = None  # from a manifest `caption` column (features image+text / residual)


class Discovered(list):
    """The `ImageRef`s `discover` found (a plain list), plus what it skipped and why.

    `not_images`: files inside folders that Pillow cannot open (skipped); `empty`: inputs in which no
    image was found; `notes`: other remarks (symlinked folders not entered again, loops).
    """

    def __init__(self, refs=()):
        super().__init__(refs)
        self.not_images: list[str] = []
        self.empty: list[str] = []
        self.notes: list[str] = []

    def summary(self, limit: int = 3) -> str:
        """'N file(s) not images (skipped): a.txt, b.heic, ...', or '' when every file was an image."""
        if not self.not_images:
            return ""
        shown = ", ".join(self.not_images[:limit]) + (", ..." if len(self.not_images) > limit else "")
        return f"{len(self.not_images)} file(s) not images (skipped): {shown}"


def label_from_layout(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """Label and generator read from the layout `real/**` or `fake/<generator>/**`.

    The innermost `real` or `fake` folder in the path wins, at any depth. A file directly inside
    `fake/` is fake with an unknown generator (None).
    """
    parts = [p for p in os.fspath(path).split(os.sep) if p and p != "."][:-1]  # Path.parts, without its cost
    for i in range(len(parts) - 1, -1, -1):
        name = parts[i].lower()
        if name == REAL:
            return REAL, None
        if name == FAKE:
            gen = parts[i + 1] if i + 1 < len(parts) else None
            return FAKE, gen
    return None, None


def _normalise_label(value: str | None, where: str) -> str | None:
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    aliases = {"0": REAL, "1": FAKE, "real": REAL, "fake": FAKE, "generated": FAKE, "synthetic": FAKE}
    if v not in aliases:
        raise UsageError(f"{where}: label {value!r} is not one of real/fake/0/1")
    return aliases[v]


def read_manifest(manifest: str | os.PathLike) -> list[ImageRef]:
    """Rows of a CSV manifest with columns `path` (required), `label`, `generator`, `caption`.

    Relative paths are resolved against the manifest's folder. An empty label falls back to the layout.
    """
    mpath = Path(manifest)
    if not mpath.is_file():
        raise UsageError(f"{mpath}: manifest not found")
    base = mpath.parent
    refs: list[ImageRef] = []
    raw = mpath.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheets write a BOM
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{mpath}: not UTF-8 (byte 0x{raw[e.start]:02x} at line {line}); save it as UTF-8") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise UsageError(f"{mpath}: manifest needs a 'path' column (got {reader.fieldnames})")
        for lineno, row in enumerate(reader, start=2):
            p = (row.get("path") or "").strip()
            if not p:
                continue
            full = p if os.path.isabs(p) else str(base / p)
            label = _normalise_label(row.get("label"), f"{mpath}:{lineno}")
            gen = (row.get("generator") or "").strip() or None
            if label is None:
                label, lgen = label_from_layout(full)
                gen = gen or lgen
            if label == REAL:
                gen = None
            caption = (row.get("caption") or "").strip() or None
            refs.append(ImageRef(full, label, gen, caption=caption))
    return refs


def _pillow_opens(path: str) -> bool:
    """Whether Pillow identifies `path` as an image it can decode (reads the header only)."""
    from PIL import Image, ImageFile

    try:
        with Image.open(path) as im:
            return not isinstance(im, ImageFile.StubImageFile)  # HDF5/GRIB/BUFR stubs decode nothing
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image to us
        return False


def _walk(folder: Path, found: Discovered) -> Iterator[ImageRef]:
    """Images under `folder`: each folder's files sorted, then its sub-folders sorted; hidden names skipped.

    Symlinked sub-folders are followed; a folder already visited (a loop, or two links to one folder)
    is entered once and the skip noted. A folder that cannot be listed becomes an `ImageRef` with an
    error (reported like an unreadable file). Files with an image extension are kept; others are kept
    when Pillow can open them, else counted in `found.not_images`.
    """
    visited: set[tuple[int, int]] = set()

    def visit(d: str) -> Iterator[ImageRef]:
        try:
            st = os.stat(d)
            key = (st.st_dev, st.st_ino)
            if key in visited:
                found.notes.append(f"{d}: folder already visited through another path (symlink loop?); "
                                   "not entered again")
                return
            visited.add(key)
            with os.scandir(d) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            yield ImageRef(d, *label_from_layout(os.path.join(d, "x")),
                           error=f"cannot list folder: {e.strerror or e}")
            return
        dirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                dirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS or (e.is_file() and _pillow_opens(e.path)):
                yield ImageRef(e.path, *label_from_layout(e.path))
            else:
                found.not_images.append(e.path)
        for sub in dirs:
            yield from visit(sub)

    yield from visit(str(folder))


def discover(
    inputs: Iterable[str], manifest: str | None = None, stdin: Iterable[str] | None = None
) -> Discovered:
    """Expand folders (recursively), files and `-` (paths on stdin) into refs (a `Discovered` list).

    Inside folders, files with an image extension are kept, and any other file Pillow can open (say
    `.avif`, or a PNG without extension); the rest are listed in `.not_images`. Symlinked folders are
    followed (each folder entered once); a folder that cannot be listed becomes a ref with `.error`.
    Order is stable: inputs in the order given, each folder walked in sorted order; a path seen twice
    is kept once. Files named explicitly are kept whatever their extension (so a bad file is
    reported, not silently ignored). A path that does not exist raises `UsageError`.
    Inputs that yielded no image are listed in `.empty` (see `require_images`).
    """
    refs: list[ImageRef] = []
    found = Discovered()
    if manifest:
        refs.extend(read_manifest(manifest))
        if not refs:
            found.empty.append(str(manifest))
    for item in inputs:
        before = len(refs)
        if item == "-":
            lines = stdin if stdin is not None else sys.stdin
            for line in lines:
                line = line.strip()
                if line:
                    refs.append(ImageRef(line, *label_from_layout(line)))
            if len(refs) == before:
                found.empty.append("- (stdin)")
            continue
        p = Path(item)
        if p.is_dir():
            refs.extend(_walk(p, found))
            if len(refs) == before:
                found.empty.append(item)
        elif p.exists() or p.is_symlink():
            refs.append(ImageRef(str(p), *label_from_layout(p)))
        else:
            raise UsageError(f"{item}: no such file or folder")
    seen: set[str] = set()
    for r in refs:
        if r.path not in seen:
            seen.add(r.path)
            found.append(r)
    return found


def require_images(refs: list[ImageRef], inputs: Iterable[str] = ()) -> None:
    """Raise `NoImagesError` ("no images found in PATH", exit code 1) when `refs` is empty."""
    if not refs:
        where = list(getattr(refs, "empty", [])) or [str(i) for i in inputs] or ["the inputs"]
        raise NoImagesError(f"no images found in {', '.join(where)}")


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


# ---------------------------------------------------------------------------------------------
# Views (perturbations). Real and fake images get exactly the same operation.

VIEW_KINDS = {
    "clean": "the image as decoded",
    "jpeg": "re-encode as JPEG at quality Q (jpeg:75)",
    "resize": "rescale both sides by factor F with bicubic filtering (resize:0.5)",
    "blur": "Gaussian blur with sigma S pixels (blur:1.0)",
    "crop": "centre crop to N x N pixels, or the whole image if smaller (crop:224)",
}


def parse_views(spec: str | Iterable[str] | None) -> list[str]:
    """Canonical view names from 'jpeg:75,resize:0.5'; `clean` is always first and always present."""
    if spec is None:
        items: list[str] = []
    elif isinstance(spec, str):
        items = [s for s in (x.strip() for x in spec.split(",")) if s]
    else:
        items = [s.strip() for s in spec if s.strip()]
    out = ["clean"]
    for item in items:
        name = canonical_view(item)
        if name not in out:
            out.append(name)
    return out


def canonical_view(item: str) -> str:
    """Validate one view spec and return its canonical spelling (e.g. 'jpeg:075' → 'jpeg:75')."""
    kind, _, arg = item.strip().lower().partition(":")
    if kind == "clean" and not arg:
        return "clean"
    if kind not in VIEW_KINDS or kind == "clean":
        raise UsageError(f"unknown view {item!r}; views are: " + "; ".join(f"{k}: {v}" for k, v in VIEW_KINDS.items()))
    try:
        if kind == "jpeg":
            q = int(arg)
            if not 1 <= q <= 100:
                raise ValueError
            return f"jpeg:{q}"
        if kind == "crop":
            n = int(arg)
            if n < 8:
                raise ValueError
            return f"crop:{n}"
        x = float(arg)
        if kind == "resize" and not 0.01 <= x <= 8:
            raise ValueError
        if kind == "blur" and not 0 < x <= 50:
            raise ValueError
        return f"{kind}:{x:g}"
    except ValueError:
        raise UsageError(f"view {item!r}: bad argument {arg!r} ({VIEW_KINDS[kind]})") from None


def apply_view(image, view: str):
    """Return `image` (PIL RGB) perturbed by `view`; `clean` returns it unchanged."""
    from PIL import Image, ImageFilter

    if view == "clean":
        return image
    kind, _, arg = view.partition(":")
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(arg))
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out.convert("RGB")
    if kind == "resize":
        f = float(arg)
        w, h = image.size
        return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=float(arg)))
    if kind == "crop":
        n = int(arg)
        w, h = image.size
        cw, ch = min(n, w), min(n, h)
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    raise UsageError(f"unknown view {view!r}")
