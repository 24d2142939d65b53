"""The model `clipdet finetune` trains: an open_clip image tower plus a linear attribution head.

Modes: `lora` (PEFT LoRA adapters on every block's attention in/out projections and MLP `c_fc` /
`c_proj`; the tower itself frozen), `last-blocks` (the last N transformer blocks, `ln_post` and the
projection trainable) and `full` (everything). The head sees the L2-normalised embedding — the same
vector `extract` stores — so training shapes exactly the features the detector is later fitted on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

MODES = ("lora", "last-blocks", "full")
#: Modules of an open_clip ViT that LoRA adapts (full-name regex, as PEFT matches it).
LORA_TARGETS = r".*transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"


def _blocks(visual):
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise UsageError("clipdet finetune --mode lora/last-blocks needs a ViT backbone with transformer blocks "
                         "(use --mode full for other towers)")
    return blocks


def build_model(visual, n_classes: int, mode: str = "lora", blocks: int = 2, lora_rank: int = 8,
                lora_alpha: float | None = None, lora_dropout: float = 0.0, seed: int = 0):
    """A `FinetuneModel` around `visual` with the parameters of `mode` trainable (LoRA via PEFT).

    Everything random here (LoRA's A matrices, the head) is drawn from `seed`, without touching the
    caller's torch RNG.
    """
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in visual.parameters():
            p.requires_grad_(mode == "full")
        if mode == "last-blocks":
            bl = _blocks(visual)
            if not 1 <= blocks <= len(bl):
                raise UsageError(f"--blocks {blocks}: the backbone has {len(bl)} transformer blocks")
            trainable = list(bl[len(bl) - blocks:])
            trainable += [m for m in (getattr(visual, "ln_post", None),) if m is not None]
            for m in trainable:
                for p in m.parameters():
                    p.requires_grad_(True)
            if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
                visual.proj.requires_grad_(True)
        elif mode == "lora":
            _blocks(visual)
            if lora_rank < 1:
                raise UsageError(f"--lora-rank {lora_rank}: expected a positive integer")
            try:
                import peft
            except ImportError:
                raise UsageError("--mode lora needs the PEFT library: pip install 'clipdet[finetune]'") from None
            cfg = peft.LoraConfig(r=int(lora_rank), lora_alpha=float(lora_alpha or 2 * lora_rank),
                                  lora_dropout=float(lora_dropout), target_modules=LORA_TARGETS, bias="none")
            visual = peft.get_peft_model(visual, cfg)
            _pin_attention_weights(visual)
        model = FinetuneModel(visual, n_classes, int(getattr(_base(visual), "output_dim", 0) or 0), mode)
    return model


def _pin_attention_weights(visual) -> None:
    """Keep the frozen attention weights exact under PEFT's LoRA for `nn.MultiheadAttention`.

    That layer adds the adapter to the frozen in/out projection weights for every forward and
    subtracts it afterwards; the float round trip moves the frozen weights by an ulp here and there,
    step after step. A hook restores exact copies after every forward, so training is LoRA on fixed
    weights, the merged export is base + adapter, and a resumed run (which reloads the base weights)
    continues bit for bit. Costs one extra copy of the attention weights.
    """
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    for m in visual.modules():
        if not isinstance(m, LoraMHA):
            continue
        base = m.get_base_layer()
        saved = (base.in_proj_weight.detach().clone(), base.out_proj.get_base_layer().weight.detach().clone())

        def restore(mod, _inputs, _output, saved=saved):
            b = mod.get_base_layer()
            with torch.no_grad():
                b.in_proj_weight.copy_(saved[0])
                b.out_proj.get_base_layer().weight.copy_(saved[1])

        m.register_forward_hook(restore)


def _base(visual):
    """The open_clip tower inside a PEFT wrapper (or `visual` itself)."""
    get = getattr(visual, "get_base_model", None)
    return get() if callable(get) else visual


class FinetuneModel(nn.Module):
    """Image tower + linear head over the L2-normalised embedding, with a learned logit scale."""

    def __init__(self, visual, n_classes: int, embed_dim: int, mode: str):
        super().__init__()
        if embed_dim <= 0:
            raise UsageError("the backbone's image tower does not report its embedding size")
        self.visual = visual
        self.mode = mode
        self.head = nn.Linear(embed_dim, n_classes)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed(self, x):
        """Float32 L2-normalised embeddings of a normalised image batch (what `extract` stores)."""
        f = self.visual(x)
        if isinstance(f, tuple):
            f = f[0]
        return F.normalize(f.float(), dim=-1)

    def forward(self, x):
        """Class logits (real, generator 1, ...)."""
        return self.head(self.embed(x)) * self.logit_scale.exp()

    def trainable_state(self) -> dict:
        """The trainable tensors by name (what a checkpoint must hold besides the base weights)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in self.state_dict().items() if n in names}

    def load_trainable_state(self, state: dict) -> None:
        """Load tensors saved by `trainable_state` (every trainable tensor must be present)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != names:
            raise UsageError("the checkpoint does not match this model (different mode, blocks or LoRA "
                             "rank); start a new --out or pass the original options")
        self.load_state_dict(state, strict=False)

    def merge(self):
        """Fold LoRA adapters into the tower's weights (no-op for other modes); returns the open_clip tower."""
        if hasattr(self.visual, "merge_and_unload"):
            self.visual = self.visual.merge_and_unload()
        return self.visual
