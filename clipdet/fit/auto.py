"""`--head auto`: choose the head, the blocks and their pooling, and pruning by cross-validation on the
references only.

The candidates are small and fixed, searched in three stages so that a 10-shot choice takes seconds:
1. the ``centroid`` head on every feature setting (the final embedding; when the references carry block
   features: each stored block's CLS token and patch-token mean, and the middle blocks' CLS tokens,
   means and both, concatenated) - exact and vectorised, so cheap;
2. ``svm`` on the best `TOP_FEATURES` settings of stage 1 and on the preferred ones (final embedding,
   middle-block means and both), ``logreg`` on the best one and the final embedding;
3. pruning (`clipdet.fit.prune`, chosen inside each training fold) on the best `PRUNE_TOP` so far.
Each candidate is scored by the mean AUC over reference folds (leave-one-generator-out when the
references name >= 2 generators, else stratified K folds; `clipdet.detectors.refcv`), repeated over a
few seeded splits of the reals. The choice follows the one-standard-error rule (`pick`): at a few
shots the fold AUCs are noisy, so among the settings within one standard error of the best, the
preferred one wins: the middle-block sets (RINE's finding that intermediate blocks carry generator
traces), then the final embedding, then single blocks; svm, then logreg, then centroid; no pruning. Nothing but
the references is read: the evaluation-overlap guard of the callers still applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

HEADS = ("svm", "logreg", "centroid")
#: feature settings (best by the centroid head) on which the other heads are tried
TOP_FEATURES = 3
#: candidates that also get a pruned variant (best by AUC without pruning)
PRUNE_TOP = 1
#: seeded splits of the reals across folds, averaged (fewer noisy folds at 10 shots)
REPEATS = 2


@dataclass
class Candidate:
    """One setting `--head auto` considers, and its reference-CV result."""

    head: str
    blocks: str  # "" = the final embedding, else a FitConfig.blocks spec
    prune: int = 0
    auc: float = float("nan")
    sd: float = float("nan")
    n: int = 0  # folds behind auc and sd

    @property
    def name(self) -> str:
        """Readable name: head, features, pruning."""
        return f"{self.head} / {self.blocks or 'final embedding'}" + (f" / prune {self.prune}" if self.prune else "")

    def as_dict(self) -> dict:
        """The JSON form stored in the detector."""
        return {"head": self.head, "blocks": self.blocks, "prune": int(self.prune),
                "auc": None if np.isnan(self.auc) else round(float(self.auc), 4),
                "sd": None if np.isnan(self.sd) else round(float(self.sd), 4)}


def feature_candidates(pool) -> list[str]:
    """The feature settings to try on `pool`: "" (final embedding), then per-block and middle-block sets."""
    out = [""]
    stored = None
    for kind in ("layers", "layers_mean"):
        if kind in pool.feats:
            stored = [int(b) for b in pool.feats[kind][1]["blocks"]]
    if stored is None:
        return out
    pools = [p for p, k in (("mean", "layers_mean"), ("cls", "layers")) if k in pool.feats]
    if len(stored) >= 3:  # listed first: near-ties go to the middle-block sets (steadier than one block)
        out += [f"{p}:middle" for p in pools[:1]] + (["both:middle"] if len(pools) == 2 else []) + \
            [f"{p}:middle" for p in pools[1:]]
    for b in sorted(stored):
        out += [f"{p}:{b}" for p in pools]
    return out


def prune_k(dim: int) -> int:
    """Components pruning removes in a candidate: 1/32 of a unit's width (at least 1)."""
    return max(1, dim // 32)


def _cv(pool, head: str, blocks: str, prune: int, seed: int, folds_list) -> list[float]:
    """Per-fold AUCs of one candidate over the prepared folds."""
    from sklearn.base import clone

    from ..detectors import create_head
    from ..detectors.refcv import column_auc
    from .config import FitConfig

    kind, sel = FitConfig(blocks=blocks).kind()
    X, layout = pool.matrix(kind, sel)
    y = pool.y
    base = create_head(head)
    if "random_state" in base.get_params():
        base.set_params(random_state=seed)
    if "calibration_cv" in base.get_params():
        base.set_params(calibration_cv=0)
    aucs = []
    gens = np.array(pool.generator, dtype=object)
    for tr, te in folds_list:
        Xtr, Xte = X[tr], X[te]
        if prune:
            from .prune import fit_pruner

            unit = int(layout.get("dim") or X.shape[1])
            try:
                t = fit_pruner(Xtr, y[tr], list(gens[tr]), prune, "coord", seed, unit_dim=unit)
            except UsageError:
                continue
            Xtr, Xte = t.transform(Xtr), t.transform(Xte)
        m = clone(base).fit(Xtr, y[tr])
        s = np.asarray(m.decision_function(Xte), np.float64)
        aucs.append(float(column_auc(s[:, None], y[te])[0]))
    return aucs


def _cv_centroid(X, y, folds_list) -> list[float]:
    """Per-fold AUCs of the ``centroid`` head (difference of cosines to the class prototypes), vectorised."""
    from ..detectors.refcv import column_auc

    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    aucs = []
    for tr, te in folds_list:
        protos = np.stack([Xn[tr][y[tr] == c].mean(axis=0) for c in (0, 1)])
        protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
        s = Xn[te] @ (protos[1] - protos[0])
        aucs.append(float(column_auc(s[:, None], y[te])[0]))
    return aucs


def choose(pool, config, repeats: int = REPEATS) -> tuple[object, list[Candidate], str]:
    """(the FitConfig with the chosen head, blocks and prune; every candidate tried, best first; the CV
    kind). See the module docstring for the search."""
    from ..detectors.refcv import reference_folds

    y = pool.y
    folds, kind = [], ""
    for r in range(repeats):
        f, kind = reference_folds(y, pool.generator, config.seed + r)
        folds += f
    if not folds:
        raise UsageError("--head auto cross-validates on the references: it needs at least 2 real and 2 fake "
                         "references (raise --shots)")
    tried: list[Candidate] = []

    def record(c: Candidate, aucs: list[float]) -> None:
        if aucs:
            c.auc, c.sd, c.n = float(np.mean(aucs)), float(np.std(aucs)), len(aucs)
            tried.append(c)

    feats = feature_candidates(pool)

    def ranked() -> list[Candidate]:
        # AUC to 3 decimals (closer is noise at a few shots), then the preferred head, features, no pruning
        return sorted(tried, key=lambda c: (-round(c.auc, 3), HEADS.index(c.head), feats.index(c.blocks), c.prune))

    for b in feats:
        record(Candidate("centroid", b), _cv_centroid(pool.matrix(*config.replace(blocks=b).kind())[0], y, folds))
    top = [c.blocks for c in ranked()[:TOP_FEATURES]]
    preferred = [b for b in feats if b.endswith(":middle")][:2]  # the steadier sets always get the svm too
    for h, bs in (("svm", [""] + preferred + top), ("logreg", [""] + top[:1])):
        for b in dict.fromkeys(bs):
            record(Candidate(h, b), _cv(pool, h, b, 0, config.seed, folds))
    first = folds[:len(folds) // repeats] or folds  # pruning is chosen inside each fold: one split of the reals
    for c in ranked()[:PRUNE_TOP]:
        lay = pool.matrix(*config.replace(blocks=c.blocks).kind())[1]
        k = prune_k(int(lay.get("dim") or pool.X.shape[1]))
        record(Candidate(c.head, c.blocks, k), _cv(pool, c.head, c.blocks, k, config.seed, first))
    best = pick(ranked(), feats)
    return config.replace(head=best.head, blocks=best.blocks, prune=best.prune), ranked(), kind


def pick(ranked: list[Candidate], feats: list[str]) -> Candidate:
    """The one-standard-error rule (Breiman et al. 1984): among the candidates whose AUC is within one
    standard error (over folds) of the best, the preferred one: the middle-block sets (means, both, CLS),
    then the final embedding, then single blocks; svm before logreg before centroid; no pruning first."""
    top = ranked[0]
    se = top.sd / np.sqrt(max(1, top.n - 1))
    near = [c for c in ranked if c.auc >= top.auc - se]
    def rank(b: str) -> int:
        return 0 if b.endswith(":middle") else 1 if b == "" else 2

    return min(near, key=lambda c: (rank(c.blocks), feats.index(c.blocks), HEADS.index(c.head), c.prune))


def describe_meta(auto: dict, top: int = 10) -> list[str]:
    """The ranking `--head auto` saw (as stored in a detector's meta["auto"]), as lines for the console."""
    ranked = auto.get("ranking", [])
    lines = [f"--head auto: {len(ranked)} settings, mean AUC over {auto.get('cv')} folds on the references "
             f"(best {min(top, len(ranked))}):"]
    for i, d in enumerate(ranked[:top]):
        c = Candidate(d["head"], d["blocks"], d["prune"])
        auc, sd = (float("nan") if d[k] is None else d[k] for k in ("auc", "sd"))
        lines.append(f"  {i + 1:2d}. AUC {auc:.3f} ± {sd:.3f}  {c.name}")
    lines.append(f"chosen: {Candidate(**{k: auto['chosen'][k] for k in ('head', 'blocks', 'prune')}).name} "
                 "(the preferred setting within one standard error of the best)")
    return lines
