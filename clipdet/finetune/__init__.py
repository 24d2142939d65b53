"""`clipdet finetune`: fine-tune the CLIP image tower for detection + generator attribution (Moskowitz et al. 2024).

Pipeline: list and label the images (safe decoding; bad files reported and skipped) → validation
split (by SHA-256 and seed, stratified by class) or `--val` images (refused when they overlap the
training images) → image tower + linear head over real + each generator, trained in `lora` (PEFT),
`last-blocks` or `full` mode with an atomic checkpoint per epoch (`--resume` continues a killed run)
→ `DIR/open_clip_model.safetensors` (merged weights, loadable as `ARCH:DIR/open_clip_model.safetensors`),
`DIR/detector.clipdet` (fitted by the ordinary fit code on features of the new weights) and
`DIR/train.json` (config, data manifest hash, per-epoch loss/AUC, versions).

Needs the `finetune` extra (PEFT) for `--mode lora`; torch and PEFT are imported only when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import OverlapError, UsageError

#: Default learning rate per mode (the head learns at 10x this).
DEFAULT_LR = {"lora": 2e-4, "last-blocks": 2e-5, "full": 1e-5}


@dataclass
class FinetuneResult:
    """Where a run wrote its outputs, what it measured, and what it skipped."""

    out_dir: str
    backbone_spec: str  # ARCH:DIR/open_clip_model.safetensors
    model_path: str
    detector_path: str
    train_json: str
    history: list[dict]
    classes: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: object = None  # the trained FinetuneModel (LoRA merged)
    detector: object = None


def _manifest(items) -> str:
    import numpy as np

    from ..evaluate.record import manifest_hash
    from ..fit.pools import Pool

    return manifest_hash(Pool([it.sha256 for it in items], [it.label for it in items],
                              [it.generator for it in items], [it.path for it in items], np.zeros((len(items), 0))))


def _train_pool(items):
    import numpy as np

    from ..fit.pools import Pool

    return Pool([it.sha256 for it in items], [it.label for it in items], [it.generator for it in items],
                [it.path for it in items], np.zeros((len(items), 0)))


def _check_out_dir(out: str, resume: bool) -> None:
    from .export import DETECTOR_FILE, MODEL_FILE
    from .train import CHECKPOINT

    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    ckpt = os.path.join(out, CHECKPOINT)
    if resume:
        if not os.path.isfile(ckpt):
            raise UsageError(f"--resume: {ckpt} not found (nothing to resume; drop --resume to start)")
        return
    done = [f for f in (CHECKPOINT, MODEL_FILE, DETECTOR_FILE) if os.path.exists(os.path.join(out, f))]
    if done:
        raise UsageError(f"--out {out} already holds {', '.join(done)} from an earlier run; pass --resume to "
                         "continue it, or choose another --out (nothing is overwritten)")


def finetune(
    paths: Sequence[str] | None,
    *,
    backbone: str,
    out: str,
    manifest: str | None = None,
    mode: str = "lora",
    blocks: int = 2,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float | None = None,
    weight_decay: float = 0.05,
    val: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    class_weight: str = "balanced",
    focal_gamma: float = 0.0,
    sam_rho: float = 0.0,
    crop_scale: float = 0.5,
    flip: bool = True,
    jpeg_p: float = 0.0,
    blur_p: float = 0.0,
    head: str = "svm",
    params: dict | None = None,
    target_fpr: float = 0.05,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    resume: bool = False,
    quiet: bool = True,
    on_step: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `backbone` on labelled images and write the checkpoint, detector and train.json to `out`.

    The library form of `clipdet finetune` (see the module docstring). `on_step(step, epoch, loss)`
    is called after each optimiser step; raising there interrupts the run as a kill would.
    """
    from ..errors import require

    require("torch", "torch", "clipdet finetune (it trains the image tower)")
    from ..backbones.openclip import OpenClipBackbone, OpenClipProvider
    from ..evaluate.record import run_record, versions
    from ..extract.discover import discover
    from ..extract.lazy import default_workers
    from .data import Augment, class_names, list_images, need_classes, split_validation
    from .export import MODEL_FILE, TRAIN_JSON, fit_detector, save_open_clip, write_json
    from .model import MODES, build_model
    from .train import Batches, TrainConfig, train

    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if not 0 < crop_scale <= 1:
        raise UsageError(f"--crop-scale {crop_scale}: expected a number in (0, 1]")
    if not (0 <= jpeg_p <= 1 and 0 <= blur_p <= 1):
        raise UsageError("--jpeg-p and --blur-p are probabilities in [0, 1]")
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--precision {precision!r}: expected auto, fp32 or bf16")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr if lr is not None else DEFAULT_LR[mode],
                      weight_decay=weight_decay, class_weight=class_weight, focal_gamma=focal_gamma,
                      sam_rho=sam_rho, seed=seed)
    cfg.check()
    if not paths and not manifest:
        raise UsageError("give at least one PATH (folder, file or - for stdin) or --manifest CSV")
    _check_out_dir(out, resume)
    workers = default_workers(device) if workers is None else workers

    listing = list_images(discover(list(paths or []), manifest=manifest), workers)
    errors, notes = list(listing.errors), list(listing.notes)
    if val:
        val_listing = list_images(discover(list(val)), workers)
        errors += val_listing.errors
        train_items, val_items = listing.items, val_listing.items
        overlap = {it.sha256 for it in train_items} & {it.sha256 for it in val_items}
        if overlap:
            raise OverlapError(f"{len(overlap)} --val image(s) are also training images (same content); "
                               "validation must be held out")
    else:
        train_items, val_items = split_validation(listing.items, val_fraction, seed)
    need_classes(train_items, "finetune")
    classes = class_names(train_items)
    unseen = sorted({it.class_name for it in val_items} - set(classes))
    if unseen:
        notes.append(f"validation classes absent from training (count for AUC only): {', '.join(unseen)}")

    full, info, device = OpenClipProvider.build(backbone, device)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    visual = full.visual.to(device)
    bb = OpenClipBackbone(visual, dict(visual.preprocess_cfg), info, device, "fp32")
    pp = bb.preprocess_cfg
    model = build_model(visual, len(classes), mode, blocks, lora_rank, lora_alpha, seed=seed).to(device)
    batches = Batches(Augment(bb.image_size, scale=(crop_scale, 1.0), flip=flip, jpeg_p=jpeg_p, blur_p=blur_p),
                      bb.preprocess, tuple(pp["mean"]), tuple(pp["std"]), device, workers)
    options = {"mode": mode, "blocks": blocks if mode == "last-blocks" else None,
               "lora_rank": lora_rank if mode == "lora" else None,
               "lora_alpha": (lora_alpha or 2 * lora_rank) if mode == "lora" else None,
               "crop_scale": crop_scale, "flip": flip, "jpeg_p": jpeg_p, "blur_p": blur_p,
               "val_fraction": None if val else val_fraction, "precision": precision}
    fingerprint = {"backbone_weights_id": info.weights_id, "backbone_arch": info.arch, "classes": classes,
                   "train_manifest": _manifest(train_items), "val_manifest": _manifest(val_items),
                   **{k: v for k, v in vars(cfg).items()}, **options}
    os.makedirs(out, exist_ok=True)
    history = train(model, train_items, val_items, classes, batches, cfg, out, fingerprint, resume=resume,
                    precision=precision, quiet=quiet, on_step=on_step, log=log)
    errors += sorted(set(batches.errors) - set(errors))

    tower = model.merge()
    model.eval()
    model_path = save_open_clip(full, tower, os.path.join(out, MODEL_FILE))
    spec = f"{OpenClipProvider.file_arch(backbone)}:{os.path.abspath(model_path)}"
    config = {"paths": list(paths or []), "manifest": manifest, "val": list(val or []), "base_backbone": backbone,
              "backbone": spec, **vars(cfg), **options, "head": head, "params": dict(params or {}),
              "target_fpr": target_fpr, "device": device, "workers": workers}
    det, skipped = fit_detector(out, spec, train_items, val_items, head=head, params=params, seed=seed,
                                target_fpr=target_fpr, device=device, quiet=quiet,
                                extra_meta={"base_backbone": backbone, "mode": mode, "classes": classes})
    errors += [e for e in skipped if e not in errors]
    trained_pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    if det.backbone.get("preprocess") and det.backbone["preprocess"] != trained_pp:
        notes.append(f"{spec} loads with different preprocessing ({det.backbone['preprocess']}) than training "
                     f"used ({trained_pp}): the tag's own preprocessing is not stored in a weights file")
    record = run_record(config, _train_pool(train_items))
    record["versions"] = {**versions(), **_extra_versions()}
    record.update({
        "classes": classes, "history": history,
        "counts": {"train": _counts(train_items), "val": _counts(val_items)},
        "val_manifest_hash": fingerprint["val_manifest"], "backbone_spec": spec,
        "outputs": {"model": MODEL_FILE, "detector": "detector.clipdet", "checkpoint": "checkpoint.pt",
                    "features": "features.h5"},
        "skipped": [{"path": p, "reason": r} for p, r in errors][:1000], "notes": notes,
    })
    if info.weights == "random":
        record["notes"] = notes + ["RANDOM base weights: losses and AUCs say nothing about detection quality"]
    train_json = write_json(os.path.join(out, TRAIN_JSON), record)
    return FinetuneResult(out, spec, model_path, os.path.join(out, "detector.clipdet"), train_json, history, classes,
                          errors, record["notes"], model, det)


def _counts(items) -> dict:
    out: dict[str, int] = {}
    for it in items:
        out[it.class_name] = out.get(it.class_name, 0) + 1
    return dict(sorted(out.items()))


def _extra_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("peft", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


__all__ = ["DEFAULT_LR", "FinetuneResult", "finetune"]
