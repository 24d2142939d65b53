"""`clipdet extract` / `clipdet cache ...` end to end: output, exit codes, bad inputs, kill -9, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import single_segment
from PIL import Image

from clipdet.cache import FeatureCache
from clipdet.extract.decode import sha256_bytes

CLIPDET = [sys.executable, "-m", "clipdet"]


def _sha(path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def _key(spec: str) -> str:
    from clipdet.backbones import describe_backbone

    return describe_backbone(spec).key


def _no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr.replace("clipdet: error:", "")


def _plain(cache: str, key: str, view: str = "clean") -> list[str]:
    """sha256 rows of one feature group, read from every segment the catalogue names (plain h5py), plus
    segments of a killed writer not yet in the catalogue (as the next writer adopts them)."""
    srcs = []
    if os.path.exists(cache):
        with h5py.File(cache, "r") as cat:
            srcs = [os.path.join(cache + ".d", n.decode()) for n in cat["segment_names"][()]]
    d = cache + ".d"
    if os.path.isdir(d):
        srcs += [os.path.join(d, n) for n in sorted(os.listdir(d))
                 if n.startswith("seg-") and n.endswith(".h5") and os.path.join(d, n) not in srcs]
    out = []
    for s in srcs:
        with h5py.File(s, "r") as f:
            g = f.get(f"features/{key}/{view}")
            if g is not None:
                e = g["embedding"][()]
                assert e.dtype == np.float16 and e.shape == (len(g["sha256"]), 32)
                out += [h.decode() for h in g["sha256"][()]]
    return out


# ------------------------------------------------------------------------------------------ basics
def test_extract_then_rerun_idempotent(labelled_tree, tmp_path, tiny_spec, run_cli):
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "--views", "jpeg:60,resize:0.5",
                "--batch-size", "4", "-q")
    assert r.exit_code == 0, r.stderr
    assert "24 images: 0 cached, 24 new, 0 skipped" in r.stdout
    assert "views clean,jpeg:60,resize:0.5" in r.stdout
    _no_traceback(r)
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "--views", "jpeg:60,resize:0.5", "-q")
    assert r.exit_code == 0 and "24 images: 24 cached, 0 new, 0 skipped" in r.stdout
    key = _key(tiny_spec)
    for view in ("clean", "jpeg:60", "resize:0.5"):
        rows = _plain(cache, key, view)
        assert len(rows) == len(set(rows)) == 24
    # cache info --json: per backbone/view image counts, labels and generators
    r = run_cli("cache", "info", "-c", cache, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["images"] == 24 and info["errors"] == 0 and info["format_version"] == 2
    feats = {f["view"]: f for f in info["features"]}
    assert set(feats) == {"clean", "jpeg:60", "resize:0.5"}
    for f in feats.values():
        assert f["backbone_key"] == key and f["backbone"] == tiny_spec and f["images"] == 24 and f["dim"] == 32
        assert f["labels"] == {"fake": 16, "real": 8}
        assert f["generators"] == {"genA": 8, "genB": 8}
    r = run_cli("cache", "info", "-c", cache)
    assert r.exit_code == 0 and "24 images" in r.stdout and "generators: genA 8, genB 8" in r.stdout


def test_moved_file_cached_by_content(labelled_tree, tmp_path, tiny_spec, run_cli):
    cache = str(tmp_path / "c.h5")
    assert run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q").exit_code == 0
    src = labelled_tree / "fake" / "genB" / "genB_02.png"
    dst = labelled_tree / "fake" / "genB" / "later" / "renamed.png"
    dst.parent.mkdir()
    src.rename(dst)
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 0 and "24 images: 24 cached, 0 new" in r.stdout
    with single_segment(cache) as f:
        im = f["images"]
        i = [h.decode() for h in im["sha256"][()]].index(_sha(dst))
        assert im["paths"][i].decode().split("\n") == [str(src.resolve()), str(dst.resolve())]
        assert len(im["sha256"]) == 24


def test_stdin_list_and_manifest(tmp_path, make_image, tiny_spec, run_cli):
    a = make_image(tmp_path / "x" / "fake" / "sd15" / "deep" / "a.png", seed=1, fake=True)
    b = make_image(tmp_path / "x" / "real" / "b.jpg", seed=2)
    c = make_image(tmp_path / "x" / "misc" / "c.png", seed=3)
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", "-", "-b", tiny_spec, "-c", cache, "-q", input=f"{a}\n{b}\n\n{c}\n")
    assert r.exit_code == 0 and "3 images: 0 cached, 3 new" in r.stdout
    imgs = FeatureCache(cache).images()
    assert (imgs[_sha(a)].label, imgs[_sha(a)].generator) == ("fake", "sd15")
    assert imgs[_sha(b)].label == "real" and imgs[_sha(c)].label == ""
    # a manifest relabels content already cached and adds new files
    d = make_image(tmp_path / "x" / "misc" / "d.png", seed=4)
    m = tmp_path / "x" / "m.csv"
    m.write_text("path,label,generator\nmisc/c.png,fake,dalle3\nmisc/d.png,real,\n")
    r = run_cli("extract", "--manifest", m, "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 0 and "2 images: 1 cached, 1 new" in r.stdout
    imgs = FeatureCache(cache).images()
    assert (imgs[_sha(c)].label, imgs[_sha(c)].generator) == ("fake", "dalle3")
    assert imgs[_sha(d)].label == "real"
    info = FeatureCache(cache).info()["features"][0]
    assert info["labels"] == {"fake": 2, "real": 2} and info["generators"] == {"dalle3": 1, "sd15": 1}


def test_usage_errors_are_one_line_exit_2(tmp_path, tiny_spec, run_cli, make_image):
    make_image(tmp_path / "i" / "a.png")
    cache = str(tmp_path / "c.h5")
    cases = [
        (["extract", tmp_path / "i", "-b", tiny_spec, "-c", cache, "--views", "jpeg:500"], "bad argument"),
        (["extract", tmp_path / "i", "-b", tiny_spec, "-c", cache, "--views", "sepia:1"], "unknown view"),
        (["extract", tmp_path / "nope", "-b", tiny_spec, "-c", cache], "no such file"),
        (["extract", "-b", tiny_spec, "-c", cache], "give at least one PATH"),
        (["extract", tmp_path / "i", "-b", "clipdet-tiny", "-c", cache], "expected ARCH:WEIGHTS"),
        (["extract", tmp_path / "i", "-b", tiny_spec, "-c", cache, "--layers", "last"], "--layers"),
        (["extract", tmp_path / "i", "-b", tiny_spec, "-c", cache, "--layers", "5"], "has 2 transformer blocks"),
        (["cache", "info", "-c", cache], "no feature cache here yet"),
    ]
    for args, msg in cases:
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clipdet: error:") and msg in lines[0], (args, r.stderr)
    assert not os.path.exists(cache)


def test_pretrained_tag_offline_and_random_warning(tmp_path, make_image, run_cli, monkeypatch):
    monkeypatch.setenv("CLIPDET_WEIGHTS_DIR", str(tmp_path / "wcache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for i in range(6):
        make_image(tmp_path / "i" / f"{i}.png", seed=i)
    r = run_cli("extract", tmp_path / "i", "-b", "ViT-L-14:openai", "-c", tmp_path / "c.h5", "-q")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "are not cached and cannot be downloaded" in lines[0]
    assert "ViT-L-14:/path/to/" in lines[0]


@pytest.mark.slow
def test_random_weights_warn_on_stderr(tmp_path, make_image, subprocess_env):
    """A real process (pytest would swallow the warning in-process): the warning is on stderr, once."""
    for i in range(3):
        make_image(tmp_path / "i" / f"{i}.png", seed=i)
    r = subprocess.run(CLIPDET + ["extract", str(tmp_path / "i"), "-b", "clipdet-tiny:random", "-c",
                                  str(tmp_path / "r.h5"), "-q", "--workers", "2"],
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "3 new" in r.stdout
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("clipdet: warning:")]
    assert len(warn) == 1 and "RANDOM weights" in warn[0] and "scores mean nothing" in warn[0]
    assert "Traceback" not in r.stderr and "initialized randomly" not in r.stderr


def test_layers_option_stores_cls_tokens(labelled_tree, tmp_path, tiny_spec, run_cli, make_image):
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "--layers", "-1,-2", "-q")
    assert r.exit_code == 0, r.stderr
    key = _key(tiny_spec)
    with single_segment(cache) as f:
        g = f[f"features/{key}/clean"]
        assert g["layers"].shape == (24, 2, 64) and g["layers"].dtype == np.float16
        assert json.loads(g.attrs["layers"]) == [1, 0]
    info = json.loads(run_cli("cache", "info", "-c", cache, "--json").stdout)
    assert info["features"][0]["layers"] == [1, 0]
    # other layers on the same cache: refused, even when nothing is new
    for layers in ("-1", "0,1"):
        r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "--layers", layers, "-q")
        assert r.exit_code == 2, r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "were made differently" in lines[0] and "layers" in lines[0]
    make_image(labelled_tree / "real" / "new.png", seed=99)
    # no --layers and a new image: the cache's layer set is kept (so fit PATH / score can add images)
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 0 and "1 new" in r.stdout, r.stderr
    assert len(_plain(cache, key)) == 25
    with single_segment(cache) as f:
        assert f[f"features/{key}/clean"]["layers"].shape == (25, 2, 64)


@pytest.mark.parametrize("field", ["weights_id", "preprocess"])
def test_hand_edited_backbone_attrs_refused(field, labelled_tree, tmp_path, tiny_spec, run_cli, make_image):
    cache = str(tmp_path / "c.h5")
    assert run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q").exit_code == 0
    key = _key(tiny_spec)
    with single_segment(cache, "r+") as f:
        g = f[f"features/{key}/clean"]
        b = json.loads(g.attrs["backbone"])
        if field == "weights_id":
            b["weights_id"] = "0" * 64
        else:
            b["preprocess"]["mean"] = [0.0, 0.0, 0.0]
        g.attrs["backbone"] = json.dumps(b)
    make_image(labelled_tree / "real" / "new.png", seed=123)
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"({field} differ)" in lines[0]
    assert len(_plain(cache, key)) == 24


# ------------------------------------------------------------------------------------------ bad inputs
def _png_header_only(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _corpus(root: Path, make_image) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Write good files (name → expected decoded RGB array) and bad files (name → reason fragment)."""
    from conftest import _image_array

    good: dict[str, np.ndarray] = {}
    d = root / "real"
    d.mkdir(parents=True)
    base = _image_array((72, 56), seed=1)
    Image.fromarray(base).save(d / "plain.png")
    good["plain.png"] = base
    a16 = (np.linspace(0, 65535, 56 * 72).reshape(56, 72)).round().astype(np.uint16)
    Image.fromarray(a16).save(d / "gray16.png")
    good["gray16.png"] = np.repeat(np.rint(a16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([10, 200, 30, 250, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))
    pal.save(d / "palette_trns.png", transparency=1)
    exp = np.zeros((30, 40, 3), np.uint8)
    exp[:, :20] = 255
    exp[:, 20:] = (10, 200, 30)
    good["palette_trns.png"] = exp
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:, :36, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    exp = base.copy()
    exp[:, :36] = 255
    good["rgba.png"] = exp
    Image.new("LA", (30, 20), (90, 255)).save(d / "la.png")
    good["la.png"] = np.full((20, 30, 3), 90, np.uint8)
    Image.fromarray(base[..., 0], "L").save(d / "gray.png")
    good["gray.png"] = np.repeat(base[..., :1], 3, axis=2)
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    good["anim.gif"] = np.full((24, 32, 3), (255, 0, 0), np.uint8)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = None  # lossy: checked approximately below
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(base).save(d / "exif6.jpg", quality=95, exif=exif)
    Image.fromarray(base).save(root / "exif_ref.jpg", quality=95)
    good["exif6.jpg"] = np.rot90(np.asarray(Image.open(root / "exif_ref.jpg").convert("RGB")), k=-1)

    bad: dict[str, str] = {}
    f = root / "fake" / "genA"
    f.mkdir(parents=True)
    (f / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty file (0 bytes)"
    jpg = make_image(root / "src.jpg", size=(160, 120), seed=5).read_bytes()
    (f / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    bad["trunc.jpg"] = "truncated image"
    png = (d / "plain.png").read_bytes()
    (f / "trunc.png").write_bytes(png[: len(png) // 2])
    bad["trunc.png"] = "truncated image"
    (f / "text.jpg").write_text("just some text\n" * 10)
    bad["text.jpg"] = "not an image"
    (f / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    bad["bomb.png"] = "decompression bomb"
    (f / "broken_link.png").symlink_to(root / "does-not-exist.png")
    bad["broken_link.png"] = "unreadable"
    return good, bad


def test_bad_input_corpus(tmp_path, make_image, tiny_spec, tiny_backbone, run_cli):
    root = tmp_path / "corpus"
    good, bad = _corpus(root, make_image)
    dir_jpg = root / "a_folder.jpg"  # a directory with an image name, listed explicitly on stdin
    dir_jpg.mkdir()
    bad["a_folder.jpg"] = "unreadable"
    files = sorted((root / "real").iterdir()) + sorted(p for p in (root / "fake").rglob("*") if not p.is_dir())
    listing = "\n".join(str(p) for p in files)
    listing += f"\n{dir_jpg}\n"
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", "-", "-b", tiny_spec, "-c", cache, "-q", "--workers", "2", input=listing)
    assert r.exit_code == 1, (r.stdout, r.stderr)  # done, with some files skipped
    _no_traceback(r)
    n_good, n_bad = len(good), len(bad)
    assert f"{n_good + n_bad} images: 0 cached, {n_good} new, {n_bad} skipped" in r.stdout
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == n_bad
    for name, reason in bad.items():
        mine = [ln for ln in skipped if os.path.basename(ln.split(": ", 1)[0]) == name]
        assert len(mine) == 1 and reason in mine[0], (name, mine)
    # the cache's error record, via the CLI, once per file even after a second run
    r2 = run_cli("extract", "-", "-b", tiny_spec, "-c", cache, "-q", input=listing)
    assert r2.exit_code == 1 and f"{n_good} cached, 0 new, {n_bad} skipped" in r2.stdout
    r = run_cli("cache", "errors", "-c", cache)
    assert r.exit_code == 0
    rows = [ln.split("\t") for ln in r.stdout.strip().splitlines()]
    assert sorted(os.path.basename(p) for p, _ in rows) == sorted(bad)
    for p, reason in rows:
        assert bad[os.path.basename(p)] in reason and os.path.isabs(p)
    # good files were decoded right: the cached embedding is the model's embedding of the expected pixels
    fc = FeatureCache(cache)
    key = _key(tiny_spec)
    for name, expected in good.items():
        row = fc.load(key, "clean", shas=[_sha(root / "real" / name)]).embedding
        assert row.shape == (1, 32), name
        if expected is None:
            got = np.asarray(Image.open(root / "real" / name).convert("RGB"))
            np.testing.assert_allclose(got[15, 20], (255, 0, 0), atol=6)
            continue
        x = tiny_backbone.collate([tiny_backbone.preprocess(Image.fromarray(np.ascontiguousarray(expected), "RGB"))])
        want = tiny_backbone.embed(x)["embedding"]
        np.testing.assert_allclose(row, want, atol=3e-3, err_msg=name)
    meta = fc.images()[_sha(root / "real" / "exif6.jpg")]
    assert (meta.width, meta.height, meta.format) == (72, 56, "JPEG")  # as the file's header says
    # only good files: exit code 0
    r = run_cli("extract", root / "real", "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 0 and r.stderr.strip() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied_file(tmp_path, make_image, tiny_spec, run_cli):
    p = make_image(tmp_path / "i" / "locked.png")
    make_image(tmp_path / "i" / "ok.png", seed=3)
    p.chmod(0)
    try:
        r = run_cli("extract", tmp_path / "i", "-b", tiny_spec, "-c", tmp_path / "c.h5", "-q")
    finally:
        p.chmod(0o644)
    assert r.exit_code == 1 and "locked.png: unreadable" in r.stderr


# ------------------------------------------------------------------------------------------ subprocesses
def _many_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img{i:04d}.png"
        if not p.exists():
            arr = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p)
        out.append(p)
    return out


def _count_shards(seg_dir: str) -> int:
    try:
        return sum(n.startswith("seg-") and n.endswith(".h5") for n in os.listdir(seg_dir))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill9_mid_run_then_resume(tmp_path, tiny_spec, subprocess_env):
    imgs = _many_images(tmp_path / "data" / "real", 300)
    cache = str(tmp_path / "cache" / "clipdet.h5")
    pending = cache + ".d"
    args = CLIPDET + ["extract", str(tmp_path / "data"), "-b", tiny_spec, "-c", cache, "--batch-size", "8",
                      "--workers", "1", "-q"]
    proc = subprocess.Popen(args, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and _count_shards(pending) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {out!r} {err!r}"
    # the cache is readable with plain h5py: complete segments of whole batches
    rows = _plain(cache, _key(tiny_spec))
    assert len(rows) >= 40 and len(rows) % 8 == 0 and len(set(rows)) == len(rows)
    fc = FeatureCache(cache)
    assert fc.cached_shas(_key(tiny_spec), "clean") == set(rows)
    # resume: only the rest is embedded, every image exactly once, temp files cleaned
    r = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"300 images: {len(rows)} cached, {300 - len(rows)} new, 0 skipped" in r.stdout
    assert "Traceback" not in r.stderr
    final = _plain(cache, _key(tiny_spec))
    assert len(final) == len(set(final)) == 300 and set(final) == {_sha(p) for p in imgs}
    assert not [n for n in os.listdir(pending) if n.endswith(".tmp")]
    with single_segment(cache) as f:
        assert len(f["images/sha256"]) == 300


@pytest.mark.slow
def test_two_concurrent_extractors(tmp_path, tiny_spec, subprocess_env):
    imgs = _many_images(tmp_path / "data" / "fake" / "gen", 120)
    cache = str(tmp_path / "clipdet.h5")
    lists = ["\n".join(str(p) for p in imgs[:80]), "\n".join(str(p) for p in imgs[40:])]
    procs = []
    for i, listing in enumerate(lists):
        lst = tmp_path / f"list{i}.txt"
        lst.write_text(listing + "\n")
        with open(lst) as stdin:
            procs.append(subprocess.Popen(
                CLIPDET + ["extract", "-", "-b", tiny_spec, "-c", cache, "--batch-size", "4", "--workers", "1", "-q"],
                env=subprocess_env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "Traceback" not in err
        outs.append(out)
    for out in outs:
        assert "80 images:" in out and "0 skipped" in out
    key = _key(tiny_spec)
    rows = _plain(cache, key)
    assert len(set(rows)) == 120
    with single_segment(cache) as f:
        s = f[f"features/{key}/clean/sha256"][()]
        assert len(s) == len(set(s.tolist())) == 120
        im = f["images"]
        assert len(im["sha256"]) == 120
        assert all(p.decode().count("\n") == 0 for p in im["paths"][()])  # each path recorded once
        vocab = [v.decode() for v in im["generator_vocab"][()]]
        assert {vocab[g] for g in im["generator"][()]} == {"gen"}
    emb = FeatureCache(cache).load(key, "clean").embedding
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=3e-3)


def test_extract_without_backbone_uses_the_caches_only_backbone(labelled_tree, tmp_path, tiny_spec, run_cli):
    """Issue 21: as its help says (and as fit, eval and bench do), not ViT-L-14:openai behind the user's back."""
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", labelled_tree / "real", "--backbone", tiny_spec, "--cache", cache, "-q")
    assert r.exit_code == 0, r.output
    r = run_cli("extract", labelled_tree / "fake", "--cache", cache, "-q")
    assert r.exit_code == 0, r.output
    assert f"using the cache's only backbone, {tiny_spec}" in r.stderr
    groups = [g for g in FeatureCache(cache).groups() if g.view == "clean"]
    assert len(groups) == 1 and groups[0].count == 24
