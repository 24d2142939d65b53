"""The backbone registry: spec strings → providers (open_clip by default) → backbones."""

from __future__ import annotations

from ..errors import UsageError
from .base import PROVIDERS, Backbone, BackboneInfo

DEFAULT_BACKBONE = "ViT-L-14:openai"


def _provider_for(spec: str):
    if spec.startswith("onnx:"):  # onnx:PATH — any ONNX image encoder (needs no torch)
        from . import onnxrt  # noqa: F401  (registers itself)

        return PROVIDERS.get("onnx"), spec
    from . import openclip  # noqa: F401  (registers itself)

    prefix, sep, rest = spec.partition("::")
    if sep and prefix in PROVIDERS:
        return PROVIDERS.get(prefix), rest
    return PROVIDERS.get("openclip"), spec


def describe_backbone(spec: str) -> BackboneInfo:
    """Identity of a backbone (cache key, weights id) without building the model."""
    provider, rest = _provider_for(spec)
    return provider.describe(rest)


def create_backbone(spec: str, device: str = "auto", **kwargs) -> Backbone:
    """Build the backbone named by `spec` on `device` ('auto', 'cpu', 'cuda', 'cuda:1', ...)."""
    provider, rest = _provider_for(spec)
    return provider.load(rest, device=device, **kwargs)


def create_text_tower(spec: str, device: str = "auto"):
    """The text tower + tokenizer of `spec` (zero-shot prompts, captions); image-only runs never build it."""
    provider, rest = _provider_for(spec)
    if not hasattr(provider, "load_text"):
        raise UsageError(f"backbone {spec}: this backbone has no text tower")
    return provider.load_text(rest, device=device)


def list_backbones() -> list[tuple[str, list[str]]]:
    """(architecture, [pretrained tags]) for every architecture the providers know."""
    from . import onnxrt, openclip  # noqa: F401

    out = []
    for name in PROVIDERS.names():
        out.extend(PROVIDERS.get(name).list())
    return out

