"""`clipdet finetune`: fine-tune the image tower (needs the finetune extra)."""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_PARTIAL, app, err, quiet_warnings, run_command
from .options import ManifestOpt, QuietOpt


@app.command()
def finetune(
    paths: List[str] = typer.Argument(None, help="Labelled training images (layout real/**, fake/<generator>/**)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="ARCH:PRETRAINED, ARCH:/path/to/weights "
                                           "or ARCH:random [default: ViT-L-14:openai]"),
    out: str = typer.Option(..., "--out", "-o", help="Output folder: open_clip_model.safetensors, detector.clipdet, "
                            "train.json, checkpoint.pt"),
    manifest: Optional[str] = ManifestOpt,
    mode: str = typer.Option("lora", "--mode", help="lora (PEFT adapters on attention + MLP projections), "
                             "last-blocks, or full"),
    blocks: int = typer.Option(2, "--blocks", min=1, help="Blocks to unfreeze with --mode last-blocks"),
    lora_rank: int = typer.Option(8, "--lora-rank", min=1, help="LoRA rank (alpha = 2 x rank)"),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Training epochs"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per optimiser step"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the tower (head: 10x) "
                                       "[default: lora 2e-4, last-blocks 2e-5, full 1e-5]"),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0, help="AdamW weight decay"),
    val: List[str] = typer.Option(None, "--val", help="Held-out validation images (repeatable; refused if they "
                                  "overlap the training images)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Without --val: fraction of each class held out "
                                       "(drawn by SHA-256 and --seed)"),
    seed: int = typer.Option(0, "--seed", help="Seed for split, order, augmentation, init and the detector"),
    class_weight: str = typer.Option("balanced", "--class-weight", help="balanced (inverse class frequency) or none"),
    focal_gamma: float = typer.Option(0.0, "--focal-gamma", min=0.0, help="Focal loss gamma (0: cross-entropy)"),
    sam_rho: float = typer.Option(0.0, "--sam-rho", min=0.0, help="Sharpness-aware minimisation radius (0: off; "
                                  "doubles the cost of a step)"),
    crop_scale: float = typer.Option(0.5, "--crop-scale", help="Smallest area fraction of the random resized crop"),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips"),
    jpeg_p: float = typer.Option(0.0, "--jpeg-p", help="Probability of a JPEG re-encode (quality 60-95) per image"),
    blur_p: float = typer.Option(0.0, "--blur-p", help="Probability of a Gaussian blur (sigma 0.1-1.5) per image"),
    head: str = typer.Option("svm", "--head", help="Head of the detector fitted on the new features"),
    param: List[str] = typer.Option(None, "--param", "-p", help="Detector head parameter key=value (repeatable)"),
    target_fpr: float = typer.Option(0.05, "--target-fpr", help="Detector threshold's false-positive rate"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, "
                                  "or bf16 (autocast, also on CPU)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding threads [default: by device]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished epoch"),
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune the backbone's image tower for detection + generator attribution; writes an open_clip
    checkpoint (use it as ARCH:DIR/open_clip_model.safetensors) and a detector fitted on its features."""
    quiet_warnings(quiet)

    def go():
        from ..backbones import DEFAULT_BACKBONE
        from ..finetune import finetune as run_finetune
        from ..fit.config import parse_params

        r = run_finetune(paths or None, backbone=backbone or DEFAULT_BACKBONE, out=out, manifest=manifest, mode=mode,
                         blocks=blocks, lora_rank=lora_rank, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, val=val or None, val_fraction=val_fraction, seed=seed,
                         class_weight=class_weight, focal_gamma=focal_gamma, sam_rho=sam_rho, crop_scale=crop_scale,
                         flip=flip, jpeg_p=jpeg_p, blur_p=blur_p, head=head, params=parse_params(param or []),
                         target_fpr=target_fpr, device=device, precision=precision, workers=workers, resume=resume,
                         quiet=quiet, log=None if quiet else err)
        for path, reason in r.errors:
            err(f"skipped {path}: {reason}")
        for note in r.notes:
            err(f"note: {note}")
        typer.echo(f"wrote {r.out_dir}: backbone {r.backbone_spec}; detector {r.detector_path}; "
                   f"{len(r.history)} epoch(s), {r.val_line()}, classes {', '.join(r.classes)}")
        return r

    r = run_command(go)
    raise typer.Exit(EXIT_PARTIAL if r.errors else EXIT_OK)
