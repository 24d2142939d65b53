"""The text side of `clipdet fit`: zero-shot fits, caption look-up for references, caption features."""

from __future__ import annotations

import json

import numpy as np

from ..errors import UsageError
from ..text.captions import Captions, read_captions
from ..text.embed import TEXT_VIEW, TextEmbedder
from ..text.features import check_features, no_captions_error, pool_features


class FitText:
    """What one fit needs from the text tower: checks the head/features/shots combination up front,
    finds the references' captions, and turns their image embeddings into the chosen features.

    `notes` collects what was left out (candidates without a caption), said once per fit."""

    def __init__(self, head: str, features: str | None, captions, shots: int | None):
        from ..detectors import heads_registry

        cls = heads_registry().get(head if head != "auto" else "svm")  # auto chooses among linear heads
        self.head, self.features = head, check_features(features)
        self.needs_prompts = bool(getattr(cls, "needs_prompts", False))
        if shots == 0 and not getattr(cls, "zero_shot", False):
            zs = [n for n in heads_registry().names() if getattr(heads_registry().get(n), "zero_shot", False)]
            raise UsageError(f"--shots 0: head {head} needs references; heads that work without any: {', '.join(zs)}")
        if self.needs_prompts and self.features != "image":
            raise UsageError(f"head {head} scores image embeddings against prompts: use --features image")
        self.caps = captions if isinstance(captions, Captions) else read_captions(captions)
        self.capmap: dict[str, str] = {}
        self.notes: list[str] = []

    @staticmethod
    def image_groups(cache) -> list:
        """The cache's image feature groups (text embeddings are not an image view)."""
        return [g for g in cache.groups(count=False) if g.view != TEXT_VIEW]

    def add_refs(self, refs) -> None:
        """Take the captions the refs carry (manifest column)."""
        self.caps = self.caps.for_refs(refs)

    def _need(self, found: int, what: str) -> None:
        if not found:
            raise no_captions_error(what, self.features)

    def captioned(self, pool, cache, key: str, what: str = "fit"):
        """`pool` restricted to images with a caption (all of it for image features)."""
        if self.features == "image":
            return pool
        found = self.caps.sha_map({s: [p] for s, p in zip(pool.sha256, pool.path)})
        self._need(len(found), what)
        self.capmap.update(found)
        missing = len(pool) - len(found)
        if missing:
            self.notes.append(f"{what}: {missing} image(s) without a caption left out (--features {self.features})")
        return pool.take([i for i, s in enumerate(pool.sha256) if s in found])

    def cache_pool(self, cache, key: str, view: str):
        """For caption features from the cache alone: the labelled cached images that have a caption.
        None for image features (fit then samples from the index)."""
        if self.features == "image":
            return None
        from ..extract.decode import read_file, sha256_bytes
        from .pools import load_pool

        found = dict(self.caps.by_sha)
        for p, c in self.caps.by_path.items():
            try:
                found.setdefault(sha256_bytes(read_file(p)), c)
            except Exception:  # noqa: BLE001 - a caption for a file that is gone: nothing to fit on
                continue
        self._need(len(found), "fit")
        pool = load_pool(cache, key, view, shas=sorted(found))
        self._need(len(pool), "fit (no labelled cached image has a caption)")
        self.capmap.update({s: found[s] for s in pool.sha256})
        return pool

    def embedder(self, spec: str, cache, key: str, device: str) -> TextEmbedder | None:
        """A text embedder when the head embeds prompts or the features need captions."""
        if not self.needs_prompts and self.features == "image":
            return None
        return TextEmbedder(spec, cache=cache, key=key, device=device)

    def transform(self, pool, text):
        """`pool` with the chosen features (its images all have captions, see `captioned`)."""
        if pool is None or self.features == "image":
            return pool
        return pool_features(pool, self.features, self.capmap, text)[0]

    def zero_shot_fit(self, cache, backbone: str | None, config, device: str, unused: bool = False,
                      quiet: bool = True):
        """A detector from prompts alone (--shots 0): no references. With `config.calibrate` (labelled
        image paths), threshold and p_fake are calibrated on those images; else they stay uncalibrated.
        `unused`: reference PATHs were given (said in a note: a zero-shot fit does not use them)."""
        from ..backbones import DEFAULT_BACKBONE, describe_backbone
        from ..extract.discover import discover
        from .head import fit_from_pool
        from .pools import Pool, pool_from_refs

        view, calibrate = config.view, config.calibrate
        groups = self.image_groups(cache) if cache.exists() else []
        if not backbone:
            specs = {g.backbone.get("spec") for g in groups}
            if len(specs) > 1:
                raise UsageError(f"{cache.path} holds several backbones ({', '.join(sorted(specs))}); "
                                 "choose one with --backbone")
            backbone = specs.pop() if specs else DEFAULT_BACKBONE
        key = describe_backbone(backbone).key
        text = TextEmbedder(backbone, cache=cache, key=key, device=device)
        skipped, cal_pool, rec = [], None, None
        if calibrate:
            cal_pool, _, rec, summary = pool_from_refs(discover(list(calibrate)), cache, backbone, view, [view],
                                                       device, quiet, references=False)
            skipped = summary.errors
        rec = rec or next((g.backbone for g in groups if g.key == key and g.view == view), None)
        if rec is None:
            rec = json.loads(text.tower().info.to_json())
        meta = {"backbone": rec, "backbone_key": key, "view": view, "shots": 0, "per_generator": False,
                "exclude_generators": [], "augment_views": False, "candidates": {"real": 0, "fake": 0},
                "features": "image"}
        pool = Pool([], [], [], [], np.zeros((0, 0), np.float32))
        det = fit_from_pool(pool, config, head=self.head, attribute=False, calibration=cal_pool, meta=meta, text=text)
        if unused:
            det.meta["notes"].append("--shots 0: the reference images given were not used (a zero-shot fit "
                                     "needs none; --calibrate PATH calibrates on labelled images)")
        det.skipped, det.input_notes = skipped, []
        return det


def bench_text(heads, features: str | None, captions, pools: dict, refs, spec: str, cache, key: str,
               device: str = "auto"):
    """What `clipdet bench` needs from the text tower: (text embedder or None, pools with the chosen
    features, notes). Images without a caption leave every view's pool (said in a note)."""
    from ..detectors import heads_registry
    from ..text.features import pool_features

    features = check_features(features)
    prompt_heads = [h for h in heads if h != "auto" and getattr(heads_registry().get(h), "needs_prompts", False)]
    if prompt_heads and features != "image":
        raise UsageError(f"head(s) {', '.join(prompt_heads)} score image embeddings against prompts: "
                         "bench them with --features image")
    if not prompt_heads and features == "image":
        return None, pools, []
    from ..cache import FeatureCache

    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    text = TextEmbedder(spec, cache=cache, key=key, device=device)
    if features == "image":
        return text, pools, []
    caps = (captions if isinstance(captions, Captions) else read_captions(captions)).for_refs(refs or [])
    clean = pools["clean"]
    found = caps.sha_map({s: [p] for s, p in zip(clean.sha256, clean.path)})
    if not found:
        raise no_captions_error("bench", features)
    out = {v: pool_features(p, features, found, text)[0] for v, p in pools.items()}
    missing = len(clean) - len(out["clean"])
    notes = [f"{missing} image(s) without a caption left out (--features {features})"] if missing else []
    return text, out, notes
