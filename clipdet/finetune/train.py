"""The training loop of `clipdet finetune`: AdamW, warm-up + cosine LR, class-weighted/focal loss, optional
SAM, bf16 autocast on CUDA, per-epoch validation, and an atomic checkpoint after every epoch.

Determinism: batch order and augmentation are functions of (seed, epoch, image) (see `data`), the
torch RNG state is saved in each checkpoint and restored on resume, and the learning rate is a
function of the global step. On CPU with a fixed thread count, a run killed mid-epoch and resumed
from its last checkpoint ends with the same weights as an uninterrupted run (tested).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..detectors.mlp import sam_ascend, sam_descend, weighted_loss
from ..errors import UsageError
from .data import Augment, Item, epoch_order, load_view, sample_rng

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
#: The freshly initialised head learns this many times faster than the tower.
HEAD_LR_MULT = 10.0


@dataclass
class TrainConfig:
    """Optimisation settings (everything that changes the trained weights)."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of all steps
    class_weight: str = "balanced"  # or "none"
    focal_gamma: float = 0.0
    sam_rho: float = 0.0
    seed: int = 0

    def check(self) -> None:
        """`UsageError` for values out of range."""
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: expected >= 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: expected >= 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: expected > 0")
        if self.class_weight not in ("balanced", "none"):
            raise UsageError(f"--class-weight {self.class_weight!r}: expected balanced or none")
        if self.focal_gamma < 0 or self.sam_rho < 0 or self.weight_decay < 0:
            raise UsageError("--focal-gamma, --sam-rho and --weight-decay must be >= 0")


@dataclass
class Batches:
    """How to turn items into normalised input tensors on the device."""

    augment: Augment
    eval_transform: Callable  # PIL image -> uint8 array or float tensor (the backbone's preprocess)
    mean: tuple
    std: tuple
    device: str
    workers: int = 1
    errors: list[tuple[str, str]] = field(default_factory=list)

    def _load(self, jobs, fn):
        from ..extract.pipeline import iter_prepared

        arrays, keep = [], []
        for i, (arr, error) in enumerate(iter_prepared(jobs, self.workers, fn, prefetch=2 * max(1, self.workers))):
            if error:
                self.errors.append((jobs[i][0].path if isinstance(jobs[i], tuple) else jobs[i].path, error))
                continue
            arrays.append(arr)
            keep.append(i)
        return arrays, keep

    def _tensor(self, arrays):
        from ..backbones.preprocess import normalize_batch

        if isinstance(arrays[0], np.ndarray):
            return normalize_batch(np.stack(arrays), self.mean, self.std, self.device)
        return torch.stack(arrays).to(self.device)

    def train(self, items: Sequence[Item], seed: int, epoch: int):
        """(x, kept positions) of the augmented training views of `items` (bad files dropped, reported)."""
        jobs = [(it, sample_rng(seed, epoch, it)) for it in items]
        arrays, keep = self._load(jobs, lambda job: load_view(job[0], self.augment, job[1]))
        return (self._tensor(arrays) if arrays else None), keep

    def eval(self, items: Sequence[Item]):
        """(x, kept positions) of the evaluation views of `items` (the same preprocessing as extract)."""
        arrays, keep = self._load(list(items), lambda it: load_view(it, self.eval_transform))
        return (self._tensor(arrays) if arrays else None), keep


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    """Inverse-frequency ('balanced', as scikit-learn's) or unit weights per class; absent classes get 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if mode == "none":
        w = np.ones(n_classes)
    else:
        present = counts > 0
        w = np.zeros(n_classes)
        w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warm-up over `warmup` x `total` steps, then cosine decay to 0 at `total`."""
    w = max(1, int(round(total * warmup))) if warmup > 0 else 0
    if step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _binary_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Real-vs-generated AUC from class probabilities (column 0 = real)."""
    from ..evaluate.metrics import roc_auc

    return roc_auc((y > 0).astype(np.int64), 1.0 - probs[:, 0]) if len(y) else float("nan")


def evaluate_items(model, batches: Batches, items: Sequence[Item], classes: Sequence[str], weights, cfg,
                   precision: str) -> dict:
    """Loss, real-vs-generated AUC and attribution accuracy of `model` on `items` (eval transform)."""
    if not items:
        return {"loss": None, "auc": None, "accuracy": None, "n": 0}
    index = {c: i for i, c in enumerate(classes)}
    model.eval()
    logits, ys = [], []
    with torch.no_grad():
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start:start + cfg.batch_size]
            x, keep = batches.eval(chunk)
            if x is None:
                continue
            with _autocast(batches.device, precision):
                logits.append(model(x).float().cpu())
            ys += [index.get(chunk[i].class_name, -1) for i in keep]
    if not logits:
        return {"loss": None, "auc": None, "accuracy": None, "n": 0}
    z, y = torch.cat(logits), torch.as_tensor(ys)
    known = y >= 0  # validation classes the training set lacks count for AUC only
    loss = float(weighted_loss(z[known], y[known], weights, cfg.focal_gamma)) if known.any() else None
    probs = torch.softmax(z, dim=1).numpy()
    yb = np.array([0 if c == 0 else 1 for c in ys])
    acc = float((z[known].argmax(1) == y[known]).float().mean()) if known.any() else None
    return {"loss": loss, "auc": _finite(_binary_auc(yb, probs)), "accuracy": acc, "n": int(len(ys))}


def _finite(v):
    return None if v is None or not math.isfinite(v) else float(v)


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` with torch.save to `path` atomically (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by `save_checkpoint` (tensors and plain data only: no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, edited, or not a checkpoint at all
        raise UsageError(f"{path}: not a readable clipdet finetune checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not a clipdet finetune checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def train(model, train_items: Sequence[Item], val_items: Sequence[Item], classes: Sequence[str],
          batches: Batches, cfg: TrainConfig, out_dir: str, fingerprint: dict, resume: bool = False,
          precision: str = "fp32", quiet: bool = True, on_step: Callable | None = None,
          log: Callable[[str], None] | None = None) -> list[dict]:
    """Train `model` for `cfg.epochs` epochs, checkpointing to `out_dir/checkpoint.pt`; returns the history.

    `on_step(step, epoch, loss)` is called after every optimiser step (an exception there stops the
    run like a kill would: the last checkpoint stays as it was). With `resume`, training continues
    after the last completed epoch of the checkpoint, whose `fingerprint` must equal this run's.
    """
    from ..extract.progress import Progress

    cfg.check()
    index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([index[it.class_name] for it in train_items], dtype=np.int64)
    weights = class_weights(y_all, len(classes), cfg.class_weight).to(batches.device)
    params = [p for p in model.parameters() if p.requires_grad]
    is_head = {id(p) for p in (*model.head.parameters(), model.logit_scale)}
    groups = [{"params": [p for p in params if id(p) not in is_head], "lr_mult": 1.0},
              {"params": [p for p in params if id(p) in is_head], "lr_mult": HEAD_LR_MULT}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    start_epoch, step = 0, 0
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    if resume:
        for stale in glob.glob(glob.escape(ckpt_path) + ".tmp-*"):  # left by a run killed while saving
            os.unlink(stale)
        state = load_checkpoint(ckpt_path)
        if state.get("fingerprint") != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                          if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise UsageError(f"{ckpt_path}: --resume with different settings or data ({', '.join(diff)}); "
                             "pass the original options or start a new --out")
        model.load_trainable_state(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if batches.device.startswith("cuda") and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device=batches.device)
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        if log:
            log(f"resuming after epoch {start_epoch} of {cfg.epochs} (step {step})")
    ips = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = epoch_order(len(train_items), cfg.seed, epoch)
        bar = Progress(len(train_items), quiet, f"epoch {epoch + 1}/{cfg.epochs}")
        loss_sum, n_seen, t0 = 0.0, 0, time.perf_counter()
        probs, ys = [], []
        try:
            for start in range(0, len(order), cfg.batch_size):
                chunk = [train_items[i] for i in order[start:start + cfg.batch_size]]
                x, keep = batches.train(chunk, cfg.seed, epoch)
                if x is None:
                    step += 1
                    continue
                yb = torch.as_tensor([index[chunk[i].class_name] for i in keep], device=batches.device)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup) * g["lr_mult"]
                opt.zero_grad(set_to_none=True)
                with _autocast(batches.device, precision):
                    logits = model(x)
                loss = weighted_loss(logits.float(), yb, weights, cfg.focal_gamma)
                loss.backward()
                if cfg.sam_rho > 0:  # SAM, as in the mlp head
                    eps = sam_ascend(params, cfg.sam_rho)
                    opt.zero_grad(set_to_none=False)
                    with _autocast(batches.device, precision):
                        second = model(x)
                    weighted_loss(second.float(), yb, weights, cfg.focal_gamma).backward()
                    sam_descend(params, eps)
                opt.step()
                step += 1
                loss_sum += loss.item() * len(keep)
                n_seen += len(keep)
                probs.append(torch.softmax(logits.detach().float(), 1).cpu().numpy())
                ys += yb.cpu().tolist()
                ips = n_seen / max(1e-9, time.perf_counter() - t0)
                bar.update(len(chunk))
                if bar.bar is not None:
                    bar.bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", img_s=f"{ips:.1f}")
                if on_step is not None:
                    on_step(step, epoch, loss.item())
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        train_auc = _binary_auc(np.array([0 if c == 0 else 1 for c in ys]), np.vstack(probs)) if probs else float("nan")
        val = evaluate_items(model, batches, val_items, classes, weights, cfg, precision)
        history.append({
            "epoch": epoch + 1, "steps": step, "train_loss": loss_sum / n_seen if n_seen else None,
            "train_auc": _finite(train_auc), "val_loss": val["loss"], "val_auc": val["auc"],
            "val_accuracy": val["accuracy"], "n_train": n_seen, "n_val": val["n"],
            "seconds": round(seconds, 3), "images_per_s": round(n_seen / seconds, 3) if seconds > 0 else None,
        })
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(batches.device) if batches.device.startswith("cuda") else None}
        save_checkpoint(ckpt_path, {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": step,
                                    "model": model.trainable_state(), "optimizer": opt.state_dict(),
                                    "rng": rng, "history": history, "fingerprint": fingerprint})
        if log:
            h = history[-1]
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {_fmt(h['train_loss'])}, val loss "
                f"{_fmt(h['val_loss'])}, val AUC {_fmt(h['val_auc'])}, {h['images_per_s'] or 0:.1f} img/s")
    return history


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
