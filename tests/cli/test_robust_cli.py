"""Issue 15, item 13: what scripts and new users read — --version, defaults in --help, JSONL keys,
eval --backbone, --shots beyond the pool, and a detector refused with other backbone weights."""

from __future__ import annotations

import json
import re

import pytest

import clipdet


@pytest.fixture
def other_weights(tiny_weights, tmp_path):
    """The tiny model's weights with one tensor changed: same architecture, different weights."""
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_weights)
    name = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.numel() > 1)
    sd[name] = sd[name] + 0.01
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    return str(path)


def _flat(text: str) -> str:
    return re.sub(r"[\s│]+", " ", text)


def test_version_option(run_cli):
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"clipdet {clipdet.__version__}"


def test_help_shows_defaults(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    h = _flat(run_cli("extract", "--help").stdout)
    assert "[default: 32 on CPU, 256 on CUDA]" in h
    assert "[default: by device" in h
    assert "[default: ViT-L-14:openai" in h and "[default: $CLIPDET_CACHE or cache/clipdet.h5]" in h
    h = _flat(run_cli("score", "--help").stdout)
    assert "[default: the detector's" in h and "[default: $CLIPDET_CACHE or cache/clipdet.h5]" in h


def test_jsonl_rows_have_every_column(fitted, tmp_path, run_cli):
    from clipdet.score.output import COLUMNS, JSONL_ONLY

    tree, cache, det = fitted
    out = tmp_path / "s.jsonl"
    r = run_cli("score", str(tree / "real"), "--detector", det, "--cache", cache, "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(list(row) == COLUMNS + JSONL_ONLY for row in rows)  # JSONL adds provenance_details
    assert rows[0]["nearest_path"] is None and rows[0]["error"] is None


def test_eval_takes_backbone_and_refuses_other_weights(fitted, run_cli, tiny_weights, other_weights):
    tree, cache, det = fitted
    r = run_cli("eval", str(tree), "--detector", det, "--cache", cache, "--exclude-references",
                "--backbone", f"clipdet-tiny:{tiny_weights}")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", str(tree), "--detector", det, "--cache", cache, "--exclude-references",
                "--backbone", f"clipdet-tiny:{other_weights}")
    assert r.exit_code == 2 and "different weights" in r.stderr and r.stderr.count("\n") == 1


def test_score_refuses_other_weights_even_when_all_cached(fitted, run_cli, other_weights):
    tree, cache, det = fitted
    r = run_cli("score", str(tree / "real"), "--detector", det, "--cache", cache,
                "--backbone", f"clipdet-tiny:{other_weights}")
    assert r.exit_code == 2, r.output
    assert "different weights" in r.stderr and r.stderr.count("\n") == 1


def test_shots_beyond_the_pool_are_reported(fitted, tmp_path, run_cli):
    tree, cache, det = fitted
    r = run_cli("fit", "--cache", cache, "--shots", "5000", "--out", str(tmp_path / "d.clipdet"))
    assert r.exit_code == 0, r.output
    assert "--shots 5000" in r.stderr and "8 real" in r.stderr and "16 fake" in r.stderr
