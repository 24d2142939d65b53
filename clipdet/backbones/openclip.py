"""open_clip backbones: `ARCH:TAG`, `ARCH:/path/to/weights` and `ARCH:random`, plus built-in test configs."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

from ..errors import BackboneError, UsageError, WeightsUnavailableError
from .base import PROVIDERS, Backbone, BackboneInfo, env_cache_dir, file_sha256, parse_spec, resolve_device

CONFIG_DIR = Path(__file__).with_name("configs")
#: Architectures defined by clipdet itself (tiny, for tests); registered with open_clip on first use.
BUILTIN_ARCHS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
RANDOM_SEED = 0

log = logging.getLogger("clipdet")


def _open_clip():
    """Import open_clip (slow: pulls in torch) and register clipdet's built-in configs once."""
    from ..errors import require

    require("torch", "torch", "open_clip backbones (ARCH:WEIGHTS)")
    open_clip = require("open_clip", "torch", "open_clip backbones (ARCH:WEIGHTS)")

    if not getattr(open_clip, "_clipdet_configs", False):
        open_clip.add_model_config(CONFIG_DIR)
        open_clip._clipdet_configs = True
    return open_clip


def _is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(WEIGHT_SUFFIXES) or os.path.exists(weights)


def _weights_hint(arch: str) -> str:
    return (
        f"download the checkpoint elsewhere and pass {arch}:/path/to/open_clip_model.safetensors "
        f"(OpenAI weights: {arch}-quickgelu:/path/...), or {arch}:random for a smoke run (scores mean nothing)"
    )


def _cached_weights(cfg: dict) -> str | None:
    """A local copy of a pretrained tag's weights (Hugging Face or open_clip URL cache), if any."""
    cache_dir = env_cache_dir()
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            model_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub[:-1], "")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for name in names:
                hit = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # noqa: BLE001 - a broken hub cache only means "not cached"
            pass
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> tuple[bool, str]:
    """Whether `host` can be reached on port 443 within `timeout` seconds (and why not)."""
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"cannot reach {host}: {e.strerror or e}"


class OpenClipBackbone(Backbone):
    """The image tower of an open_clip model (the text tower is dropped; `OpenClipProvider.load_text` builds it)."""

    def __init__(self, visual, preprocess_cfg: dict, info: BackboneInfo, device: str, precision: str = "fp32"):
        from .preprocess import FastPreprocess

        self.visual = visual.eval()
        self.device = device
        self.info = info
        self.precision = precision
        self.preprocess_cfg = preprocess_cfg
        size = preprocess_cfg["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(getattr(visual, "output_dim", 0) or 0)
        self._fast = FastPreprocess(preprocess_cfg)
        self._transform = None
        self._hooks: dict[int, object] = {}
        self._captured: dict[int, object] = {}
        self._head_capture = None  # decompose.HeadCapture for --heads, installed on first use

    # -- preprocessing ----------------------------------------------------------------------
    def preprocess(self, image):
        """Per-image stage of open_clip's eval transform: a uint8 (S, S, 3) array (normalised in `embed`).

        Configurations `FastPreprocess` does not cover fall back to open_clip's own float transform.
        """
        return self.preprocessor()(image)

    def preprocessor(self):
        """The callable `preprocess` applies: small and picklable (no weights), so other processes (the
        Ray engine's decode tasks) preprocess exactly as this backbone does."""
        if self._fast.supported:
            return self._fast
        if self._transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        return self._transform

    def collate(self, items):
        """Stack preprocessed images into one batch (uint8 numpy, or float tensor for the fallback)."""
        import numpy as np

        if isinstance(items[0], np.ndarray):
            return np.stack(items)
        import torch

        return torch.stack(items)

    # -- intermediate layers ----------------------------------------------------------------
    def _blocks(self):
        tr = getattr(self.visual, "transformer", None)
        blocks = getattr(tr, "resblocks", None)
        if blocks is None:
            raise UsageError(f"{self.info.spec}: --layers needs a ViT backbone with transformer blocks")
        return tr, blocks

    def resolve_layers(self, layers) -> tuple[int, ...]:
        """Absolute block indices for `layers` (negative counts from the end); validates the range."""
        if not layers:
            return ()
        _, blocks = self._blocks()
        n = len(blocks)
        out = []
        for i in layers:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise UsageError(f"--layers {i}: {self.info.spec} has {n} transformer blocks")
            out.append(j)
        return tuple(out)

    def _prefix_tokens(self) -> int:
        """Tokens before the patch tokens in a block's output: the CLS token (when the ViT has one)."""
        return 0 if getattr(self.visual, "class_embedding", None) is None else 1

    def _ensure_hooks(self, layers: tuple[int, ...]):
        tr, blocks = self._blocks()
        batch_first = getattr(tr, "batch_first", True)
        skip = self._prefix_tokens()
        for j in layers:
            if j in self._hooks:
                continue

            def hook(_m, _inp, out, j=j):
                x = out[0] if isinstance(out, tuple) else out
                x = x if batch_first else x.transpose(0, 1)  # (n, tokens, width) either way
                self._captured[j] = (x[:, 0], x[:, skip:].float().mean(dim=1))

            self._hooks[j] = blocks[j].register_forward_hook(hook)

    # -- attention heads (--heads) ------------------------------------------------------------
    def resolve_heads(self, n: int) -> dict:
        """``{"blocks": [...], "n_heads": H}`` for the last `n` blocks; a one-line UsageError on a non-ViT."""
        from .decompose import resolve_heads

        return resolve_heads(self.visual, n, self.info.spec)

    def _heads_capture(self, n: int):
        from .decompose import HeadCapture

        blocks = self.resolve_heads(n)["blocks"]
        cap = self._head_capture
        if cap is None or len(cap.blocks) != len(blocks):
            if cap is not None:
                cap.remove()
            cap = self._head_capture = HeadCapture(self.visual, blocks)
        return cap

    # -- inference --------------------------------------------------------------------------
    def embed(self, batch, layers: tuple[int, ...] = (), heads: int = 0):
        """L2-normalised float32 embeddings (and CLS tokens of `layers`) for a batch of tensors.

        With `layers`, "layers" (n, L, W) holds each block's CLS token and "layers_mean" (n, L, W) the
        mean of its patch tokens (every token but the CLS), both L2-normalised.

        `heads` > 0 adds "heads" (n, heads x H, D) and "heads_rest" (n, D), float32: the direct
        contributions of each attention head of the last `heads` blocks and the rest, which sum to
        the embedding before normalisation (`decompose.decompose`).
        """
        layers = self.resolve_layers(layers)
        if layers:
            self._ensure_hooks(layers)
        self._captured.clear()
        cap = self._heads_capture(heads) if heads else None
        if cap is not None:
            cap.active = True
        try:
            return self._forward(batch, layers, cap)
        finally:
            self._captured.clear()
            if cap is not None:
                cap.active, cap.data = False, {}

    def _forward(self, batch, layers: tuple[int, ...], cap) -> dict:
        import contextlib

        import numpy as np
        import torch
        import torch.nn.functional as F

        from .preprocess import normalize_batch

        cuda = self.device.startswith("cuda")
        amp = (
            torch.autocast(device_type="cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)
            if cuda and self.precision in ("bf16", "fp16")
            else contextlib.nullcontext()
        )
        in_dtype = torch.bfloat16 if (self.precision == "bf16" and not cuda) else None
        with torch.inference_mode(), amp:
            if isinstance(batch, np.ndarray):
                x = normalize_batch(batch, self._fast.mean, self._fast.std, self.device, in_dtype)
            else:
                x = batch.to(self.device, non_blocking=True)
                x = x if in_dtype is None else x.to(in_dtype)
            feats = self.visual(x)
            if isinstance(feats, tuple):
                feats = feats[0]
            out = {"embedding": F.normalize(feats.float(), dim=-1).cpu().numpy()}
            if layers:
                cls = torch.stack([self._captured[j][0].float() for j in layers], dim=1)
                out["layers"] = F.normalize(cls, dim=-1).cpu().numpy()
                mean = torch.stack([self._captured[j][1].float() for j in layers], dim=1)
                out["layers_mean"] = F.normalize(mean, dim=-1).cpu().numpy()
            if cap is not None:
                from .decompose import decompose

                with torch.autocast(device_type=self.device.split(":")[0], enabled=False):
                    h, rest = decompose(self.visual, cap)
                out["heads"], out["heads_rest"] = h.cpu().numpy(), rest.cpu().numpy()
        return out


@PROVIDERS.register("openclip")
class OpenClipProvider:
    """Every architecture open_clip knows, with its pretrained tags, local files or random init."""

    @staticmethod
    def list() -> list[tuple[str, list[str]]]:
        """(architecture, pretrained tags) pairs, clipdet's built-in test configs included."""
        oc = _open_clip()
        return [(arch, list(oc.list_pretrained_tags_by_model(arch))) for arch in oc.list_models()]

    @staticmethod
    def describe(spec: str) -> BackboneInfo:
        """Identity of `spec` without building the model (hashes a local weights file)."""
        arch, weights = parse_spec(spec)
        if weights == "random":
            return BackboneInfo(spec, arch, "random", f"random-seed-{RANDOM_SEED}")
        if _is_path(weights):
            if not os.path.isfile(weights):
                raise UsageError(f"backbone {spec!r}: weights file {weights} not found")
            return BackboneInfo(spec, arch, "file", file_sha256(weights))
        return BackboneInfo(spec, arch, "tag", weights)

    @staticmethod
    def load(spec: str, device: str = "auto", precision: str = "auto") -> OpenClipBackbone:
        """Build the model on `device`; raises a one-line clipdet error when that is impossible.

        `precision`: "fp32", "bf16" (CPU: bf16 weights; CUDA: bf16 autocast) or "auto" (bf16 on CUDA,
        and on CPUs with native bf16 matrix units, where embeddings stay within cosine 0.9999 of fp32
        and inference runs about 2-3x faster — see tests/test_speed_paths.py and
        benchmarks/results/extract_speed_cpu.md; CLIPDET_PRECISION overrides "auto").
        """
        model, info, device = OpenClipProvider.build(spec, device)
        import torch

        visual = model.visual
        preprocess_cfg = dict(visual.preprocess_cfg)
        del model
        precision = resolve_precision(precision, device)
        visual = visual.to(device)
        if device.startswith("cuda"):
            visual = visual.to(memory_format=torch.channels_last)
        elif precision == "bf16":
            visual = visual.to(torch.bfloat16)
        pp_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}
        info = BackboneInfo(
            info.spec, info.arch, info.weights, info.weights_id, preprocess=pp_json,
            extra={"embed_dim": int(getattr(visual, "output_dim", 0) or 0), "precision": precision},
        )
        return OpenClipBackbone(visual, preprocess_cfg, info, device, precision)

    @staticmethod
    def load_text(spec: str, device: str = "auto"):
        """The text tower and tokenizer of `spec` (built on demand; see `clipdet.backbones.text`)."""
        from .text import text_tower_of

        model, info, device = OpenClipProvider.build(spec, device)
        return text_tower_of(model, info, _open_clip().get_tokenizer(info.arch), device)

    @staticmethod
    def build(spec: str, device: str = "auto"):
        """The whole open_clip model (image and text towers, fp32, on CPU) for `spec`.

        Returns `(model, info, device)` with `device` resolved; `load` keeps only the image tower,
        `clipdet finetune` trains it and saves the whole model back as an open_clip checkpoint.
        """
        oc = _open_clip()  # first: without the torch extra, one line says how to install it
        import torch

        arch, weights = parse_spec(spec)
        info = OpenClipProvider.describe(spec)
        if arch not in oc.list_models():
            near = [m for m in oc.list_models() if arch.lower().split("-")[0] in m.lower()][:8]
            raise UsageError(
                f"unknown architecture {arch!r}" + (f" (similar: {', '.join(near)})" if near else "")
                + "; `clipdet backbones` lists them"
            )
        device = resolve_device(device)
        kwargs: dict = {}
        pretrained: str | None = None
        if info.weights == "random":
            warnings.warn(
                f"{spec}: RANDOM weights (seed {RANDOM_SEED}) - embeddings carry no learned meaning and "
                "detection scores mean nothing; use only for tests and speed benchmarks",
                stacklevel=2,
            )
        elif info.weights == "file":
            pretrained = weights
        else:
            cfg = oc.get_pretrained_cfg(arch, weights)
            if not cfg:
                tags = oc.list_pretrained_tags_by_model(arch)
                raise UsageError(
                    f"{arch} has no pretrained tag {weights!r}; known tags: {', '.join(tags) or 'none'}"
                    f" (or pass {arch}:/path/to/weights)"
                )
            local = _cached_weights(cfg)
            if local is None:
                ok, why = _online()
                if not ok:
                    raise WeightsUnavailableError(
                        f"weights for {spec} are not cached and cannot be downloaded ({why}): {_weights_hint(arch)}"
                    )
                pretrained = weights  # let open_clip download into its cache
            else:
                pretrained = local
            if cfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
            pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            if pp:
                kwargs["force_preprocess_cfg"] = pp
        quiet = logging.getLogger()
        old = quiet.level
        quiet.setLevel(logging.ERROR)  # open_clip logs "initialized randomly" at WARNING on root
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = oc.create_model(arch, pretrained=pretrained, device="cpu", cache_dir=env_cache_dir(), **kwargs)
        except FileNotFoundError as e:
            raise WeightsUnavailableError(
                f"weights for {spec} could not be fetched ({e}): {_weights_hint(arch)}"
            ) from None
        except Exception as e:  # noqa: BLE001 - asserts, pickle/safetensors errors: all mean "bad checkpoint"
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if info.weights == "file":
                raise BackboneError(f"{weights}: not a valid {arch} checkpoint ({msg})") from None
            raise BackboneError(f"{spec}: could not build the model ({msg})") from None
        finally:
            quiet.setLevel(old)
        return model, info, device

    @staticmethod
    def file_arch(spec: str) -> str:
        """The architecture name under which a saved copy of `spec`'s weights loads identically.

        OpenAI tags force QuickGELU, which a plain `ARCH:/path` load would not: their files load as
        `ARCH-quickgelu:/path` (when open_clip has that config).
        """
        arch, weights = parse_spec(spec)
        info = OpenClipProvider.describe(spec)
        if info.weights != "tag":
            return arch
        oc = _open_clip()
        cfg = oc.get_pretrained_cfg(arch, weights) or {}
        if cfg.get("quick_gelu") and not arch.endswith("-quickgelu") and f"{arch}-quickgelu" in oc.list_models():
            return f"{arch}-quickgelu"
        return arch


def resolve_precision(precision: str | None, device: str) -> str:
    """'auto' → 'bf16' on CUDA and on CPUs with native bf16 support, else 'fp32'; validates the rest."""
    import torch

    precision = (precision or "auto").lower()
    if precision == "auto":
        precision = os.environ.get("CLIPDET_PRECISION", "auto").lower()
    if precision == "auto":
        if device.startswith("cuda"):
            return "bf16"
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return "bf16" if native else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and not device.startswith("cuda"):
        raise UsageError("fp16 inference needs CUDA; use bf16 or fp32 on CPU")
    return precision
