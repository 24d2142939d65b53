"""Issue 15, inputs: nothing skipped without a word (unreadable or symlinked folders, files Pillow reads
whatever their extension, runs that found no image)."""

from __future__ import annotations

import os

from clipdet.extract.discover import discover


def _deny(monkeypatch, folder):
    """Make listing `folder` fail with EACCES (chmod 000 does not stop root, who runs CI)."""
    real = os.scandir
    target = os.path.realpath(folder)

    def scandir(path="."):
        if os.path.realpath(os.fspath(path)) == target:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_subfolder_is_an_input_error(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "d" / "real" / "a.png")
    locked = tmp_path / "d" / "real" / "locked"
    make_image(locked / "b.png")
    _deny(monkeypatch, locked)
    refs = discover([str(tmp_path / "d")])
    errs = [r for r in refs if r.error]
    assert [r.path for r in errs] == [str(locked)]
    assert "Permission denied" in errs[0].error and "folder" in errs[0].error


def test_unreadable_subfolder_makes_extract_exit_1(tmp_path, make_image, monkeypatch, tiny_spec, run_cli):
    make_image(tmp_path / "d" / "real" / "a.png")
    locked = tmp_path / "d" / "real" / "locked"
    make_image(locked / "b.png")
    _deny(monkeypatch, locked)
    r = run_cli("extract", str(tmp_path / "d"), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"), "-q")
    assert r.exit_code == 1, r.output
    assert str(locked) in r.stderr and "Permission denied" in r.stderr


def test_symlinked_subfolders_are_followed_with_loop_protection(tmp_path, make_image):
    outside = tmp_path / "outside"
    make_image(outside / "x.png")
    root = tmp_path / "d"
    make_image(root / "real" / "a.png")
    os.symlink(outside, root / "real" / "linked")
    os.symlink(root, root / "real" / "loop")  # a loop back to the top
    refs = discover([str(root)])
    rel = sorted(os.path.relpath(r.path, root) for r in refs)
    assert rel == ["real/a.png", "real/linked/x.png"]
    assert all(not r.error for r in refs)
    assert any("loop" in n for n in refs.notes)


def test_files_pillow_reads_are_found_whatever_their_extension(tmp_path, make_image):
    from PIL import features

    root = tmp_path / "d"
    make_image(root / "real" / "a.png")
    make_image(root / "real" / "b.image", fmt="PNG")  # an unknown extension, but a PNG inside
    if features.check("avif"):
        make_image(root / "real" / "c.avif", fmt="AVIF")
    (root / "real" / "notes.txt").write_text("not an image")
    (root / "real" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    refs = discover([str(root)])
    names = sorted(os.path.basename(r.path) for r in refs)
    assert names == sorted(["a.png", "b.image"] + (["c.avif"] if features.check("avif") else []))
    assert sorted(os.path.basename(p) for p in refs.not_images) == ["notes.txt", "photo.heic"]


def test_cli_says_how_many_files_were_not_images(tmp_path, make_image, tiny_spec, run_cli):
    make_image(tmp_path / "d" / "real" / "a.png")
    (tmp_path / "d" / "real" / "notes.txt").write_text("not an image")
    r = run_cli("extract", str(tmp_path / "d"), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"), "-q")
    assert r.exit_code == 0, r.output
    assert "1 file(s) not images" in r.stderr and "notes.txt" in r.stderr


def test_fit_and_bench_with_paths_say_how_many_files_were_not_images(tmp_path, make_image, tiny_spec, run_cli):
    for i in range(4):
        make_image(tmp_path / "d" / "real" / f"r{i}.png", seed=i)
        make_image(tmp_path / "d" / "fake" / "g" / f"f{i}.png", seed=10 + i)
    (tmp_path / "d" / "real" / "notes.txt").write_text("not an image")
    r = run_cli("fit", str(tmp_path / "d"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"), "--shots", "2",
                "--out", str(tmp_path / "x.clipdet"), "-q")
    assert r.exit_code == 0, r.output
    assert "note: 1 file(s) not images" in r.stderr and "notes.txt" in r.stderr
    r = run_cli("bench", str(tmp_path / "d"), "-b", tiny_spec, "-c", str(tmp_path / "c.h5"), "--protocol", "kshot",
                "--shots", "1", "--seeds", "1", "--heads", "centroid", "--out", str(tmp_path / "bench"), "-q")
    assert r.exit_code == 0, r.output
    assert "note: 1 file(s) not images" in r.stderr


def test_extract_of_an_empty_folder_exits_1(tmp_path, tiny_spec, run_cli):
    (tmp_path / "empty").mkdir()
    r = run_cli("extract", str(tmp_path / "empty"), "--backbone", tiny_spec, "--cache", str(tmp_path / "c.h5"))
    assert r.exit_code == 1
    assert f"no images found in {tmp_path / 'empty'}" in r.stderr


def test_score_of_an_empty_folder_keeps_the_old_output(fitted, tmp_path, run_cli):
    tree, cache, det = fitted
    (tmp_path / "empty").mkdir()
    old = tmp_path / "old.csv"
    old.write_text("earlier results\n")
    r = run_cli("score", str(tmp_path / "empty"), "--detector", det, "--cache", cache, "--out", str(old))
    assert r.exit_code == 1
    assert "no images found in" in r.stderr and str(tmp_path / "empty") in r.stderr
    assert old.read_text() == "earlier results\n"
