"""Backbone registry: local weights files, wrong checkpoints, random init, offline pretrained tags, layers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipdet.backbones import create_backbone, describe_backbone, list_backbones, parse_spec
from clipdet.backbones import openclip as oc_mod
from clipdet.errors import BackboneError, UsageError, WeightsUnavailableError


def _batch(backbone, n=3, size=(70, 50)):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
    return backbone.collate([backbone.preprocess(im) for im in ims])


# ------------------------------------------------------------------------------------------ specs
def test_parse_spec():
    assert parse_spec("ViT-L-14:openai") == ("ViT-L-14", "openai")
    assert parse_spec("ViT-B-32:/a/b:c.pt") == ("ViT-B-32", "/a/b:c.pt")
    for bad in ("ViT-L-14", ":openai", "ViT-L-14:", ""):
        with pytest.raises(UsageError, match="expected ARCH:WEIGHTS"):
            parse_spec(bad)


def test_describe_local_file_is_content_addressed(tiny_weights, tiny_spec):
    info = describe_backbone(tiny_spec)
    digest = hashlib.sha256(open(tiny_weights, "rb").read()).hexdigest()
    assert (info.arch, info.weights, info.weights_id) == ("clipdet-tiny", "file", digest)
    assert info.key == f"clipdet-tiny__file-{digest[:16]}"
    assert "/" not in info.key
    assert describe_backbone("ViT-L-14:openai").key == "ViT-L-14__openai"
    assert describe_backbone("clipdet-tiny:random").weights_id == "random-seed-0"
    with pytest.raises(UsageError, match="not found"):
        describe_backbone("clipdet-tiny:/no/such/weights.safetensors")


# ------------------------------------------------------------------------------------------ loading
def test_local_weights_file_loads_through_real_path(tiny_weights, tiny_backbone):
    from safetensors.torch import load_file

    sd = load_file(tiny_weights)
    b = tiny_backbone
    assert b.info.weights == "file" and b.device == "cpu"
    assert b.image_size == 64 and b.embed_dim == 32
    # the visual tower carries exactly the saved weights (not open_clip's random init)
    vis = {f"visual.{k}": v for k, v in b.visual.state_dict().items()}
    assert vis, "no visual weights"
    for k, v in vis.items():
        torch.testing.assert_close(v.cpu(), sd[k], rtol=0, atol=0)
    assert b.info.preprocess["size"] in (64, [64, 64])
    json.loads(b.info.to_json())


def test_embed_shapes_normalised_deterministic(tiny_spec, tiny_backbone):
    x = _batch(tiny_backbone, n=4)
    assert x.shape == (4, 64, 64, 3) and x.dtype == np.uint8  # uint8 per image; normalised inside embed
    out = tiny_backbone.embed(x)
    e = out["embedding"]
    assert e.shape == (4, 32) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert "layers" not in out
    assert not np.allclose(e[0], e[1])
    again = create_backbone(tiny_spec, device="cpu").embed(x)["embedding"]
    np.testing.assert_allclose(again, e, atol=1e-6)  # a second load of the same file: same features


def test_layers_cls_tokens(tiny_backbone):
    b = tiny_backbone
    assert b.resolve_layers((-1, -2)) == (1, 0)
    assert b.resolve_layers((0,)) == (0,)
    for bad in ((2,), (-3,)):
        with pytest.raises(UsageError, match="has 2 transformer blocks"):
            b.resolve_layers(bad)
    x = _batch(b, n=3)
    out = b.embed(x, layers=(-1, -2))
    lay = out["layers"]
    assert lay.shape == (3, 2, 64) and lay.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(lay, axis=2), 1, atol=1e-5)
    assert not np.allclose(lay[:, 0], lay[:, 1])
    # the last block's CLS token is what the pooled embedding is made from: ln_post → proj
    v = b.visual
    assert v.pool_type == "tok" and not getattr(v, "final_ln_after_pool", False)
    with torch.no_grad():
        rebuilt = torch.nn.functional.normalize(v.ln_post(torch.from_numpy(lay[:, 0])) @ v.proj, dim=-1)
    np.testing.assert_allclose(rebuilt.numpy(), out["embedding"], atol=2e-3)
    # asking for layers does not change the embedding
    np.testing.assert_allclose(b.embed(x)["embedding"], out["embedding"], atol=1e-6)


def test_layers_mean_of_patch_tokens(tiny_backbone):
    """"layers_mean": per block, the normalised mean of the patch tokens (CLS left out), beside "layers"."""
    b = tiny_backbone
    x = _batch(b, n=3)
    seen = {}
    blocks = b.visual.transformer.resblocks
    hook = blocks[0].register_forward_hook(lambda _m, _i, o: seen.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    try:
        out = b.embed(x, layers=(0, -1))
    finally:
        hook.remove()
    mean = out["layers_mean"]
    assert mean.shape == out["layers"].shape == (3, 2, 64) and mean.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mean, axis=2), 1, atol=1e-5)
    tokens = seen["x"].float()
    if not getattr(b.visual.transformer, "batch_first", True):
        tokens = tokens.transpose(0, 1)
    want = torch.nn.functional.normalize(tokens[:, 1:].mean(dim=1), dim=-1).numpy()
    np.testing.assert_allclose(mean[:, 0], want, atol=1e-4)
    assert not np.allclose(mean[:, 0], out["layers"][:, 0], atol=1e-2)  # not the CLS token


def test_wrong_architecture_weights_one_line_error(tiny_weights, tmp_path):
    # a real checkpoint of another architecture: open_clip raises AssertionError/RuntimeError inside
    with pytest.raises(BackboneError) as ei:
        create_backbone(f"ViT-B-32:{tiny_weights}", device="cpu")
    msg = str(ei.value)
    assert "not a valid ViT-B-32 checkpoint" in msg and "\n" not in msg


def test_foreign_or_garbage_weights_one_line_error(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(foreign))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    for path in (foreign, garbage):
        with pytest.raises(BackboneError) as ei:
            create_backbone(f"clipdet-tiny:{path}", device="cpu")
        assert "not a valid clipdet-tiny checkpoint" in str(ei.value)
        assert "\n" not in str(ei.value)


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights.*scores mean nothing"):
        b = create_backbone("clipdet-tiny:random", device="cpu")
    assert b.info.weights_id == "random-seed-0"
    e1 = b.embed(_batch(b, n=2))["embedding"]
    with pytest.warns(UserWarning):
        e2 = create_backbone("clipdet-tiny:random", device="cpu").embed(_batch(b, n=2))["embedding"]
    np.testing.assert_allclose(e1, e2, atol=1e-6)  # seeded: reproducible


def test_unknown_arch_tag_and_device():
    with pytest.raises(UsageError, match=r"unknown architecture 'ViT-Q-99'.*similar: .*ViT-"):
        create_backbone("ViT-Q-99:openai", device="cpu")
    with pytest.raises(UsageError, match="no pretrained tag 'nonsense'"):
        create_backbone("ViT-B-32:nonsense", device="cpu")
    with pytest.raises(UsageError, match="--device"):
        create_backbone("clipdet-tiny:random", device="tpu")


@pytest.fixture
def no_weights_cache(tmp_path, monkeypatch):
    """No locally cached pretrained weights, and open_clip must never be asked to build/download."""
    monkeypatch.setenv("CLIPDET_WEIGHTS_DIR", str(tmp_path / "weights-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    calls = {"create_model": 0, "online": 0}
    oc = oc_mod._open_clip()

    def no_create(*a, **k):
        calls["create_model"] += 1
        raise AssertionError("create_model must not run when the weights are unavailable")

    real_online = oc_mod._online

    def counting_online(*a, **k):
        calls["online"] += 1
        return real_online(*a, **k)

    monkeypatch.setattr(oc, "create_model", no_create)
    monkeypatch.setattr(oc_mod, "_online", counting_online)
    return calls


def test_pretrained_tag_offline_fails_fast(no_weights_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as ei:
        create_backbone("ViT-L-14:openai", device="cpu")
    msg = str(ei.value)
    assert "ViT-L-14:/path/to/" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    assert no_weights_cache == {"create_model": 0, "online": 1}


def test_pretrained_tag_unreachable_host_fails_fast(no_weights_cache, monkeypatch):
    """Without HF_HUB_OFFLINE a failed connection probe (no network) stops at once: no download retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(oc_mod.socket, "create_connection", refuse)
    with pytest.raises(WeightsUnavailableError, match=r"cannot reach huggingface.co.*ViT-B-32:/path/to"):
        create_backbone("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    assert no_weights_cache["create_model"] == 0


def test_list_backbones_has_openai_and_builtin():
    items = dict(list_backbones())
    assert "openai" in items["ViT-L-14"]
    assert "clipdet-tiny" in items and items["clipdet-tiny"] == []


def test_cli_backbones_lists(run_cli):
    r = run_cli("backbones")
    assert r.exit_code == 0
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:] if ln.strip()}
    assert "openai" in lines["ViT-L-14"]
    assert "clipdet-tiny" in lines
    r = run_cli("backbones", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert "openai" in data["ViT-L-14"] and data["clipdet-tiny"] == []
