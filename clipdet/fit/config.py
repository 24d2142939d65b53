"""What a fit is asked to do: `FitConfig`, and parsing of --shots and --param."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError

DEFAULT_TARGET_FPR = 0.05


@dataclass(frozen=True)
class FitConfig:
    """How to fit a detector: head and parameters, shots and seed, calibration, transforms, features.

    Built once (the CLI from its options, library code by hand) and handed to whatever fits: `fit`,
    `fit_from_pool`, the benchmark protocols (one fit per head, K and seed: `replace`), the text-tower
    fits. Where the references come from (paths, manifest, cache, backbone) and where models run
    (device) are not part of it. `calibrate`: held-out labelled image paths for threshold and p_fake
    (default: cross-validation on the references). `unsure_accuracy`: the accuracy each side of the
    threshold must reach on the references' cross-validated scores; scores between form the detector's
    unsure band (`clipdet.detectors.refcv.unsure_band`).
    """

    head: str = "svm"
    params: dict = field(default_factory=dict)
    shots: int | str | None = 10
    seed: int = 0
    view: str = "clean"
    augment_views: bool = False
    per_generator: bool = False
    exclude_generators: tuple[str, ...] = ()
    calibrate: tuple[str, ...] = ()
    target_fpr: float = DEFAULT_TARGET_FPR
    attribute: bool = True
    prune: int = 0
    prune_basis: str = "coord"
    features: str = "image"
    unsure_accuracy: float = 0.9
    #: "" (the head's own features) or "POOL:BLOCKS" (clipdet.detectors.features.parse_blocks): the head
    #: reads those stored blocks' CLS tokens (cls), patch-token means (mean) or both
    blocks: str = ""
    #: how the threshold is placed on the references' scores: "auto" (normal prediction bound when they
    #: are too few for the empirical quantile) or "empirical" (clipdet.detectors.calibration.reference_threshold)
    threshold_rule: str = "auto"
    #: "SIZE:COUNT": also calibrate the detector for scoring on native-resolution tiles (clipdet.fit.tiles)
    tiles: str = ""
    #: the tile rule: auto (learned on the references), mean, max or mix:W (clipdet.detectors.tiles)
    tile_rule: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "params", dict(self.params or {}))
        object.__setattr__(self, "exclude_generators", tuple(self.exclude_generators or ()))
        object.__setattr__(self, "calibrate", tuple(self.calibrate or ()))

    def kind(self, head_kind: str = "embedding") -> tuple[str, str | None]:
        """(feature kind, block selector or None) a head that `needs` `head_kind` reads under this config."""
        if not self.blocks:
            return head_kind, None
        from ..detectors.features import parse_blocks

        kind, sel = parse_blocks(self.blocks)
        if head_kind not in ("embedding", "layers"):
            raise UsageError(f"--blocks {self.blocks}: head {self.head} reads {head_kind} features, not blocks")
        return kind, sel

    def replace(self, **changes) -> FitConfig:
        """A copy with `changes` (field names; an unknown one is a UsageError)."""
        return with_options(self, changes)


def with_options(config: FitConfig | None, options: dict) -> FitConfig:
    """`config` (default: `FitConfig()`) with the fields in `options` replaced; an unknown name is a UsageError."""
    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown fit option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return dataclasses.replace(config or FitConfig(), **options)


def parse_shots(shots: str | int | None) -> int | None:
    """'10' → 10, 'all' or None → None (every reference), '0' → 0 (zero-shot heads only)."""
    if shots is None or (isinstance(shots, str) and shots.strip().lower() == "all"):
        return None
    try:
        k = int(shots)
    except (TypeError, ValueError):
        raise UsageError(f"--shots {shots!r}: expected a positive integer, 0 (zero-shot heads) or 'all'") from None
    if k < 0:
        raise UsageError(f"--shots {shots!r}: expected a positive integer, 0 (zero-shot heads) or 'all'")
    return k


def check_kinds_features(kinds: Sequence[str], features: str) -> None:
    """UsageError when heads reading attention heads / block tokens are asked for caption features."""
    other = [k for k in kinds if k != "embedding"]
    if other and features not in (None, "image"):
        raise UsageError(f"--features {features} applies to the image embedding; heads reading {other[0]} "
                         "features take --features image")


def parse_params(items: Sequence[str]) -> dict:
    """`--param key=value` pairs → dict; values parsed as JSON when possible (numbers, true, null)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
