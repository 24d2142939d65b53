"""images.py: discovery and labels, safe decoding of good and bad files, perturbation views."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdet.errors import ImageError, UsageError
from clipdet.extract.decode import decode_image, read_file, sha256_bytes
from clipdet.extract.discover import FAKE, REAL, ImageRef, discover, label_from_layout, read_manifest
from clipdet.extract.views import apply_view, canonical_view, parse_views


def _png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG", **save) if mode else Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims width x height RGB pixels (tiny IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _rgb(dec) -> np.ndarray:
    assert dec.image.mode == "RGB"
    return np.asarray(dec.image)


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    "path, expected",
    [
        ("data/real/x.png", (REAL, None)),
        ("data/real/a/b/c/x.png", (REAL, None)),
        ("/abs/deep/fake/sdxl/x.jpg", (FAKE, "sdxl")),
        ("fake/midjourney/v6/batch1/x.jpg", (FAKE, "midjourney")),
        ("fake/x.jpg", (FAKE, None)),
        ("Fake/GenA/x.jpg", (FAKE, "GenA")),
        ("REAL/x.jpg", (REAL, None)),
        ("fake/genA/real/x.png", (REAL, None)),  # innermost wins
        ("real/fake/genB/x.png", (FAKE, "genB")),
        ("photos/x.png", (None, None)),
        ("real.png", (None, None)),  # the file name itself is not a folder
        ("unreal/x.png", (None, None)),
    ],
)
def test_label_from_layout(path, expected):
    assert label_from_layout(path) == expected


def test_discover_tree_labels_order_and_extensions(tmp_path, make_image):
    root = tmp_path / "d"
    make_image(root / "real" / "r1.png")
    make_image(root / "real" / "deeper" / "x" / "r2.JPG")
    make_image(root / "fake" / "genA" / "f1.webp", fmt="WEBP")
    make_image(root / "fake" / "genB" / "sub" / "f2.bmp")
    make_image(root / "fake" / "loose.png")
    make_image(root / "other" / "u.png")
    (root / "real" / "notes.txt").write_text("not an image")
    make_image(root / "real" / ".hidden.png")
    make_image(root / ".hiddendir" / "real" / "h.png")
    refs = discover([str(root)])
    got = {os.path.relpath(r.path, root): (r.label, r.generator) for r in refs}
    assert got == {
        "fake/genA/f1.webp": (FAKE, "genA"),
        "fake/genB/sub/f2.bmp": (FAKE, "genB"),
        "fake/loose.png": (FAKE, None),
        "other/u.png": (None, None),
        "real/deeper/x/r2.JPG": (REAL, None),
        "real/r1.png": (REAL, None),
    }
    # stable order (each folder: its files sorted, then its sub-folders sorted); a repeated input is kept once
    assert [os.path.relpath(r.path, root) for r in refs] == [
        "fake/loose.png", "fake/genA/f1.webp", "fake/genB/sub/f2.bmp", "other/u.png", "real/r1.png",
        "real/deeper/x/r2.JPG",
    ]
    assert [r.path for r in refs] == [r.path for r in discover([str(root), str(root)])]


def test_discover_explicit_files_kept_whatever_extension(tmp_path):
    f = tmp_path / "real" / "weird.dat"
    f.parent.mkdir()
    f.write_bytes(b"xx")
    refs = discover([str(f)])
    assert refs == [ImageRef(str(f), REAL, None)]
    with pytest.raises(UsageError, match="no such file"):
        discover([str(tmp_path / "missing.png")])


def test_discover_stdin_list(tmp_path, make_image):
    a = make_image(tmp_path / "fake" / "g" / "a.png")
    b = make_image(tmp_path / "b.png")
    refs = discover(["-"], stdin=io.StringIO(f"{a}\n\n  {b}  \n{a}\n"))
    assert refs == [ImageRef(str(a), FAKE, "g"), ImageRef(str(b), None, None)]


def test_manifest_labels_aliases_and_fallback(tmp_path, make_image):
    for n in ("a", "b", "c", "d", "e"):
        make_image(tmp_path / "imgs" / f"{n}.png")
    make_image(tmp_path / "fake" / "genZ" / "f.png")
    abs_path = str(tmp_path / "imgs" / "e.png")
    m = tmp_path / "m.csv"
    m.write_text(
        "path,label,generator\n"
        "imgs/a.png,real,\n"
        "imgs/b.png,1,dalle\n"
        "imgs/c.png,Generated,\n"
        "imgs/d.png,0,ignored-for-real\n"
        f"{abs_path},,\n"
        "fake/genZ/f.png,,\n"
        ",,\n"
    )
    refs = read_manifest(m)
    assert refs == [
        ImageRef(str(tmp_path / "imgs" / "a.png"), REAL, None),
        ImageRef(str(tmp_path / "imgs" / "b.png"), FAKE, "dalle"),
        ImageRef(str(tmp_path / "imgs" / "c.png"), FAKE, None),
        ImageRef(str(tmp_path / "imgs" / "d.png"), REAL, None),
        ImageRef(abs_path, None, None),
        ImageRef(str(tmp_path / "fake" / "genZ" / "f.png"), FAKE, "genZ"),
    ]
    assert discover([], manifest=str(m)) == refs


@pytest.mark.parametrize(
    "text, match",
    [("file,label\na.png,real\n", "'path' column"), ("path,label\na.png,maybe\n", "m.csv:2: label 'maybe'")],
)
def test_manifest_errors(tmp_path, text, match):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(UsageError, match=match):
        read_manifest(m)
    with pytest.raises(UsageError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------ reading
def test_read_file_errors(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
        read_file(str(empty))
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 100)
    with pytest.raises(ImageError, match="file too large"):
        read_file(str(big), max_bytes=99)
    assert read_file(str(big)) == b"x" * 100
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="unreadable"):
        read_file(str(link))
    d = tmp_path / "dir.jpg"
    d.mkdir()
    with pytest.raises(ImageError, match="unreadable"):
        read_file(str(d))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_read_file_permission_denied(tmp_path):
    f = tmp_path / "locked.png"
    f.write_bytes(b"\x89PNG....")
    f.chmod(0)
    try:
        with pytest.raises(ImageError, match="unreadable"):
            read_file(str(f))
    finally:
        f.chmod(0o644)


def test_sha256_is_content_key():
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ------------------------------------------------------------------------------------------ decoding
def test_decode_good_rgb_png_is_exact():
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    dec = decode_image(_png(arr), "x.png")
    assert (dec.width, dec.height, dec.format) == (40, 30, "PNG")
    np.testing.assert_array_equal(_rgb(dec), arr)


def test_decode_16bit_png_scaled_to_8bit():
    a16 = np.linspace(0, 65535, 48 * 32).round().astype(np.uint16).reshape(32, 48)
    data = _png(a16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = _rgb(decode_image(data, "g16.png"))
    want = np.rint(a16 / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], want)
    assert out.min() == 0 and out.max() == 255


def test_decode_16bit_png_narrow_range_not_stretched():
    a16 = np.full((10, 10), 257 * 40, np.uint16)  # 8-bit value 40 everywhere
    a16[0, 0] = 257 * 50
    out = _rgb(decode_image(_png(a16), "narrow.png"))
    assert out[5, 5, 0] == 40 and out[0, 0, 0] == 50


def test_decode_palette_with_transparency_composited_on_white():
    p = Image.new("P", (20, 10), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.paste(1, (10, 0, 20, 10))
    out = _rgb(decode_image(_save(p, "PNG", transparency=0), "p.png"))
    assert tuple(out[5, 2]) == (255, 255, 255)  # transparent red → white
    assert tuple(out[5, 15]) == (0, 255, 0)


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("RGBA", (200, 100, 0, 255), (200, 100, 0)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_decode_alpha_and_grey_modes(mode, colour, expected):
    out = _rgb(decode_image(_save(Image.new(mode, (12, 9), colour), "PNG"), f"{mode}.png"))
    assert out.shape == (9, 12, 3)
    np.testing.assert_allclose(out[4, 6], expected, atol=1)


def test_decode_cmyk_jpeg():
    data = _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = _rgb(decode_image(data, "cmyk.jpg"))
    np.testing.assert_allclose(out[15, 20], (255, 0, 0), atol=6)  # no-cyan, full magenta+yellow = red


def test_decode_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    dec = decode_image(data, "anim.gif")
    assert dec.format == "GIF"
    out = _rgb(dec)
    assert tuple(out[10, 10]) == (255, 0, 0)


def test_decode_exif_orientation_6_rotates(make_image, tmp_path):
    arr = np.asarray(Image.open(make_image(tmp_path / "src.png", size=(80, 50), seed=3)))
    plain = _save(Image.fromarray(arr), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    a = _rgb(decode_image(plain, "plain.jpg"))
    b_dec = decode_image(rotated, "rot.jpg")
    b = _rgb(b_dec)
    assert a.shape == (50, 80, 3)
    assert b.shape == (80, 50, 3)  # sides swapped
    np.testing.assert_array_equal(b, np.rot90(a, k=-1))  # orientation 6 = rotate 90° clockwise to display


def _bad_files() -> dict[str, bytes]:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = _png(arr)
    jpg = _save(Image.fromarray(arr), "JPEG", quality=90)
    return {
        "empty.jpg": b"",
        "trunc.jpg": jpg[: len(jpg) // 2],
        "trunc_tail.jpg": jpg[:-200],
        "trunc.png": png[: len(png) // 2],
        "text.jpg": b"this is a text file, not a JPEG\n" * 3,
        "bomb.png": png_header_only(100_000, 100_000),
        "zero.png": png_header_only(0, 10),
    }


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.jpg", "empty file"),
        ("trunc.jpg", "truncated"),
        ("trunc_tail.jpg", "truncated"),
        ("trunc.png", "truncated"),
        ("text.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
        ("zero.png", "cannot decode|invalid image size|not an image"),
    ],
)
def test_decode_bad_bytes_raise_image_error(name, reason):
    with pytest.raises(ImageError) as ei:
        decode_image(_bad_files()[name], name)
    assert ei.value.path == name
    assert pytest.importorskip("re").search(reason, ei.value.reason), ei.value.reason
    assert "\n" not in str(ei.value)


def test_decode_max_pixels_checked_from_header():
    # 9000 x 9000 is below Pillow's own bomb limit but above our limits: refused from the header
    with pytest.raises(ImageError, match=r"too many pixels \(9000x9000 > 64000000"):
        decode_image(png_header_only(9000, 9000), "big.png")
    with pytest.raises(ImageError, match=r"too many pixels \(3000x2000 > 1000000"):
        decode_image(png_header_only(3000, 2000), "big.png", max_pixels=1_000_000)
    # a caller who raises max_pixels gets its limit, not Pillow's warning level (decoding is attempted;
    # this header-only file then fails as truncated) ...
    with pytest.raises(ImageError, match="truncated"):
        decode_image(png_header_only(12_000, 12_000), "warn.png", max_pixels=10**12)
    # ... but Pillow's hard limit (2 x MAX_IMAGE_PIXELS) still refuses before any decoding
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_header_only(20_000, 20_000), "bomb.png", max_pixels=10**12)
    arr = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ImageError, match="too many pixels"):
        decode_image(_png(arr), "ok-but-limited.png", max_pixels=1599)
    assert decode_image(_png(arr), "ok.png", max_pixels=1600).width == 40


def test_decode_draft_keeps_short_side(make_image, tmp_path):
    data = Path(make_image(tmp_path / "big.jpg", size=(800, 600), seed=1)).read_bytes()
    full = decode_image(data, "big.jpg")
    draft = decode_image(data, "big.jpg", draft_size=64)
    assert full.image.size == (800, 600)
    assert (draft.width, draft.height) == (800, 600)  # header size recorded
    assert min(draft.image.size) >= 64 and draft.image.size[0] < 800


# ------------------------------------------------------------------------------------------ views
def test_parse_views_canonical_and_clean_first():
    assert parse_views(None) == ["clean"]
    assert parse_views("") == ["clean"]
    assert parse_views("jpeg:075, resize:0.50,blur:1,crop:32,clean,jpeg:75") == [
        "clean", "jpeg:75", "resize:0.5", "blur:1", "crop:32"]
    assert parse_views(["JPEG:50", " blur:0.5 "]) == ["clean", "jpeg:50", "blur:0.5"]
    assert canonical_view("Resize:2") == "resize:2"


@pytest.mark.parametrize(
    "spec",
    ["jpeg", "jpeg:", "jpeg:0", "jpeg:101", "jpeg:high", "resize:0", "resize:100", "resize:nan",
     "blur:0", "blur:-1", "blur:inf", "crop:4", "crop:1.5", "sharpen:2", "clean:1", "jpeg:75,bogus"],
)
def test_parse_views_rejects_bad_specs(spec):
    with pytest.raises(UsageError) as ei:
        parse_views(spec)
    msg = str(ei.value)
    assert "view" in msg and "\n" not in msg
    assert ("bad argument" in msg) or ("views are:" in msg)


@pytest.mark.parametrize("view", ["jpeg:90", "jpeg:30", "resize:0.5", "resize:2", "blur:1", "blur:3", "crop:40"])
def test_views_change_pixels(view, make_image, tmp_path):
    src = Image.open(make_image(tmp_path / "v.png", size=(96, 72), seed=5)).convert("RGB")
    before = np.asarray(src).copy()
    out = apply_view(src, view)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(src), before)  # the input is not modified
    kind, _, arg = view.partition(":")
    a = np.asarray(out)
    if kind == "resize":
        f = float(arg)
        assert out.size == (round(96 * f), round(72 * f))
    elif kind == "crop":
        assert out.size == (40, 40)
        np.testing.assert_array_equal(a, before[16:56, 28:68])  # centred
    else:
        assert out.size == src.size
        diff = np.abs(a.astype(int) - before.astype(int)).mean()
        assert diff > 0.5, f"{view} barely changed the image (mean abs diff {diff})"
    if kind in ("jpeg", "blur"):
        assert not np.array_equal(a, before)


def test_view_strength_is_monotonic(make_image, tmp_path):
    src = Image.open(make_image(tmp_path / "v.png", size=(96, 72), seed=6)).convert("RGB")
    base = np.asarray(src).astype(int)

    def dist(view):
        return np.abs(np.asarray(apply_view(src, view)).astype(int) - base).mean()

    assert dist("jpeg:95") < dist("jpeg:20")
    assert dist("blur:0.5") < dist("blur:3")


def test_clean_and_oversized_crop_return_same_pixels(make_image, tmp_path):
    src = Image.open(make_image(tmp_path / "v.png", size=(50, 40), seed=7)).convert("RGB")
    assert apply_view(src, "clean") is src
    np.testing.assert_array_equal(np.asarray(apply_view(src, "crop:224")), np.asarray(src))
