"""Training data for `clipdet finetune`: labelled listing, classes, validation split, augmentation, batches.

Images are read through the same safe decoding as `extract` (`read_file` + `decode_image`): a file
that cannot be used is reported once, at listing time, and left out of training. Classes are `real`
plus one class per generator (attribution); fakes without a generator form the class `unknown`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageError, UsageError
from ..extract.decode import decode_image, read_file, sha256_bytes
from ..extract.discover import ImageRef
from ..extract.views import apply_view

REAL_CLASS = "real"
UNKNOWN_GENERATOR = "unknown"


@dataclass(frozen=True)
class Item:
    """One usable training or validation image."""

    path: str
    sha256: str
    label: str  # "real" / "fake"
    generator: str  # "" for real images

    @property
    def class_name(self) -> str:
        """'real', or the generator of a fake ('unknown' when not named)."""
        return REAL_CLASS if self.label == REAL_CLASS else (self.generator or UNKNOWN_GENERATOR)


@dataclass
class Listing:
    """Usable images (first path of each content), files skipped (path, reason), and notes."""

    items: list[Item] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check(ref: ImageRef):
    """Read, hash and decode one file; returns (ref, sha256, error)."""
    try:
        data = read_file(ref.path)
        sha = sha256_bytes(data)
        decode_image(data, ref.path)
        return ref, sha, ""
    except ImageError as e:
        return ref, "", e.reason
    except Exception as e:  # noqa: BLE001 - one file never stops a run
        return ref, "", f"{type(e).__name__}: {e}"


def list_images(refs: Sequence[ImageRef], workers: int = 1) -> Listing:
    """Labelled, decodable images among `refs`, each content once; unusable files are reported in `errors`.

    Unlabelled images are counted in a note (label them by layout real/** and fake/<generator>/**
    or with a manifest). The same content under two paths is kept once (the first path).
    """
    from ..extract.pipeline import iter_prepared

    out = Listing()
    labelled = [r for r in refs if r.label in ("real", "fake")]
    if len(labelled) < len(refs):
        out.notes.append(f"{len(refs) - len(labelled)} unlabelled image(s) ignored "
                         "(layout real/** and fake/<generator>/**, or --manifest)")
    seen: dict[str, Item] = {}
    conflicts = 0
    for ref, sha, error in iter_prepared(labelled, workers, _check, prefetch=4 * max(1, workers)):
        if error:
            out.errors.append((ref.path, error))
            continue
        item = Item(ref.path, sha, ref.label, (ref.generator or "") if ref.label == "fake" else "")
        if sha in seen:
            conflicts += seen[sha].class_name != item.class_name
            continue
        seen[sha] = item
        out.items.append(item)
    if conflicts:
        out.notes.append(f"{conflicts} duplicate image(s) carry a different label than their first copy "
                         "(the first copy's label is used)")
    return out


def class_names(items: Sequence[Item]) -> list[str]:
    """Classes of a training set: 'real' first, then the generators in sorted order."""
    gens = sorted({it.class_name for it in items} - {REAL_CLASS})
    return [REAL_CLASS, *gens]


def need_classes(items: Sequence[Item], what: str) -> None:
    """`UsageError` unless `items` hold both real and fake images."""
    labels = {it.label for it in items}
    if labels != {"real", "fake"}:
        n_real = sum(it.label == "real" for it in items)
        raise UsageError(f"{what} needs labelled real and fake images; found real {n_real}, "
                         f"fake {len(items) - n_real} (layout real/** and fake/<generator>/**, or --manifest)")


def split_validation(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, val): about `fraction` of each class held out, chosen by SHA-256(seed:content hash).

    The draw depends only on the contents and the seed (not on paths or order); every class keeps
    at least one training image, and classes of two or more images give at least one to validation
    when `fraction > 0`.
    """
    if not 0 <= fraction < 1:
        raise UsageError(f"--val-fraction {fraction}: expected a number in [0, 1)")
    by_class: dict[str, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.class_name, []).append(it)
    train, val = [], []
    for name in sorted(by_class):
        members = sorted(by_class[name], key=lambda it: hashlib.sha256(f"{seed}:{it.sha256}".encode()).hexdigest())
        n = len(members)
        k = min(n - 1, max(1 if fraction > 0 and n >= 2 else 0, int(round(n * fraction))))
        val += members[:k]
        train += members[k:]
    order = {it.sha256: i for i, it in enumerate(items)}
    return sorted(train, key=lambda it: order[it.sha256]), sorted(val, key=lambda it: order[it.sha256])


@dataclass
class Augment:
    """Training view of one image: random resized crop to `size`, horizontal flip, optional JPEG / blur.

    All randomness comes from the `numpy.random.Generator` passed in, so a (seed, epoch, image)
    triple always gives the same pixels. JPEG and blur use `apply_view`, the robustness views of
    `extract --views`.
    """

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (60, 95)
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)

    def crop_box(self, w: int, h: int, rng) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box (10 tries, then the centre crop clamped to `ratio`)."""
        area = w * h
        log_r = (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(*log_r)))
            cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return left, top, left + cw, top + ch
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
        return left, top, left + cw, top + ch

    def __call__(self, image, rng) -> np.ndarray:
        """PIL RGB image → uint8 (size, size, 3) training view."""
        from PIL import Image

        if self.jpeg_p > 0 and rng.random() < self.jpeg_p:
            image = apply_view(image, f"jpeg:{int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))}")
        if self.blur_p > 0 and rng.random() < self.blur_p:
            image = apply_view(image, f"blur:{rng.uniform(*self.blur_sigma):.3f}")
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.uint8)


def load_view(item: Item, transform, rng=None):
    """Decode `item` safely and apply `transform` (`transform(image, rng)` when `rng` is given).

    Returns (array_or_tensor, error); a file that changed since listing is an error.
    """
    try:
        data = read_file(item.path)
        if sha256_bytes(data) != item.sha256:
            return None, "file changed since the run started"
        image = decode_image(data, item.path).image
        return (transform(image, rng) if rng is not None else transform(image)), ""
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - one file never stops a run
        return None, f"{type(e).__name__}: {e}"


def sample_rng(seed: int, epoch: int, item: Item):
    """The augmentation generator of one image in one epoch: independent of batch and order."""
    return np.random.default_rng([seed, epoch, int(item.sha256[:15], 16)])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of the `n` training images for `epoch` (a function of seed and epoch only)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
