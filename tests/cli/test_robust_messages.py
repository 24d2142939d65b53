"""Issue 15, items 4 and 12: outputs checked before the work, and messages that name the file and the remedy."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import warnings

import pytest

from clipdet.errors import UsageError
from clipdet.extract.decode import decode_image
from clipdet.extract.discover import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg_with_bad_exif() -> bytes:
    from PIL import Image

    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHII", 0x010F, 2, 100, 1000) + struct.pack(">I", 0))  # tag data past the end
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (100, 50, 20)).save(buf, "JPEG", exif=b"Exif\x00\x00" + tiff)
    return buf.getvalue()


def test_corrupt_exif_warning_names_the_file():
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        dec = decode_image(_jpeg_with_bad_exif(), "photos/bad-exif.jpg")
    assert (dec.width, dec.height) == (20, 10)
    msgs = [str(w.message) for w in got]
    assert msgs and all(m.startswith("photos/bad-exif.jpg: ") for m in msgs), msgs


def test_latin1_manifest_names_file_byte_and_line(tmp_path):
    m = tmp_path / "l.csv"
    m.write_bytes("path,label\nr\xe9el.png,real\n".encode("latin-1"))
    with pytest.raises(UsageError) as e:
        read_manifest(m)
    assert str(e.value) == f"{m}: not UTF-8 (byte 0xe9 at line 2); save it as UTF-8"


def test_latin1_manifest_is_one_line_from_the_cli(tmp_path, run_cli, tiny_spec):
    m = tmp_path / "l.csv"
    m.write_bytes("path,label\nr\xe9el.png,real\n".encode("latin-1"))
    r = run_cli("extract", "--manifest", str(m), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"))
    assert r.exit_code == 2 and "not UTF-8 (byte 0xe9 at line 2)" in r.stderr and r.stderr.count("\n") == 1


def test_eval_report_on_a_file_says_what_to_do_before_scoring(fitted, tmp_path, run_cli, monkeypatch):
    tree, cache, det = fitted
    f = tmp_path / "report.md"
    f.write_text("mine\n")
    import clipdet.score.stream

    def boom(*a, **k):
        raise AssertionError("scored before checking --report")

    monkeypatch.setattr(clipdet.score.stream, "score_refs", boom)
    r = run_cli("eval", str(tree), "--detector", det, "--cache", cache, "--exclude-references", "--report", str(f))
    assert r.exit_code == 2, r.output
    assert f"--report {f}: is a file" in r.stderr and "folder" in r.stderr and r.stderr.count("\n") == 1
    assert f.read_text() == "mine\n"


def test_bench_checks_its_output_folder_before_computing(labelled_tree, tiny_spec, tmp_path, run_cli):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the folder should go\n")
    cache = tmp_path / "c.h5"
    r = run_cli("bench", str(labelled_tree), "--backbone", tiny_spec, "--cache", str(cache), "--out", str(blocker),
                "--protocol", "kshot", "--ks", "1", "--seeds", "1", "--heads", "centroid", "-q")
    assert r.exit_code == 2, r.output
    assert f"--out {blocker}: is a file" in r.stderr and r.stderr.count("\n") == 1
    assert not cache.exists(), "bench extracted features before finding out it cannot write its results"


def test_make_demo_without_data_names_the_knob(tmp_path):
    r = subprocess.run(["make", "-s", "demo", f"DATA={tmp_path / 'nowhere'}", f"VENV={tmp_path / 'venv'}",
                        "PYTHON=false"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "make demo DATA=folder" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_make_demo_missing_weights_names_the_knob(tmp_path, labelled_tree):
    """The demo's extract fails on weights it cannot get; the Makefile says which knob to turn."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "clipdet"
    fake.write_text("#!/bin/sh\necho 'clipdet: error: ViT-L-14:openai: pretrained weights not available' >&2\nexit 2\n")
    fake.chmod(0o755)
    (venv / "bin" / ".installed").touch()
    os.utime(venv / "bin" / ".installed", (2**31 - 1, 2**31 - 1))  # newer than pyproject.toml: no install
    r = subprocess.run(["make", "-s", "demo", f"DATA={labelled_tree}", f"VENV={venv}", f"OUT={tmp_path / 'o'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "make demo BACKBONE=" in r.stderr


def test_corrupt_exif_warning_names_the_file_from_the_cli(tmp_path, tiny_spec, subprocess_env):
    import sys

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad-exif.jpg").write_bytes(_jpeg_with_bad_exif())
    r = subprocess.run([sys.executable, "-m", "clipdet", "extract", str(tmp_path / "d"), "--backbone", tiny_spec,
                        "--cache", str(tmp_path / "c.h5"), "-q"], capture_output=True, text=True, env=subprocess_env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "EXIF" in x or "Tag" in x]
    prefix = f"clipdet: warning: {tmp_path / 'd' / 'bad-exif.jpg'}: "
    assert lines and all(x.startswith(prefix) for x in lines), r.stderr
