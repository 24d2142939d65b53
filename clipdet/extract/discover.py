"""Finding images: folders (labels from the real/** and fake/<generator>/** layout) and manifests."""

from __future__ import annotations

import csv
import errno
import io
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import NoImagesError, UsageError, printable

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm",
    ".avif",
}

REAL, FAKE = "real", "fake"


@dataclass(frozen=True)
class ImageRef:
    """One input image: its path and, when known, its label ("real"/"fake") and generator."""

    path: str
    label: str | None = None
    generator: str | None = None
    error: str | None = None  # set by discovery for an input that cannot be used (e.g. an unreadable folder)
    caption: str | None = None  # from a manifest `caption` column (features image+text / residual)
    also: tuple = ()  # other (label, generator) a manifest gives the same path: recorded as a label conflict


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
            gen = printable(parts[i + 1]) if i + 1 < len(parts) else None  # a name, never opened: shown form
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


def _symlink_loop(path: str) -> bool:
    """Whether `path` is a symlink that never resolves (ELOOP: `a -> a`, or `a -> b -> a`)."""
    if not os.path.islink(path):
        return False
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _walk(folder: Path, found: Discovered) -> Iterator[ImageRef]:
    """Images under `folder`: each folder's files sorted, then its sub-folders sorted; hidden names skipped.

    Symlinked sub-folders are followed; a folder already visited (a loop, or two links to one folder)
    is entered once and the skip noted; a symlink that never resolves (ELOOP, file or folder) is noted
    and skipped. A folder that cannot be listed becomes an `ImageRef` with an
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
            if _symlink_loop(e.path):
                found.notes.append(f"{e.path}: symlink loop (Too many levels of symbolic links); skipped")
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                dirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS or (_is_file(e) and _pillow_opens(e.path)):
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
        elif _symlink_loop(item):  # named explicitly: reported like an unreadable file
            refs.append(ImageRef(item, *label_from_layout(p), error="symlink loop (Too many levels of symbolic links)"))
        elif p.exists() or p.is_symlink():
            refs.append(ImageRef(str(p), *label_from_layout(p)))
        else:
            raise UsageError(f"{item}: no such file or folder")
    first: dict[str, int] = {}
    for r in refs:
        i = first.get(r.path)
        if i is None:
            first[r.path] = len(found)
            found.append(r)
        elif _disagree(found[i], r):  # kept once, the other label kept too: the cache records a conflict
            found[i] = replace(found[i], also=found[i].also + ((r.label, r.generator),))
    return found


def without_labels(refs: Iterable[ImageRef]) -> list[ImageRef]:
    """`refs` with label and generator cleared, for embedding images that are not references (score, eval,
    --calibrate): the cache records them unlabelled, so `fit` never draws them (paths and captions kept)."""
    return [replace(r, label=None, generator=None, also=()) if (r.label or r.generator or r.also) else r
            for r in refs]


def _disagree(kept: ImageRef, other: ImageRef) -> bool:
    """Whether `other` (the same path again) gives a label or generator that contradicts `kept`'s."""
    from ..cache.conflicts import conflicted

    obs = (other.label, other.generator)
    if obs in kept.also or not other.label or obs == (kept.label, kept.generator):
        return False
    return conflicted([(kept.label or "", kept.generator or ""), (other.label, other.generator or "")] +
                      [(lab, gen or "") for lab, gen in kept.also])


def require_images(refs: list[ImageRef], inputs: Iterable[str] = ()) -> None:
    """Raise `NoImagesError` ("no images found in PATH", exit code 1) when `refs` is empty."""
    if not refs:
        where = list(getattr(refs, "empty", [])) or [str(i) for i in inputs] or ["the inputs"]
        raise NoImagesError(f"no images found in {', '.join(where)}")
