"""Issue 15, scoring behaviour scripts rely on: output format from the options (not the image count),
rows flushed chunk by chunk with a small first chunk, a closed pipe stops the run quietly."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time

import clipdet
from clipdet.cache import FeatureCache
from clipdet.score.output import COLUMNS


def test_folder_with_one_image_gives_csv_not_a_verdict(fitted, tmp_path, run_cli):
    tree, cache, det = fitted
    one = tmp_path / "one"
    one.mkdir()
    src = sorted((tree / "fake" / "genA").iterdir())[0]
    (one / src.name).write_bytes(src.read_bytes())
    r = run_cli("score", str(one), "--detector", det, "--cache", cache)
    assert r.exit_code == 0, r.output
    lines = list(csv.reader(io.StringIO(r.stdout)))
    assert lines[0] == COLUMNS and len(lines) == 2


def test_verdict_flag_prints_verdicts_for_a_folder(fitted, run_cli):
    tree, cache, det = fitted
    r = run_cli("score", str(tree / "fake" / "genA"), "--detector", det, "--cache", cache, "--verdict")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all("p_fake" in line and "threshold" in line for line in lines)


def test_single_file_argument_still_prints_a_verdict(fitted, run_cli):
    tree, cache, det = fitted
    one = sorted((tree / "real" / "a").iterdir())[0]
    r = run_cli("score", str(one), "--detector", det, "--cache", cache)
    assert r.exit_code == 0 and r.stdout.startswith(str(one)) and "p_fake" in r.stdout


def test_chunks_start_small_and_grow():
    from clipdet.score.stream import growing_chunks

    sizes = [len(c) for c in growing_chunks(range(200), first=8, largest=64)]
    assert sizes == [8, 16, 32, 64, 64, 16]
    assert sum(sizes) == 200


def test_closed_pipe_stops_the_run_soon_and_quietly(fitted, tmp_path, make_image, subprocess_env):
    tree, cache, det = fitted
    many = tmp_path / "many"
    for i in range(300):
        make_image(many / f"{i:03d}.png", size=(40, 40), seed=1000 + i)
    cmd = [sys.executable, "-m", "clipdet", "score", str(many), "--detector", det, "--cache", cache,
           "--workers", "0", "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env)
    t0 = time.monotonic()
    header = p.stdout.readline()
    first = p.stdout.readline()
    waited = time.monotonic() - t0
    p.stdout.close()  # like `| head -2`
    _, stderr = p.communicate(timeout=120)
    assert header.decode().strip().split(",") == COLUMNS and first.decode().startswith(str(many))
    assert p.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()
    embedded = len(FeatureCache(cache).cached_shas(clipdet.Detector.load(det).backbone_key, "clean")) - 24
    assert embedded < 150, f"embedded {embedded} of 300 images after the pipe closed (first row after {waited:.1f} s)"
