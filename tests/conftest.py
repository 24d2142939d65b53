"""Shared fixtures: a tiny open_clip model saved as a real weights file, generated images, a CLI runner.

Fixtures (names are stable; other test files rely on them):

- `tiny_weights` (session): path of a safetensors file holding a seeded random init of the built-in
  `clipdet-tiny` open_clip config. Load it as `f"clipdet-tiny:{tiny_weights}"`: the same code path a
  downloaded checkpoint takes (describe → hash file → open_clip.create_model(pretrained=path)).
- `tiny_spec` (session): that spec string.
- `tiny_backbone` (session): the loaded `clipdet-tiny` backbone on CPU (saves ~1 s per test that
  would otherwise load it); wrap it as `LazyBackbone(tiny_spec, loaded=tiny_backbone)` for `extract`.
- `make_image` (session): `make_image(path, size=(W, H), seed=0, mode="RGB", fmt=None, fake=False)`
  writes a structured random image (smooth gradients + noise; `fake=True` adds a strong
  high-frequency checkerboard and shifted colours) and returns its `Path`.
- `labelled_tree` (function): a fresh folder `tree/` with `real/a/*`, `fake/genA/*`, `fake/genB/*`,
  8 images each, PNG and JPEG mixed, sizes 40-300 px, fakes clearly separable from reals.
- `run_cli` (function): `run_cli(*args, input=None)` runs the typer app in-process and returns the
  click `Result` (`exit_code`, `stdout`, `stderr`); warning-format changes the CLI makes are undone.
- `subprocess_env` (session): an environment for `python -m clipdet` subprocesses (offline, 1 thread).

The environment is set so tests never touch the network (HF_HUB_OFFLINE), torch uses one thread, and
inference runs in fp32 (CLIPDET_PRECISION; tests/test_speed_paths.py covers bf16).

Tests write only under their tmp folders: CLIPDET_CACHE points at a throwaway folder (a command run without
`--cache` never reaches the checkout's `cache/clipdet.h5`), and `_checkout_untouched` (session, autouse)
fails the run naming every file of the checkout that a test created or changed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# A command or library call without --cache/cache= writes here, never into the checkout's cache/clipdet.h5.
_DEFAULT_CACHE_DIR = tempfile.mkdtemp(prefix="clipdet-tests-cache-")
atexit.register(shutil.rmtree, _DEFAULT_CACHE_DIR, True)
os.environ["CLIPDET_CACHE"] = os.path.join(_DEFAULT_CACHE_DIR, "clipdet.h5")
# Exact-equality tests compare features with fp32 model outputs; the bf16 CPU path has its own test.
os.environ["CLIPDET_PRECISION"] = "fp32"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Folders of the checkout that running the suite may write: interpreter and tool caches, the venv.
_UNWATCHED = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".import_linter_cache",
              ".hypothesis", "node_modules"}


def checkout_snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file under `root`, tool and interpreter caches left out."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _UNWATCHED and not d.endswith(".egg-info")]
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            snap[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
    return snap


def checkout_changes(before: dict, after: dict) -> list[str]:
    """Paths new, changed or gone between two `checkout_snapshot`s, each with what happened, sorted."""
    out = [f"{p} (new)" for p in after if p not in before]
    out += [f"{p} (changed)" for p in after if p in before and after[p] != before[p]]
    out += [f"{p} (removed)" for p in before if p not in after]
    return sorted(out)


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched():
    """Fail the run when a test created, changed or removed a file of the checkout (tests write to tmp)."""
    before = checkout_snapshot(REPO)
    yield
    changed = checkout_changes(before, checkout_snapshot(REPO))
    if changed:
        pytest.fail("tests wrote into the checkout (write under tmp_path; pass --cache): " + ", ".join(changed),
                    pytrace=False)


@contextlib.contextmanager
def tmpfs_mount(mnt: Path, size: str):
    """A tmpfs of `size` (e.g. "1m") mounted at the new folder `mnt` for the block; the test is skipped
    where mounting is not allowed (not root). Unmounted (lazily) afterwards."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """`n` seeded random unit vectors of dimension `d` (float32): synthetic embeddings."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hex_sha(i: int) -> str:
    """A 64-hex-digit SHA-256-shaped key for synthetic row `i`."""
    return f"{i:064x}"


def _image_array(size: tuple[int, int], seed: int, fake: bool = False) -> np.ndarray:
    """H x W x 3 uint8: smooth colour gradients + mild noise (+ checkerboard for fakes)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 128 + 90 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
    img += rng.normal(0, 8, img.shape)
    if fake:
        checker = ((xx.astype(int) + yy.astype(int)) % 2) * 2 - 1
        img = 0.6 * img + np.array([60.0, -30.0, 80.0])
        img += 70 * checker[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path, size=(64, 48), seed=0, mode="RGB", fmt=None, fake=False) -> Path:
    """Write a structured random image to `path` (format from `fmt` or the suffix); returns the Path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(_image_array(size, seed, fake), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    kwargs = {"quality": 92} if (fmt or "").upper() == "JPEG" else {}
    im.save(path, format=fmt, **kwargs)
    return path


@pytest.fixture(scope="session")
def make_image():
    """`make_image(path, size=(W, H), seed=0, mode="RGB", fmt=None, fake=False) -> Path` (see `write_image`)."""
    return write_image


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """Path of a safetensors file with a seeded random init of the built-in `clipdet-tiny` config."""
    import torch
    from safetensors.torch import save_file

    from clipdet.backbones.openclip import _open_clip

    oc = _open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = oc.create_model("clipdet-tiny")
    path = tmp_path_factory.mktemp("weights") / "clipdet-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_spec(tiny_weights) -> str:
    """Backbone spec `clipdet-tiny:/path/to/weights.safetensors` for the tiny test model."""
    return f"clipdet-tiny:{tiny_weights}"


@pytest.fixture(scope="session")
def tiny_backbone(tiny_spec):
    """The tiny backbone, loaded once on CPU (an `OpenClipBackbone`)."""
    import torch

    from clipdet.backbones import create_backbone

    torch.set_num_threads(1)
    return create_backbone(tiny_spec, device="cpu")


@pytest.fixture
def labelled_tree(tmp_path) -> Path:
    """`tmp_path/tree` with real/a/, fake/genA/, fake/genB/: 8 images each, separable, 40-300 px."""
    root = tmp_path / "tree"
    sizes = [(40, 52), (64, 64), (300, 200), (120, 90), (77, 140), (256, 256), (48, 300), (96, 60)]
    for cls, sub, base in (("real", "a", 0), ("fake", "genA", 100), ("fake", "genB", 200)):
        for i, size in enumerate(sizes):
            ext = ".jpg" if i % 2 else ".png"
            write_image(root / cls / sub / f"{sub}_{i:02d}{ext}", size=size, seed=base + i, fake=cls == "fake")
    return root


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """Environment for `python -m clipdet` subprocesses: offline, one thread, the throwaway default cache."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TQDM_DISABLE", None)  # a subprocess shows its progress bar unless its own --quiet says otherwise
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def clear_tqdm_disable(monkeypatch) -> None:
    """Unset TQDM_DISABLE for this test and unset it again at teardown: an in-process `--quiet` run sets it
    (os.environ.setdefault), and a plain `delenv` of an absent variable records nothing to undo, so it
    would leak into later tests' subprocesses (no progress bar where one is tested)."""
    monkeypatch.setenv("TQDM_DISABLE", "")
    monkeypatch.delenv("TQDM_DISABLE")


@pytest.fixture
def run_cli(monkeypatch):
    """`run_cli(*args, input=None)` → click Result of the clipdet typer app, run in-process."""
    from typer.testing import CliRunner

    from clipdet.cli import app

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    clear_tqdm_disable(monkeypatch)
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return run


CLIPDET = [sys.executable, "-m", "clipdet"]


def single_segment(cache_path, mode: str = "r"):
    """Merge a cache into one segment (full compaction) and open that segment file with plain h5py."""
    import h5py

    from clipdet.cache import FeatureCache

    fc = FeatureCache(str(cache_path))
    fc.compact(full=True)
    segs = fc.segments()
    assert len(segs) == 1, segs
    return h5py.File(segs[0], mode)


def fit_tree(labelled_tree, tiny_spec, tiny_backbone, tmp_path, head: str = "svm"):
    """Extract the labelled tree into tmp_path/c.h5 and save a `head` detector fitted on 4+4 references;
    returns (cache path, detector path)."""
    import clipdet
    from clipdet.extract.discover import discover
    from clipdet.extract.lazy import LazyBackbone

    cache = str(tmp_path / "c.h5")
    clipdet.extract(discover([str(labelled_tree)]), tiny_spec, cache=cache,
                    lazy=LazyBackbone(tiny_spec, loaded=tiny_backbone))
    return cache, clipdet.fit(head=head, shots=4, seed=0, cache=cache).save(tmp_path / "det.clipdet")


@pytest.fixture
def fitted(labelled_tree, tiny_spec, tiny_backbone, tmp_path):
    """(tree, cache path, detector path as str): an svm detector fitted on 4+4 references of the tree."""
    cache, path = fit_tree(labelled_tree, tiny_spec, tiny_backbone, tmp_path)
    return labelled_tree, cache, str(path)
