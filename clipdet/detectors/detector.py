"""A fitted detector: head + calibration + optional generator attribution, saved as one pickle-free file."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ClipdetError, DetectorFileError

BUNDLE_KIND = "clipdet-detector"
FORMAT_VERSION = 1
UNKNOWN = "unknown"

#: `score_paths(detector, paths, **options)` of the scoring stage (clipdet.score), set when it is imported.
_PATH_SCORER: Callable[..., list[dict]] | None = None


def set_path_scorer(fn: Callable[..., list[dict]]) -> None:
    """Let `Detector.score_paths` call `fn(detector, paths, **options)`; the scoring stage calls this on import."""
    global _PATH_SCORER
    _PATH_SCORER = fn


@dataclass
class Detector:
    """A fitted detector over cached CLIP features.

    `decision_function(X)`: higher = more likely generated; `predict_proba(X)`: calibrated P(fake);
    `predict(X)`: "real"/"fake" at the calibrated `threshold`; `attribute(X)`: generator names (or
    "unknown") when the references named their generators. `meta` holds everything needed to
    reproduce and audit the fit (backbone, view, head, params, shots, seed, reference hashes...).
    """

    head: Any
    threshold: float
    platt: tuple[float, float]
    meta: dict
    attribution: Any = None
    open_set: Any = None
    references: dict = field(default_factory=dict)  # sha256/path/label/generator lists, aligned with head rows
    transform: Any = None  # clipdet.detectors.prune.Pruner applied to feature rows before the head (fit --prune)
    skipped: list = field(default_factory=list)  # (path, reason) of reference files that could not be read; not saved

    # ------------------------------------------------------------------ properties
    @property
    def backbone(self) -> dict:
        """The backbone record (spec, arch, weights_id, preprocess) the features must come from."""
        return self.meta["backbone"]

    @property
    def backbone_key(self) -> str:
        """Cache group name of the backbone."""
        return self.meta["backbone_key"]

    @property
    def view(self) -> str:
        """Cached view the detector was fitted on and scores from."""
        return self.meta.get("view", "clean")

    @property
    def layout(self) -> dict:
        """Layout of the feature rows the head reads (clipdet.detectors.features): kind, units, blocks..."""
        return self.meta.get("layout") or {"kind": "embedding", "units": 1}

    @property
    def features(self) -> str:
        """What the head sees of an image: image, image+text or residual (see `clipdet.text.features`)."""
        return self.meta.get("features", "image")

    def unsure_range(self, threshold: float | None = None) -> tuple[float, float] | None:
        """``(low, high)``: scores in ``[low, high)`` are "unsure" (fit's band from the references'
        cross-validated scores, `clipdet.detectors.refcv.unsure_band`), moved with `threshold` when another
        one is given; None for detectors without a band (fitted before bands, or uncalibrated)."""
        band = self.meta.get("unsure")
        if not band:
            return None
        shift = 0.0 if threshold is None else float(threshold) - float(band.get("threshold", self.threshold))
        return float(band["low"]) + shift, float(band["high"]) + shift

    def describe_unsure(self) -> str:
        """One line on the unsure band (or its absence)."""
        band = self.meta.get("unsure")
        if not band:
            return "unsure band: none (detector fitted without cross-validated reference scores)"
        lo, hi = band["low"], band["high"]
        if lo == hi:
            return (f"unsure band: empty (every reference was classified correctly in {band.get('method')}; "
                    "only --stability flips make a verdict unsure)")
        return (f"unsure band: scores in [{lo:.4g}, {hi:.4g}) are 'unsure' (outside it, {band.get('method')} on the "
                f"references is >= {band['accuracy']:.0%} accurate on each side; {band['unsure_rate']:.0%} of "
                f"{band['n']} references fall inside)")

    def explain(self) -> list[str]:
        """Lines saying what the detector relies on: the head's choices (e.g. attention heads)."""
        return self.head.describe_fit(self.layout) if hasattr(self.head, "describe_fit") else []

    def _head_input(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return X if self.transform is None else self.transform.transform(X)

    @property
    def reference_shas(self) -> set[str]:
        """SHA-256 of every reference image used to fit or calibrate (for overlap checks)."""
        return set(self.meta.get("reference_sha256", [])) | set(self.meta.get("calibration_sha256", []))

    # ------------------------------------------------------------------ scoring
    def decision_function(self, X) -> np.ndarray:
        """Raw scores, higher = more likely generated."""
        return np.asarray(self.head.decision_function(self._head_input(X)), dtype=np.float64)

    def proba_from_scores(self, scores, threshold: float | None = None) -> np.ndarray:
        """Calibrated P(fake) from decision values: ``sigmoid(a * (score - threshold))``, a > 0.

        One mapping, monotone in the score and 0.5 at the decision threshold (the calibrated one, or
        `threshold`), so ``p_fake >= 0.5`` exactly when the verdict is fake. `a` is the calibrated
        slope (`platt[0]`); files whose calibration fell back to a constant get slope 1.
        """
        from .calibration import proba_at_threshold

        t = self.threshold if threshold is None else float(threshold)
        return proba_at_threshold(scores, float(self.platt[0]) if self.platt[0] > 0 else 1.0, t)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated P(fake), shape (n,)."""
        return self.proba_from_scores(self.decision_function(X))

    def predict(self, X, threshold: float | None = None) -> np.ndarray:
        """'real' or 'fake' per row at `threshold` (default: the calibrated one)."""
        t = self.threshold if threshold is None else threshold
        return np.where(self.decision_function(X) >= t, "fake", "real")

    def attribute(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(generator name or 'unknown', its probability) per row; empty strings without attribution."""
        n = len(X)
        if self.attribution is None:
            return np.array([""] * n, dtype=object), np.full(n, np.nan)
        X = self._head_input(X)
        proba = self.attribution.predict_proba(X)
        classes = [str(c) for c in self.attribution.classes_]
        gen_cols = [i for i, c in enumerate(classes) if c != "real"]
        sub = proba[:, gen_cols]
        best = sub.argmax(axis=1)
        names = np.array([classes[gen_cols[i]] for i in best], dtype=object)
        p = sub[np.arange(n), best] / np.maximum(sub.sum(axis=1), 1e-12)
        if self.open_set is not None:
            names = self.open_set.predict(X, names)
        return names, p

    def nearest(self, X) -> list[dict] | None:
        """Nearest reference (path, label, similarity) per row for k-NN heads; None for other heads."""
        if not hasattr(self.head, "nearest") or not self.references:
            return None
        idx, sim = self.head.nearest(self._head_input(X))
        paths, labels = self.references["path"], self.references["label"]
        return [{"path": paths[i], "label": labels[i], "similarity": float(s)} for i, s in zip(idx, sim)]

    def score_features(self, X, threshold: float | None = None) -> list[dict]:
        """One result dict per row: score, p_fake, label, generator, generator_p, nearest_*."""
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            return []
        t = self.threshold if threshold is None else threshold
        s = self.decision_function(X)
        p = self.proba_from_scores(s, t)
        gens, gp = self.attribute(X)
        near = self.nearest(X)
        rows = []
        for i in range(len(X)):
            fake = bool(s[i] >= t)
            r = {"score": float(s[i]), "p_fake": float(p[i]), "label": "fake" if fake else "real",
                 "generator": str(gens[i]) if fake and gens[i] else "",
                 "generator_p": float(gp[i]) if fake and gens[i] and gens[i] != UNKNOWN else float("nan")}
            if near is not None:
                r.update(nearest_path=near[i]["path"], nearest_label=near[i]["label"],
                         nearest_similarity=near[i]["similarity"])
            rows.append(r)
        return rows

    def score_paths(self, paths: Sequence[str], cache=None, device: str = "auto", **kwargs) -> list[dict]:
        """Score image files or folders (extracting what the cache lacks); one dict per input file.

        The same as `clipdet.score_paths(detector, paths, ...)`, which does the work: the scoring stage
        registers itself here (`set_path_scorer`), so this data object imports nothing above it.
        """
        if _PATH_SCORER is None:
            raise ClipdetError("scoring paths needs the scoring stage: import clipdet (or clipdet.score) first")
        return _PATH_SCORER(self, paths, cache=cache, device=device, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write the detector as one safetensors file with JSON metadata (no pickle); returns the path."""
        from ..persist import save_bundle

        head_meta, head_arrays = self.head.get_state()
        arrays = {f"head/{k}": v for k, v in head_arrays.items()}
        meta = {"detector": self.meta, "threshold": float(self.threshold), "platt": [float(x) for x in self.platt],
                "head_state": head_meta, "references": self.references}
        if self.attribution is not None:
            m, a = self.attribution.get_state()
            meta["attribution_state"] = m
            arrays.update({f"attribution/{k}": v for k, v in a.items()})
        if self.open_set is not None:
            m, a = self.open_set.get_state()
            meta["open_set_state"] = m
            arrays.update({f"open_set/{k}": v for k, v in a.items()})
        if self.transform is not None:
            m, a = self.transform.get_state()
            meta["transform_state"] = m
            arrays.update({f"transform/{k}": v for k, v in a.items()})
        save_bundle(path, meta, arrays, kind=BUNDLE_KIND, version=FORMAT_VERSION)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Read a detector file; refuses truncated, edited or newer-format files (DetectorFileError)."""
        from ..persist import load_bundle
        from .openset import OpenSetRule
        from .prune import Pruner
        from .registry import head_from_state

        meta, arrays = load_bundle(path, kind=BUNDLE_KIND, max_version=FORMAT_VERSION)

        def part(prefix: str) -> dict:
            return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}

        try:
            head = head_from_state(meta["head_state"], part("head"))
            attribution = (head_from_state(meta["attribution_state"], part("attribution"))
                           if "attribution_state" in meta else None)
            open_set = (OpenSetRule.from_state(meta["open_set_state"], part("open_set"))
                        if "open_set_state" in meta else None)
            transform = (Pruner.from_state(meta["transform_state"], part("transform"))
                         if "transform_state" in meta else None)
            det = cls(head=head, threshold=float(meta["threshold"]), platt=tuple(meta["platt"]),
                      meta=meta["detector"], attribution=attribution, open_set=open_set,
                      references=meta.get("references") or {}, transform=transform)
        except DetectorFileError as e:
            raise DetectorFileError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise DetectorFileError(f"{path}: malformed detector file ({type(e).__name__}: {e})") from None
        return det

    def summary(self) -> str:
        """A short human-readable description."""
        m = self.meta
        counts = m.get("counts", {})
        attr = f", attributes {len(m.get('generators', []))} generators" if self.attribution is not None else ""
        feats = f", features {self.features}" if self.features != "image" else ""
        if m.get("uncalibrated"):  # no image ever set it: no false-positive rate to claim
            thr = (f"threshold {self.threshold:.4g} UNCALIBRATED (zero-shot without references: the prompts' "
                   "midpoint, not set at any target FPR; --calibrate PATH calibrates it on labelled images)")
        else:
            rule = m.get("calibration", {}).get("threshold_rule")
            how = " (normal prediction bound: too few real references for the empirical quantile)" \
                if rule == "normal-prediction-bound" else ""
            thr = f"threshold {self.threshold:.4g} at target FPR {m.get('target_fpr')}{how}"
        return (f"{m['head']} detector on {m['backbone'].get('spec')} [{m.get('view', 'clean')}]{feats}, "
                f"{counts.get('real', 0)} real + {counts.get('fake', 0)} fake references (shots {m.get('shots')}, "
                f"seed {m.get('seed')}){attr}; {thr}")

