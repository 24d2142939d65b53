"""clipdet finetune: training mechanics on the tiny model (CPU, random weights: no quality claims)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def _items(labelled_tree):
    from clipdet.extract.discover import discover
    from clipdet.finetune.data import list_images

    return list_images(discover([str(labelled_tree)])).items


def _rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _embed_with(fn, preprocess, mean, std, paths):
    from clipdet.backbones.preprocess import normalize_batch

    arrays = [preprocess(_rgb(p)) for p in paths]
    with torch.no_grad():
        return fn(normalize_batch(np.stack(arrays), mean, std, "cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_spec):
    """One LoRA run on a separable tree (real / genA / genB), shared by the tests that only read it."""
    from conftest import write_image

    from clipdet.finetune import finetune

    root = tmp_path_factory.mktemp("ft") / "tree"
    for cls, sub, base in (("real", "a", 0), ("fake", "genA", 100), ("fake", "genB", 200)):
        for i in range(10):
            write_image(root / cls / sub / f"{sub}_{i:02d}.png", size=(64 + 9 * i, 70), seed=base + i,
                        fake=cls == "fake")
    torch.set_num_threads(1)
    out = root.parent / "out"
    r = finetune([str(root)], backbone=tiny_spec, out=str(out), mode="lora", epochs=4, batch_size=8, lr=2e-3,
                 val_fraction=0.2, seed=0, device="cpu", workers=0)
    return r, root


def test_loss_decreases_and_train_json_records_the_run(trained):
    r, root = trained
    losses = [h["train_loss"] for h in r.history]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(h["val_loss"] is not None and h["val_auc"] is not None for h in r.history)
    assert r.classes == ["real", "genA", "genB"]
    rec = json.loads(Path(r.train_json).read_text())
    assert rec["config"]["mode"] == "lora" and rec["config"]["epochs"] == 4 and rec["config"]["seed"] == 0
    assert len(rec["manifest_hash"]) == 64 and len(rec["val_manifest_hash"]) == 64
    assert rec["counts"] == {"train": {"genA": 8, "genB": 8, "real": 8}, "val": {"genA": 2, "genB": 2, "real": 2}}
    assert [h["train_loss"] for h in rec["history"]] == pytest.approx(losses)
    assert "peft" in rec["versions"] and "torch" in rec["versions"]
    assert rec["backbone_spec"] == r.backbone_spec
    assert not any("different preprocessing" in n for n in r.notes), r.notes
    # issue 21: 6 validation images say little; the run says so, with the counts per class
    assert r.val_counts == {"real": 2, "fake": 4}
    assert any("validation set too small" in n and "2 real and 4 generated" in n for n in rec["notes"]), rec["notes"]
    assert "on 2 real + 4 generated validation images (too few to mean anything" in r.val_line()


def test_checkpoint_loads_as_arch_path_and_reproduces_training_embeddings(trained, tiny_spec):
    from clipdet.backbones import create_backbone, describe_backbone

    r, root = trained
    arch, _, path = r.backbone_spec.partition(":")
    assert arch == "clipdet-tiny" and path == os.path.abspath(r.model_path) and os.path.isfile(path)
    assert describe_backbone(r.backbone_spec).key != describe_backbone(tiny_spec).key
    bb = create_backbone(r.backbone_spec, device="cpu", precision="fp32")
    paths = sorted(str(p) for p in root.rglob("*.png"))[:6]
    mean, std = bb._fast.mean, bb._fast.std
    trained_emb = _embed_with(r.model.eval().embed, bb.preprocess, mean, std, paths).numpy()
    loaded = bb.embed(np.stack([bb.preprocess(_rgb(p)) for p in paths]))
    np.testing.assert_allclose(loaded["embedding"], trained_emb, atol=2e-5)
    # ... and differs from the base model: training changed the weights
    base = create_backbone(tiny_spec, device="cpu", precision="fp32")
    before = base.embed(np.stack([base.preprocess(_rgb(p)) for p in paths]))["embedding"]
    assert np.abs(before - trained_emb).max() > 1e-3


def test_detector_file_scores_at_once(trained, run_cli, tmp_path):
    r, root = trained
    cache = str(tmp_path / "c.h5")
    res = run_cli("score", str(root / "fake" / "genA"), "--detector", r.detector_path, "--cache", cache, "--quiet")
    assert res.exit_code == 0, res.stderr
    rows = res.stdout.strip().splitlines()
    assert rows[0].startswith("path,") and len(rows) == 11
    # the overlap guard of eval knows the training images
    res = run_cli("eval", str(root), "--detector", r.detector_path, "--cache", cache, "--quiet")
    assert res.exit_code == 2 and "references of the detector" in res.stderr


def test_lora_merge_equals_unmerged_output(tiny_spec):
    from clipdet.backbones.openclip import OpenClipProvider
    from clipdet.finetune.model import build_model

    full, _, _ = OpenClipProvider.build(tiny_spec, "cpu")
    model = build_model(full.visual, 3, "lora", lora_rank=4, seed=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(".attn." in n for n in names)
    assert any("mlp.c_fc" in n for n in names) and any("mlp.c_proj" in n for n in names)
    assert all("lora_" in n or n.startswith(("head.", "logit_scale")) for n in names)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        emb_unmerged = model.embed(x)
        tower = model.merge()
        merged = model(x)
    assert type(tower).__name__ == "VisionTransformer" and tower is full.visual
    assert not any("lora" in k for k in tower.state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (emb_unmerged - model.embed(x)).abs().max() < 1e-5


def test_last_blocks_and_full_modes_choose_trainable_parameters(tiny_spec):
    from clipdet.backbones.openclip import OpenClipProvider
    from clipdet.errors import UsageError
    from clipdet.finetune.model import build_model

    full, _, _ = OpenClipProvider.build(tiny_spec, "cpu")
    model = build_model(full.visual, 2, "last-blocks", blocks=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in names)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in names)
    assert {"visual.proj", "visual.ln_post.weight", "head.weight", "logit_scale"} <= names
    with pytest.raises(UsageError, match="--blocks 5"):
        build_model(OpenClipProvider.build(tiny_spec, "cpu")[0].visual, 2, "last-blocks", blocks=5)
    model = build_model(OpenClipProvider.build(tiny_spec, "cpu")[0].visual, 2, "full")
    assert all(p.requires_grad for p in model.parameters())


def test_validation_split_is_by_content_and_seed_stratified(labelled_tree):
    from clipdet.finetune.data import split_validation

    items = _items(labelled_tree)
    train, val = split_validation(items, 0.25, seed=3)
    assert len(train) + len(val) == len(items) == 24
    assert sorted(it.class_name for it in val) == ["genA", "genA", "genB", "genB", "real", "real"]
    train2, val2 = split_validation(list(reversed(items)), 0.25, seed=3)
    assert {it.sha256 for it in val2} == {it.sha256 for it in val}
    _, val3 = split_validation(items, 0.25, seed=4)
    assert {it.sha256 for it in val3} != {it.sha256 for it in val}


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(path)


def test_interrupted_run_resumes_to_the_same_final_weights(labelled_tree, tmp_path, tiny_spec):
    from clipdet.finetune import finetune
    from clipdet.finetune.train import CHECKPOINT, load_checkpoint

    torch.set_num_threads(1)
    kw = dict(backbone=tiny_spec, mode="lora", epochs=2, batch_size=6, lr=1e-3, val_fraction=0.25, seed=7,
              device="cpu", workers=1, jpeg_p=0.5)
    full = finetune([str(labelled_tree)], out=str(tmp_path / "a"), **kw)
    steps_per_epoch = full.history[0]["steps"]

    def kill(step, epoch, loss):
        if step == steps_per_epoch + 1:  # one step into the second epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune([str(labelled_tree)], out=str(tmp_path / "b"), on_step=kill, **kw)
    ckpt = load_checkpoint(str(tmp_path / "b" / CHECKPOINT))
    assert ckpt["epoch"] == 1 and not (tmp_path / "b" / "open_clip_model.safetensors").exists()
    resumed = finetune([str(labelled_tree)], out=str(tmp_path / "b"), resume=True, **kw)
    wa, wb = _weights(full.model_path), _weights(resumed.model_path)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in drop} for h in full.history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in resumed.history]


def test_cli_reports_bad_files_refuses_overlap_and_protects_output(labelled_tree, tmp_path, tiny_spec, run_cli):
    (labelled_tree / "real" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "run"
    args = ["finetune", str(labelled_tree), "-b", tiny_spec, "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--quiet"]
    res = run_cli(*args)
    assert res.exit_code == 1, res.stderr
    assert "skipped" in res.stderr and "broken.png" in res.stderr and "Traceback" not in res.stderr
    assert "validation set too small" in res.stderr and "(too few to mean anything" in res.stdout
    rec = json.loads((out / "train.json").read_text())
    assert [s["path"].endswith("broken.png") for s in rec["skipped"]] == [True]
    assert sum(rec["counts"]["train"].values()) + sum(rec["counts"]["val"].values()) == 24
    for name in ("open_clip_model.safetensors", "detector.clipdet", "checkpoint.pt"):
        assert (out / name).is_file()
    # a second run into the same folder would overwrite it: refused
    res = run_cli(*args)
    assert res.exit_code == 2 and "already holds" in res.stderr
    # resuming with other settings: refused, one line
    res = run_cli(*args[:-1], "--lr", "0.5", "--resume", "--quiet")
    assert res.exit_code == 2 and "different settings" in res.stderr and "lr" in res.stderr
    # validation images that are training images: refused
    res = run_cli("finetune", str(labelled_tree), "--val", str(labelled_tree / "fake"), "-b", tiny_spec,
                  "--out", str(tmp_path / "other"), "--epochs", "1", "--device", "cpu", "--quiet")
    assert res.exit_code == 2 and "also training images" in res.stderr
    assert not (tmp_path / "other" / "checkpoint.pt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_runs(labelled_tree, tmp_path, tiny_spec):
    from clipdet.finetune import finetune

    r = finetune([str(labelled_tree)], backbone=tiny_spec, out=str(tmp_path / "g"), epochs=1, batch_size=8,
                 device="cuda", precision="auto")
    rec = json.loads(Path(r.train_json).read_text())
    assert rec["config"]["precision"] == "bf16" and rec["history"][0]["train_loss"] is not None


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(labelled_tree, tmp_path, tiny_spec, subprocess_env):
    """A real `kill -9` of `clipdet finetune` after its first checkpoint; `--resume` ends with the same weights."""
    import signal
    import subprocess
    import sys
    import time

    from clipdet.finetune.train import CHECKPOINT, load_checkpoint

    out = tmp_path / "killed"
    args = ["finetune", str(labelled_tree), "-b", tiny_spec, "--epochs", "40", "--batch-size", "4", "--lr", "1e-3",
            "--val-fraction", "0.25", "--seed", "3", "--device", "cpu", "--workers", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "clipdet", *args, "--out", str(out)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / CHECKPOINT
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if (out / "open_clip_model.safetensors").exists():
        pytest.skip("the run finished before it could be killed")
    epoch = load_checkpoint(str(ckpt))["epoch"]
    assert 1 <= epoch < 40
    done = subprocess.run([sys.executable, "-m", "clipdet", *args, "--out", str(out), "--resume"], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run([sys.executable, "-m", "clipdet", *args, "--out", str(tmp_path / "straight")],
                         env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    wa, wb = _weights(str(out / "open_clip_model.safetensors")), _weights(str(tmp_path / "straight" /
                                                                             "open_clip_model.safetensors"))
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert not list(out.glob("*.tmp-*"))
