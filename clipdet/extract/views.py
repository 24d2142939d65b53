"""Views (perturbations) of a decoded image: jpeg:Q, resize:F, blur:S, crop:N, tile:N:K; real and fake get
the same operation."""

from __future__ import annotations

import io
from collections.abc import Iterable

from ..errors import UsageError

# ---------------------------------------------------------------------------------------------
# Views (perturbations). Real and fake images get exactly the same operation.

VIEW_KINDS = {
    "clean": "the image as decoded",
    "jpeg": "re-encode as JPEG at quality Q (jpeg:75)",
    "resize": "rescale both sides by factor F with bicubic filtering (resize:0.5)",
    "blur": "Gaussian blur with sigma S pixels (blur:1.0)",
    "crop": "centre crop to N x N pixels, or the whole image if smaller (crop:224)",
    "tile": "tile K of a deterministic grid of N x N crops at the image's own resolution, no resize "
            "(tile:224:0; K beyond the image's grid wraps around)",
}


def tile_grid(width: int, height: int, n: int) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of an image's N x N tiles, row by row: ceil(W/N) x ceil(H/N)
    tiles spread evenly from edge to edge (neighbours overlap rather than leave a strip out); a side
    shorter than N gives one tile of its whole length."""
    def starts(size: int) -> list[int]:
        if size <= n:
            return [0]
        k = -(-size // n)
        return [round(i * (size - n) / (k - 1)) for i in range(k)]

    cw, ch = min(n, width), min(n, height)
    return [(x, y, x + cw, y + ch) for y in starts(height) for x in starts(width)]


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
        if kind == "tile":
            size, sep, idx = arg.partition(":")
            n, k = int(size), int(idx) if sep else 0
            if n < 8 or k < 0:
                raise ValueError
            return f"tile:{n}:{k}"
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
    if kind == "tile":
        size, _, idx = arg.partition(":")
        boxes = tile_grid(*image.size, int(size))
        return image.crop(boxes[int(idx or 0) % len(boxes)])
    raise UsageError(f"unknown view {view!r}")


def tile_views(size: int, count: int) -> list[str]:
    """The view names of the first `count` tiles of the `size` grid: tile:SIZE:0 ... tile:SIZE:count-1."""
    return [f"tile:{int(size)}:{k}" for k in range(int(count))]
