"""Issue 21: file names that are not UTF-8 and symlink loops among files never stop a run."""

from __future__ import annotations

import json
import os

import pytest

from clipdet.cache import FeatureCache


def _odd(folder, raw: bytes) -> str:
    """`folder`/`raw` as Python spells a non-UTF-8 file name (surrogate escapes)."""
    return os.path.join(os.fsdecode(folder), os.fsdecode(raw))


@pytest.fixture
def odd_tree(tmp_path, make_image):
    """tmp_path/d: real/ with a readable `bad\\xff.png` and a broken `broken\\xfe.png`, fake/g/."""
    d = tmp_path / "d"
    for i in range(2):
        make_image(d / "real" / f"r{i}.png", seed=i)
        make_image(d / "fake" / "g" / f"f{i}.png", seed=100 + i, fake=True)
    try:
        make_image(_odd(d / "real", b"bad\xff.png"), seed=7)
        with open(_odd(d / "real", b"broken\xfe.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not an image")
    except OSError as e:  # a file system that insists on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {e}")
    return d


def test_non_utf8_names_are_embedded_and_shown_escaped_everywhere(odd_tree, fitted, tiny_spec, tmp_path, run_cli):
    cache = str(tmp_path / "odd.h5")
    r = run_cli("extract", odd_tree, "--backbone", tiny_spec, "--cache", cache, "-q")
    assert r.exit_code == 1, r.output  # the broken file is skipped, the run goes on
    assert "broken\\xfe.png" in r.stderr and "\udcfe" not in r.stderr and "Traceback" not in r.output
    paths = [p for m in FeatureCache(cache).images().values() for p in m.paths]
    assert any(p.endswith(os.sep + "bad\\xff.png") for p in paths), paths
    assert len(paths) == 5
    det = fitted[2]
    for out in ("s.csv", "s.jsonl"):
        r = run_cli("score", odd_tree / "real", "--detector", det, "--cache", cache, "--cache-readonly",
                    "--out", tmp_path / out, "-q")
        assert r.exit_code == 1, r.output
        text = (tmp_path / out).read_text(encoding="utf-8")
        rows = ([json.loads(line) for line in text.splitlines()] if out.endswith("jsonl")
                else [dict(zip(text.splitlines()[0].split(","), line.split(","))) for line in text.splitlines()[1:]])
        by_name = {os.path.basename(row["path"]): row for row in rows}
        assert set(by_name) == {"r0.png", "r1.png", "bad\\xff.png", "broken\\xfe.png"}
        assert not by_name["bad\\xff.png"]["error"] and by_name["broken\\xfe.png"]["error"]
    r = run_cli("score", _odd(odd_tree / "real", b"bad\xff.png"), "--detector", det, "--cache", cache, "-q")
    assert r.exit_code == 0 and "bad\\xff.png: " in r.stdout, r.output
    r = run_cli("eval", odd_tree, "--detector", det, "--cache", cache, "--report", tmp_path / "rep", "-q")
    assert r.exit_code == 1, r.output
    errors = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))["errors"]
    assert [os.path.basename(e["path"]) for e in errors] == ["broken\\xfe.png"]


@pytest.fixture
def loop_tree(tmp_path, make_image):
    """tmp_path/L/real: two images, file links `a.png -> a.png`, `b.png -> c.png -> b.png`, `loop -> loop`."""
    real = tmp_path / "L" / "real"
    make_image(real / "r0.png", seed=0)
    make_image(real / "r1.png", seed=1)
    os.symlink("a.png", real / "a.png")
    os.symlink("c.png", real / "b.png")
    os.symlink("b.png", real / "c.png")
    os.symlink("loop", real / "loop")
    return tmp_path / "L"


def test_symlink_loops_among_files_are_noted_and_skipped(loop_tree):
    from clipdet.extract.discover import discover

    refs = discover([str(loop_tree)])
    assert [os.path.basename(r.path) for r in refs] == ["r0.png", "r1.png"]
    looped = sorted(os.path.basename(n.split(":")[0]) for n in refs.notes if "symlink loop" in n)
    assert looped == ["a.png", "b.png", "c.png", "loop"]


def test_extract_goes_on_past_symlink_loops(loop_tree, tiny_spec, tmp_path, run_cli):
    cache = str(tmp_path / "c.h5")
    r = run_cli("extract", loop_tree, "--backbone", tiny_spec, "--cache", cache, "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("symlink loop") == 4 and "2 images" in r.stdout + r.stderr
    # a loop named on the command line is an input error like an unreadable file: reported, exit 1
    r = run_cli("extract", loop_tree / "real" / "a.png", loop_tree / "real" / "r0.png", "--backbone", tiny_spec,
                "--cache", cache, "-q")
    assert r.exit_code == 1, r.output
    assert "a.png: symlink loop" in r.stderr and "Traceback" not in r.output
