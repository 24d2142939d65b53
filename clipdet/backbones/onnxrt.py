"""Any ONNX image encoder as a backbone: spec `onnx:PATH`, run by ONNX Runtime, without PyTorch.

The model's preprocessing and output are described by a JSON file beside it, `PATH.json`::

    {"output": "/backbone/layernorm/Add_1_output_0",   # graph value (an intermediate value is fine)
     "token": 0,                  # index, or "mean" (patch tokens); absent when the output is N x D
     "image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "resize": "shortest",        # shortest side to image_size then centre crop; or "squash"
     "interpolation": "bicubic",  # or "bilinear"
     "registers": 0,              # optional: register tokens after the CLS token (skipped by "mean")
     "layers": {"0": "/backbone/encoder/layer.0/Add_1_output_0", ...}}   # optional: block -> value

Embeddings are L2-normalised like every other backbone's; with `--layers`, each block gives its CLS
token ("layers") and the mean of its patch tokens ("layers_mean"). The cache key holds the model file's
SHA-256 and a hash of the JSON's fields, so two different files (or readings of one file) never share
features. A missing or bad JSON, a missing graph value or a wrong input shape is one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from ..errors import BackboneError, UsageError
from .base import PROVIDERS, Backbone, BackboneInfo, file_sha256

_RESIZE = ("shortest", "squash")
_INTERP = ("bicubic", "bilinear")
_SHA_MEMO: dict[tuple, str] = {}


def config_path(path: str) -> str:
    """Where the JSON that describes `path` lives: `PATH.json`."""
    return path + ".json"


def _bad(path: str, why: str) -> UsageError:
    return UsageError(f"{config_path(path)}: {why}")


def read_config(path: str) -> dict:
    """The validated JSON description of the ONNX model at `path` (one-line errors naming the file)."""
    if not os.path.isfile(path):
        raise UsageError(f"onnx:{path}: model file not found")
    cpath = config_path(path)
    if not os.path.isfile(cpath):
        raise UsageError(f"{cpath}: missing; an ONNX backbone needs a JSON beside the model with output, "
                         "image_size, mean, std, resize, interpolation (see README, 'ONNX backbones')")
    try:
        with open(cpath, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _bad(path, "expected a JSON object")
    for k in ("output", "image_size", "mean", "std"):
        if k not in cfg:
            raise _bad(path, f"missing field {k!r}")
    if not isinstance(cfg["output"], str) or not cfg["output"]:
        raise _bad(path, "'output' must be a graph value name")
    if not isinstance(cfg["image_size"], int) or not 8 <= cfg["image_size"] <= 4096:
        raise _bad(path, f"'image_size' must be an integer in 8..4096, not {cfg['image_size']!r}")
    for k in ("mean", "std"):
        v = cfg[k]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise _bad(path, f"{k!r} must be a list of 3 numbers")
    if any(x <= 0 for x in cfg["std"]):
        raise _bad(path, "'std' must be positive")
    cfg.setdefault("resize", "shortest")
    cfg.setdefault("interpolation", "bicubic")
    if cfg["resize"] not in _RESIZE:
        raise _bad(path, f"'resize' must be one of {', '.join(_RESIZE)}, not {cfg['resize']!r}")
    if cfg["interpolation"] not in _INTERP:
        raise _bad(path, f"'interpolation' must be one of {', '.join(_INTERP)}, not {cfg['interpolation']!r}")
    tok = cfg.get("token")
    if tok is not None and not (tok == "mean" or (isinstance(tok, int) and not isinstance(tok, bool))):
        raise _bad(path, f"'token' must be a token index or \"mean\", not {tok!r}")
    reg = cfg.setdefault("registers", 0)
    if not isinstance(reg, int) or reg < 0:
        raise _bad(path, "'registers' must be a non-negative integer")
    layers = cfg.setdefault("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, str) for v in layers.values()):
        raise _bad(path, "'layers' must map block numbers to graph value names")
    try:
        blocks = sorted(int(k) for k in layers)
    except ValueError:
        raise _bad(path, "'layers' keys must be block numbers (\"0\", \"1\", ...)") from None
    if blocks and blocks != list(range(len(blocks))):
        raise _bad(path, f"'layers' must number the blocks 0..{len(blocks) - 1} without gaps")
    return cfg


def _identity_fields(cfg: dict) -> dict:
    keys = ("output", "token", "image_size", "mean", "std", "resize", "interpolation", "registers", "layers", "input")
    return {k: cfg.get(k) for k in keys}


def _model_sha(path: str) -> str:
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        _SHA_MEMO[memo] = file_sha256(path)
    return _SHA_MEMO[memo]


def describe(path: str) -> BackboneInfo:
    """Identity of the ONNX model at `path` without building a session."""
    cfg = read_config(path)
    fields = _identity_fields(cfg)
    cfg_hash = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path).removesuffix(".onnx")) or "model"
    pre = {"size": cfg["image_size"], "mean": cfg["mean"], "std": cfg["std"], "resize_mode": cfg["resize"],
           "interpolation": cfg["interpolation"]}
    return BackboneInfo(f"onnx:{path}", f"onnx-{stem}-{cfg_hash}", "file", _model_sha(path), preprocess=pre,
                        extra={"onnx": fields})


def _providers(device: str) -> tuple[list[str], str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device in (None, "", "auto"):
        device = "cuda" if "CUDAExecutionProvider" in have else "cpu"
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise UsageError(f"--device {device}: ONNX Runtime here has no CUDA provider (install onnxruntime-gpu)")
        order = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have and
                 (p != "TensorrtExecutionProvider" or os.environ.get("CLIPDET_ORT_TENSORRT") == "1")]
        return order + ["CPUExecutionProvider"], device
    if device != "cpu":
        raise UsageError(f"--device {device!r}: an ONNX backbone runs on cpu or cuda")
    return ["CPUExecutionProvider"], "cpu"


def _threads() -> int:
    for var in ("CLIPDET_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 0  # ONNX Runtime's default: one thread per physical core


def _pruned_model(path: str, cfg: dict, wanted: list[str]) -> tuple[bytes, str]:
    """The model cut down to the graph values we read (each made a graph output), serialised, and its input name."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as e:  # noqa: BLE001 - any parse failure of a user's file is one line
        raise UsageError(f"onnx:{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    g = model.graph
    known = {o for n in g.node for o in n.output} | {o.name for o in g.output} | {i.name for i in g.input}
    missing = [w for w in wanted if w not in known]
    if missing:
        raise _bad(path, f"graph value {missing[0]!r} is not in {os.path.basename(path)} "
                         f"(outputs: {', '.join(o.name for o in g.output)})")
    inits = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in inits]
    if len(inputs) != 1 and not cfg.get("input"):
        raise _bad(path, f"the model has {len(inputs)} inputs ({', '.join(inputs)}); name the image one as 'input'")
    name = cfg.get("input") or inputs[0]
    if name not in inputs:
        raise _bad(path, f"input {name!r} is not an input of the model ({', '.join(inputs)})")
    inp = next(i for i in g.input if i.name == name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    s = cfg["image_size"]
    if len(dims) != 4 or any(d is not None and d != want for d, want in zip(dims[1:], (3, s, s))):
        raise _bad(path, f"input {name!r} has shape {['N' if d is None else d for d in dims]}, "
                         f"but image_size {s} needs N x 3 x {s} x {s}")
    _prune(model, wanted)
    return model.SerializeToString(), name


def _prune(model, wanted: list[str]) -> None:
    """Make `wanted` the graph's outputs and drop every node and initializer they do not depend on."""
    from onnx import TensorProto, helper

    g = model.graph
    wanted = list(dict.fromkeys(wanted))
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output)}
    need, keep = set(wanted), []
    for node in reversed(list(g.node)):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            for attr in node.attribute:  # values a subgraph (If/Loop) reads from the outer graph
                for sub in list(attr.g.node if attr.HasField("g") else []) + [n for gg in attr.graphs for n in gg.node]:
                    need.update(i for i in sub.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    outs = [helper.make_tensor_value_info(w, types.get(w) or TensorProto.FLOAT, None) for w in wanted]
    del g.output[:]
    g.output.extend(outs)
    inits = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)


class OnnxBackbone(Backbone):
    """An ONNX image encoder run by ONNX Runtime (no PyTorch); see the module docstring."""

    def __init__(self, path: str, cfg: dict, info: BackboneInfo, device: str = "auto"):
        import onnxruntime as ort

        from .preprocess import FastPreprocess

        self.path, self.cfg = path, cfg
        providers, self.device = _providers(device)
        self.image_size = int(cfg["image_size"])
        self._fast = FastPreprocess(info.preprocess)
        self._mean = np.asarray(cfg["mean"], np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(cfg["std"], np.float32).reshape(1, 3, 1, 1)
        self._blocks = [cfg["layers"][str(i)] for i in range(len(cfg["layers"]))]
        wanted = [cfg["output"]] + self._blocks
        blob, self._input = _pruned_model(path, cfg, wanted)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if _threads():
            opts.intra_op_num_threads = _threads()
        try:
            self.session = ort.InferenceSession(blob, sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001
            raise BackboneError(f"onnx:{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        probe = self.embed(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
        self.embed_dim = int(probe["embedding"].shape[1])
        self.info = BackboneInfo(info.spec, info.arch, info.weights, info.weights_id, info.preprocess,
                                 extra={**info.extra, "embed_dim": self.embed_dim, "precision": "onnx",
                                        "providers": providers})

    def preprocess(self, image):
        """Resize and crop as the JSON says: a uint8 (S, S, 3) array (normalised in `embed`)."""
        return self._fast(image)

    def preprocessor(self):
        """The picklable per-image transform (used by the Ray engine's decode tasks)."""
        return self._fast

    def collate(self, items):
        """Stack preprocessed images into one uint8 batch."""
        return np.stack(items)

    def resolve_layers(self, layers) -> tuple[int, ...]:
        """Absolute block indices for `layers` (negative counts from the end), from the JSON's `layers`."""
        if not layers:
            return ()
        n = len(self._blocks)
        if not n:
            raise UsageError(f"--layers: {config_path(self.path)} names no 'layers' (block -> graph value)")
        out = []
        for i in layers:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise UsageError(f"--layers {i}: {self.info.spec} has {n} blocks")
            if j not in out:
                out.append(j)
        return tuple(out)

    def _pool(self, value: np.ndarray, token, what: str) -> np.ndarray:
        if value.ndim == 2:
            if token is not None and what != "output":
                raise BackboneError(f"{config_path(self.path)}: {what} is N x D, not N x tokens x D")
            return value
        if value.ndim != 3:
            raise BackboneError(f"{config_path(self.path)}: {what} has shape {value.shape}; expected N x D or "
                                "N x tokens x D")
        if token is None:
            raise BackboneError(f"{config_path(self.path)}: output is N x tokens x D ({value.shape}); "
                                "set 'token' (0 for CLS, or \"mean\")")
        if token == "mean":
            return value[:, 1 + int(self.cfg["registers"]):].mean(axis=1)
        if not -value.shape[1] <= token < value.shape[1]:
            raise BackboneError(f"{config_path(self.path)}: token {token} out of range for {value.shape[1]} tokens")
        return value[:, token]

    def embed(self, batch, layers: tuple[int, ...] = (), heads: int = 0):
        """L2-normalised float32 embeddings (and, for `layers`, each block's CLS token and patch-token mean)."""
        if heads:
            raise UsageError(f"--heads: {self.info.spec if hasattr(self, 'info') else self.path} is an ONNX "
                             "backbone; decomposing attention heads needs an open_clip backbone")
        layers = self.resolve_layers(layers) if layers else ()
        x = np.asarray(batch)
        if x.dtype == np.uint8:
            x = (x.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0) - self._mean) / self._std
        names = [self.cfg["output"]] + [self._blocks[j] for j in layers]
        vals = self.session.run(names, {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        out = {"embedding": _l2(self._pool(np.asarray(vals[0], np.float32), self.cfg.get("token"), "output"))}
        if layers:
            blocks = [np.asarray(v, np.float32) for v in vals[1:]]
            if any(b.ndim != 3 for b in blocks):
                raise BackboneError(f"{config_path(self.path)}: a 'layers' value is not N x tokens x D")
            skip = 1 + int(self.cfg["registers"])
            out["layers"] = _l2(np.stack([b[:, 0] for b in blocks], axis=1))
            out["layers_mean"] = _l2(np.stack([b[:, skip:].mean(axis=1) for b in blocks], axis=1))
        return out


def _l2(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


@PROVIDERS.register("onnx")
class OnnxProvider:
    """`onnx:PATH`: any ONNX image encoder described by `PATH.json`."""

    @staticmethod
    def list() -> list[tuple[str, list[str]]]:
        """ONNX models are files: nothing to list."""
        return [("onnx", ["PATH (a .onnx file with PATH.json beside it)"])]

    @staticmethod
    def describe(spec: str) -> BackboneInfo:
        """Identity of `onnx:PATH` (hashes the model file once per process)."""
        return describe(_path_of(spec))

    @staticmethod
    def load(spec: str, device: str = "auto", precision: str = "auto") -> OnnxBackbone:
        """An ONNX Runtime session for the model (`precision` is the file's own: export --int8 for int8)."""
        path = _path_of(spec)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError(f"{spec}: ONNX backbones need onnxruntime: pip install 'clipdet[onnx]'") from None
        return OnnxBackbone(path, read_config(path), describe(path), device)


def _path_of(spec: str) -> str:
    path = spec.split(":", 1)[1] if spec.startswith("onnx:") else spec
    if not path:
        raise UsageError("backbone 'onnx:': expected onnx:PATH to a .onnx file")
    return os.path.expanduser(path)
