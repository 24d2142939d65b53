"""A backbone loaded on first use, and per-device defaults (batch size, loader threads), without importing torch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from ..errors import BackboneError, ClipdetError, UsageError


class LazyBackbone:
    """A backbone loaded on first use (from any thread), so an all-cached run never loads a model.

    `key` is the backbone's cache key; given explicitly (e.g. from a detector file) it lets a run
    that needs no model skip even describing the spec, and a loaded model must then match it.
    Checks registered with `on_load` run once, when the model is loaded (or at once if it is).
    """

    def __init__(self, spec: str, device: str = "auto", layers: Sequence[int] = (), key: str | None = None,
                 loaded=None, precision: str = "auto", heads: int = 0):
        self.spec, self.device, self.layers, self.precision = spec, device, tuple(layers), precision
        self.heads = int(heads or 0)  # --heads N: decompose the last N blocks' attention heads
        self.heads_spec: dict | None = None  # {"blocks", "n_heads"} once the model is loaded
        # asked for by the caller (not copied from a cache group): checked against the cache even when
        # nothing is new
        self.explicit = bool(self.layers) or bool(self.heads)
        self._key = key if key is not None else (loaded.info.key if loaded is not None else None)
        self._model = None
        self._lock = threading.RLock()
        self._checks: list[Callable] = []
        self._check_keys: set = set()
        self._failed: ClipdetError | None = None
        self.absolute_layers: tuple[int, ...] = ()
        if loaded is not None:
            self._install(loaded)

    @property
    def key(self) -> str:
        """Cache key of the backbone (describes the spec if needed; hashes a local weights file once)."""
        if self._key is None:
            from ..backbones import describe_backbone

            self._key = describe_backbone(self.spec).key
        return self._key

    @property
    def loaded(self) -> bool:
        """Whether the model has been built."""
        return self._model is not None

    def _install(self, model) -> None:
        if self._key is not None and model.info.key != self._key:
            raise UsageError(
                f"backbone {self.spec} has key {model.info.key}, but {self._key} is required "
                "(different weights from the ones the features/detector were made with)"
            )
        self._key = model.info.key
        self.absolute_layers = model.resolve_layers(self.layers) if hasattr(model, "resolve_layers") else self.layers
        if self.heads:
            if not hasattr(model, "resolve_heads"):
                raise UsageError(f"--heads: backbone {self.spec} cannot decompose its embedding into attention heads")
            self.heads_spec = model.resolve_heads(self.heads)
        self._model = model
        for check in self._checks:
            check(model, self.absolute_layers)

    def adopt(self, model) -> None:
        """Take `model` as the loaded backbone unless one is loaded: e.g. the description of the model a
        Ray actor loaded (`.info`, `.resolve_layers`). The key must match; `on_load` checks run as for a load."""
        with self._lock:
            if self._model is None:
                self._install(model)
            elif model.info.key != self.key:
                raise UsageError(f"backbone {self.spec}: workers loaded {model.info.key}, expected {self.key}")

    def on_load(self, check: Callable, key=None) -> None:
        """Run `check(model, absolute_layers)` when the model is loaded (now, if it already is).

        A check registered again under the same `key` (e.g. each chunk of a scoring run against the
        same cache and views) is not added or run twice.
        """
        with self._lock:
            if key is not None:
                if key in self._check_keys:
                    return
                self._check_keys.add(key)
            self._checks.append(check)
            if self._model is not None:
                check(self._model, self.absolute_layers)

    def get(self):
        """The loaded backbone (built on first call).

        A failed load (or failed check) is remembered and re-raised: the loader threads waiting on it
        must not each retry it (N model builds, N network probes), nor report it as a per-file error.
        """
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._model is None:
                from ..backbones import create_backbone

                try:
                    self._install(create_backbone(self.spec, device=self.device, precision=self.precision))
                except ClipdetError as e:
                    self._model, self._failed = None, e
                    raise
                except Exception as e:  # noqa: BLE001 - a model bug is a backbone error, not a bad image
                    self._model = None
                    self._failed = BackboneError(f"{self.spec}: cannot load the backbone ({type(e).__name__}: {e})")
                    raise self._failed from None
            return self._model

    def preprocess(self, image):
        """Preprocess with the backbone's transform (loading it if needed)."""
        return self.get().preprocess(image)

    def image_size(self) -> int:
        """The backbone's input size in pixels."""
        return int(self.get().image_size)


def likely_cuda(device: str) -> bool:
    """Whether `device` is (or 'auto' will probably resolve to) CUDA, without importing torch."""
    if device == "auto":
        return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""
    return device.startswith("cuda")


def default_batch_size(device: str) -> int:
    """Batch size for `device` when the user gives none (GPU: large batches keep the GPU busy)."""
    return 256 if likely_cuda(device) else 32


def default_workers(device: str) -> int:
    """Loader threads for `device` when the user gives none.

    On a GPU machine decoding is the bottleneck: use most cores. On CPU the model itself needs the
    cores; one loader thread overlaps decoding with inference (benchmarks/extract_speed.py).
    """
    n = os.cpu_count() or 1
    if likely_cuda(device):
        return max(2, min(n - 1, 16))
    return 1 if n <= 4 else min(n // 4, 4)
