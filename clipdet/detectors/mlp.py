"""Small MLP head with an imbalance-aware loss and sharpness-aware minimisation (Santosh et al. 2024).

Architecture: ``Linear(d, hidden) -> ReLU -> Dropout -> Linear(hidden, n_classes)``, trained with
AdamW on a class-weighted cross-entropy (weights by inverse class frequency with
``class_weight="balanced"``), optionally focal (``focal_gamma > 0`` multiplies each term by
``(1 - p_true) ** gamma``). With ``sam_rho > 0`` every step is a SAM step (Foret et al. 2021):
the gradient at ``w + rho * g / ||g||`` updates ``w``.

Training is deterministic for a given ``random_state``: weight init, dropout masks, mini-batch
order and the validation split all come from one local ``torch.Generator`` (the global torch RNG
is never touched), and torch's CPU kernels are deterministic for a fixed thread count. The
fitted weights are stored as float32 numpy arrays and inference runs in numpy (float64), so
scoring needs no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import HEADS, BaseHead

__all__ = ["MLPHead", "sam_ascend", "sam_descend", "train_network", "weighted_loss"]

_MIN_IMPROVEMENT = 1e-4  # a validation loss must drop by this much to reset the patience counter


@HEADS.register("mlp")
class MLPHead(BaseHead):
    """One-hidden-layer MLP with class-weighted (or focal) loss and optional SAM (Santosh et al. 2024).

    Parameters: ``hidden_size``; ``dropout``; ``lr`` and ``weight_decay`` (AdamW); ``max_epochs``;
    ``patience`` (epochs without a 1e-4 drop of the validation loss before stopping); ``batch_size`` (0 = full batch);
    ``sam_rho`` (SAM radius, 0 disables SAM); ``class_weight`` ("balanced", None or a dict by
    label); ``focal_gamma`` (0 = plain weighted cross-entropy); ``validation_fraction``
    (stratified hold-out for early stopping, used when every class then has >= 2 validation
    samples, else training runs ``max_epochs`` epochs); ``calibration_cv`` (folds for Platt
    scaling, 0 = fixed sigmoid on the logit difference); ``random_state``.
    """

    _head_name = "mlp"
    _fixed_slope = 1.0  # the decision is a logit difference

    def __init__(self, hidden_size=256, dropout=0.1, lr=3e-3, weight_decay=1e-4, max_epochs=100,
                 patience=10, batch_size=256, sam_rho=0.05, class_weight="balanced", focal_gamma=0.0,
                 validation_fraction=0.2, calibration_cv=5, random_state=0):
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.sam_rho = sam_rho
        self.class_weight = class_weight
        self.focal_gamma = focal_gamma
        self.validation_fraction = validation_fraction
        self.calibration_cv = calibration_cv
        self.random_state = random_state

    def _check_params(self):
        super()._check_params()

        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        def _num(name, lo, hi=np.inf, lo_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            if not ok or not (lo < v if lo_open else lo <= v) or not v <= hi or not np.isfinite(v):
                raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

        _int("hidden_size", 1)
        _int("max_epochs", 1)
        _int("patience", 1)
        _int("batch_size", 0)
        _num("dropout", 0.0, 0.99)
        _num("lr", 0.0, lo_open=True)
        _num("weight_decay", 0.0)
        _num("sam_rho", 0.0)
        _num("focal_gamma", 0.0)
        _num("validation_fraction", 0.0, 0.9)

    # ---- training ----------------------------------------------------------------------------
    def _fit_core(self, X, y_idx):
        from ..errors import require

        torch = require("torch", "torch", f"--head {self._head_name} (it trains a network)")

        # A few-shot MLP is thousands of tiny ops: one thread avoids OpenMP hand-off and spin-wait
        # costs that made 2-thread training 20-80x slower on a 2-core machine (benchmarks/fit_speed.py).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._train(X, y_idx)
        finally:
            torch.set_num_threads(threads)

    def _train(self, X, y_idx):
        k = self.classes_.size
        d, h = X.shape[1], self.hidden_size

        def init(uniform):
            b1, b2 = 1.0 / np.sqrt(d), 1.0 / np.sqrt(h)  # torch.nn.Linear's default init range
            return [uniform((d, h), b1), uniform((h,), b1), uniform((h, k), b2), uniform((k,), b2)]

        def forward(params, xb, mask=None):
            import torch

            hid = torch.relu(xb @ params[0] + params[1])
            if mask is not None:
                hid = hid * mask
            return hid @ params[2] + params[3]

        final = train_network(self, X, y_idx, init, forward, h)
        self.coefs_ = [final[0].numpy().astype(np.float32), final[2].numpy().astype(np.float32)]
        self.intercepts_ = [final[1].numpy().astype(np.float32), final[3].numpy().astype(np.float32)]

    # ---- inference (numpy) ---------------------------------------------------------------------
    def _logits(self, X) -> np.ndarray:
        # float64 keeps BLAS rounding far below rtol 1e-7, so scores do not depend on the batch.
        w1, w2 = (np.asarray(w, dtype=np.float64) for w in self.coefs_)
        b1, b2 = (np.asarray(b, dtype=np.float64) for b in self.intercepts_)
        hid = np.maximum(np.asarray(X, dtype=np.float64) @ w1 + b1, 0.0)
        return hid @ w2 + b2

    def _decision(self, X):
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if self.classes_.size == 2 else z

    # ---- persistence ---------------------------------------------------------------------------
    def _state_arrays(self):
        return {"w1": self.coefs_[0], "b1": self.intercepts_[0], "w2": self.coefs_[1], "b2": self.intercepts_[1]}

    def _state_meta(self) -> dict[str, Any]:
        return {"n_iter": self.n_iter_, "best_epoch": self.best_epoch_, "early_stopping": self.early_stopping_}

    def _load_state(self, meta, arrays):
        d, k = self.n_features_in_, self.classes_.size
        w1 = self._require(arrays, "w1", (d, None)).astype(np.float32)
        h = w1.shape[1]
        b1 = self._require(arrays, "b1", (h,)).astype(np.float32)
        w2 = self._require(arrays, "w2", (h, k)).astype(np.float32)
        b2 = self._require(arrays, "b2", (k,)).astype(np.float32)
        self.coefs_, self.intercepts_ = [w1, w2], [b1, b2]
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.best_epoch_ = int(meta.get("best_epoch", 0))
        self.early_stopping_ = bool(meta.get("early_stopping", False))


def train_network(head, X, y_idx, init, forward, hidden: int) -> list:
    """Train a small torch network for `head` (an `MLPHead` or subclass) the way the `mlp` head does.

    One local generator (seeded by ``head.random_state``) draws the stratified validation split,
    then the initial parameters (``init(uniform)``, where ``uniform(shape, bound)`` draws a leaf
    tensor), then batch orders and dropout masks of shape (batch, `hidden`) passed to
    ``forward(params, xb, mask)``. Loss: `weighted_loss` (class weights, focal); optimiser: AdamW
    with optional SAM steps; early stopping on the validation loss. Sets ``n_iter_``,
    ``best_epoch_``, ``early_stopping_`` on `head` and returns the final parameters (detached).
    """
    import torch
    from sklearn.utils.class_weight import compute_class_weight

    k = head.classes_.size
    n, h = X.shape[0], int(hidden)
    seed = head._seed()
    gen = torch.Generator().manual_seed(seed)
    if head.class_weight is None:
        cw = np.ones(k)
    else:
        cw = compute_class_weight(head.class_weight, classes=head.classes_, y=head.classes_[y_idx])

    counts = np.bincount(y_idx, minlength=k)
    n_val = np.floor(counts * head.validation_fraction).astype(int)
    use_val = bool(head.validation_fraction > 0 and n_val.min() >= 2 and (counts - n_val).min() >= 1)
    if use_val:  # stratified hold-out drawn with the local generator
        val_mask = np.zeros(n, dtype=bool)
        for c in range(k):
            members = np.flatnonzero(y_idx == c)
            perm = torch.randperm(members.size, generator=gen).numpy()
            val_mask[members[perm[: n_val[c]]]] = True
        tr, va = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    else:
        tr, va = np.arange(n), np.arange(0)

    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(y_idx.astype(np.int64))
    wt = torch.as_tensor(np.asarray(cw, dtype=np.float32))

    def uniform(shape, bound):
        return ((torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound).requires_grad_(True)

    params = init(uniform)
    opt = _AdamW(params, lr=float(head.lr), weight_decay=float(head.weight_decay))
    p_drop, gamma, rho = float(head.dropout), float(head.focal_gamma), float(head.sam_rho)

    def loss_fn(logits, yb):
        return weighted_loss(logits, yb, wt, gamma)

    bs = len(tr) if head.batch_size == 0 or head.batch_size >= len(tr) else int(head.batch_size)
    best_loss, best_epoch, stale = np.inf, 0, 0
    best = [p.detach().clone() for p in params]
    epochs_run = 0
    tr_t = torch.as_tensor(tr)
    for epoch in range(int(head.max_epochs)):
        epochs_run = epoch + 1
        order = tr_t[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(tr), bs):
            idx = order[start:start + bs]
            xb, yb = Xt[idx], yt[idx]
            mask = None
            if p_drop > 0:
                keep = torch.rand((len(idx), h), generator=gen) >= p_drop
                mask = keep.to(torch.float32) / (1.0 - p_drop)
            opt.zero_grad()
            loss = loss_fn(forward(params, xb, mask), yb)
            loss.backward()
            if rho > 0:  # SAM: ascend to w + e, take the gradient there, come back, step
                eps = sam_ascend(params, rho)
                opt.zero_grad()
                loss_fn(forward(params, xb, mask), yb).backward()
                sam_descend(params, eps)
            opt.step()
        if use_val:
            with torch.no_grad():
                vl = float(loss_fn(forward(params, Xt[va]), yt[va]))
            if vl < best_loss - _MIN_IMPROVEMENT:
                best_loss, best_epoch, stale = vl, epochs_run, 0
                best = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= head.patience:
                    break
    if use_val:
        final = best
    else:
        final = [p.detach() for p in params]
        best_epoch = epochs_run
    head.n_iter_ = int(epochs_run)
    head.best_epoch_ = int(best_epoch)
    head.early_stopping_ = use_val
    return final


def weighted_loss(logits, y, class_weights, focal_gamma: float = 0.0):
    """Class-weighted cross-entropy of `logits` (n, k) against class indices `y`, optionally focal.

    Each term is weighted by `class_weights[y]` and the sum divided by the sum of those weights;
    `focal_gamma > 0` multiplies each term by ``(1 - p_true) ** focal_gamma``. Shared by the `mlp`
    head and `clipdet finetune`.
    """
    import torch

    logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    term = -logp if focal_gamma == 0 else -((1.0 - logp.exp()) ** focal_gamma) * logp
    w = class_weights[y]
    return (w * term).sum() / w.sum().clamp_min(1e-12)


def sam_ascend(params, rho: float) -> list:
    """SAM's first half: move every parameter to ``w + rho * g / ||g||`` (g: its current gradient).

    Returns the perturbations for `sam_descend`; parameters without a gradient are left in place.
    """
    import torch

    with torch.no_grad():
        gnorm = torch.sqrt(sum((p.grad * p.grad).sum() for p in params if p.grad is not None))
        scale = rho / (gnorm + 1e-12)
        eps = [None if p.grad is None else p.grad * scale for p in params]
        for p, e in zip(params, eps):
            if e is not None:
                p.add_(e)
    return eps


def sam_descend(params, eps: list) -> None:
    """SAM's second half: undo `sam_ascend` (the gradient taken at ``w + e`` then updates ``w``)."""
    import torch

    with torch.no_grad():
        for p, e in zip(params, eps):
            if e is not None:
                p.sub_(e)


class _AdamW:
    """AdamW with PyTorch's update rule (decoupled weight decay, bias-corrected moments).

    Written out because constructing `torch.optim.AdamW` imports torch._dynamo (~1.7 s), which
    would triple the wall-clock of a few-shot `clipdet fit --head mlp` (benchmarks/fit_speed.py).
    """

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params, self.lr, self.wd, self.betas, self.eps = list(params), lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        """Zero every parameter's gradient in place."""
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        """One AdamW update of every parameter from its current gradient."""
        import torch

        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad
                p.mul_(1 - self.lr * self.wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / (bc2 ** 0.5)).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bc1)
