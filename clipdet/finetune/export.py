"""What a finished `clipdet finetune` run leaves behind: an open_clip checkpoint, a detector file, train.json.

- `DIR/open_clip_model.safetensors`: the whole open_clip model (text tower as loaded, image tower
  trained, LoRA merged), loadable by every command as `ARCH:DIR/open_clip_model.safetensors`.
- `DIR/detector.clipdet`: a detector fitted with the ordinary fit code (`fewshot.fit_from_pool`) on
  the training images' features extracted with the new weights (cache `DIR/features.h5`), calibrated
  on the validation images when they hold both classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .data import Item

MODEL_FILE = "open_clip_model.safetensors"
DETECTOR_FILE = "detector.clipdet"
FEATURES_FILE = "features.h5"
TRAIN_JSON = "train.json"


def save_open_clip(full_model, visual, path: str) -> str:
    """Save `full_model`'s state with its image tower replaced by `visual` (merged) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v for k, v in full_model.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v for k, v in visual.state_dict().items()})
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _refs(items: Sequence[Item]):
    from ..extract.discover import ImageRef

    return [ImageRef(it.path, it.label, it.generator or None) for it in items]


def fit_detector(out_dir: str, spec: str, train_items: Sequence[Item], val_items: Sequence[Item], head: str = "svm",
                 params: dict | None = None, seed: int = 0, target_fpr: float = 0.05, device: str = "auto",
                 quiet: bool = True, extra_meta: dict | None = None):
    """Extract features of the training (and validation) images with `spec`, fit and save `DIR/detector.clipdet`.

    Returns (detector, files skipped during extraction).
    """
    from ..cache import FeatureCache
    from ..fit.head import fit_from_pool
    from ..fit.pools import pool_from_refs

    cache = FeatureCache(os.path.join(out_dir, FEATURES_FILE))
    pool, key, rec, summary = pool_from_refs(_refs(train_items), cache, spec, "clean", ["clean"], device, quiet)
    skipped = list(summary.errors)
    cal = None
    if {it.label for it in val_items} == {"real", "fake"}:
        cal, _, _, vsum = pool_from_refs(_refs(val_items), cache, spec, "clean", ["clean"], device, quiet)
        skipped += vsum.errors
        if set(cal.label) != {"real", "fake"}:
            cal = None
    meta = {"backbone": rec, "backbone_key": key, "view": "clean", "shots": "all", "per_generator": False,
            "exclude_generators": [], "augment_views": False,
            "candidates": {"real": pool.label.count("real"), "fake": pool.label.count("fake")},
            "finetune": dict(extra_meta or {})}
    det = fit_from_pool(pool, head=head, params=params, target_fpr=target_fpr, seed=seed, calibration=cal, meta=meta)
    det.save(os.path.join(out_dir, DETECTOR_FILE))
    return det, skipped


def write_json(path: str, record: dict) -> str:
    """Write `record` as indented JSON to `path` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
