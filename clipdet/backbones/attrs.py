"""Feature-group attributes of a backbone without loading it (for imports of foreign embeddings)."""

from __future__ import annotations

import json
import os

from .._version import __version__
from ..errors import UsageError


def backbone_attrs(spec: str) -> tuple[str, dict]:
    """Cache key and group attrs (backbone, layers, dim) for `spec`, without loading the model."""
    from .registry import describe_backbone

    info = describe_backbone(spec)
    if "onnx" in info.extra:  # an ONNX file says its size only when run: build the session (no torch)
        from .registry import create_backbone

        info = create_backbone(spec, device="cpu").info
        dim = int(info.extra["embed_dim"])
    else:
        dim = _embed_dim(info.arch)
    if not dim:
        raise UsageError(f"--backbone {spec}: unknown embedding size for {info.arch}")
    return info.key, {"backbone": json.loads(info.to_json()), "layers": [], "dim": dim,
                      "clipdet_version": __version__}


def _embed_dim(arch: str) -> int:
    """Embedding size of an open_clip architecture, from its config file (without importing torch)."""
    import importlib.util

    dirs = [os.path.join(os.path.dirname(__file__), "configs")]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.join(p, "model_configs") for p in spec.submodule_search_locations]
    for d in dirs:
        p = os.path.join(d, f"{arch}.json")
        if os.path.exists(p):
            with open(p) as fh:
                return int(json.load(fh).get("embed_dim") or 0)
    import open_clip  # an architecture registered some other way

    return int((open_clip.get_model_config(arch) or {}).get("embed_dim") or 0)
