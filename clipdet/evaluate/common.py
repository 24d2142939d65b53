"""What the evaluation protocols share (k-shot, leave-one-generator-out, robustness): rows, parsing, fits.

Everything here works from `Pool`s (labelled cached embeddings, see `clipdet.fit`); nothing is
extracted or printed. Each protocol returns `Rows` (a list of plain dicts, one per fitted detector and
test set, plus `notes` saying what was skipped and why); `summarise*` turn them into mean and 95%
t-interval half-widths over seeds (`stats.mean_ci`).

Honesty rules shared by every protocol:

- references are drawn with `clipdet.fit.shots.sample_shots` from content hashes and a seed, so the same files
  in any order and the same seeds give the same rows;
- the test set never contains a reference (disjoint by SHA-256);
- thresholds come from the references only (out-of-fold calibration at `target_fpr`); with a single
  reference per class there is nothing to calibrate on, the threshold is the head's natural 0 and the
  row's ``calibration`` column says "none" (ranking metrics such as AUC do not depend on it).

`bench.run_bench` runs the selected protocols and `bench.write_bench` writes CSV, JSON and Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..fit.config import FitConfig
from ..fit.head import fit_from_pool
from ..fit.pools import Pool
from ..fit.shots import sample_shots

#: Per-row metrics, as named by `metrics.binary_report`.
METRICS = ("auc", "ap", "accuracy", "balanced_accuracy", "tpr_at_1pct_fpr", "eer")
#: what summaries average over seeds: the ranking metrics plus the calibration ones (FPR at the
#: reference-calibrated threshold, to hold against the target; ECE of p_fake)
SUMMARY_METRICS = METRICS + ("fpr", "ece")


class Rows(list):
    """A list of result rows (dicts) that also carries `notes`: what was skipped, and why."""

    def __init__(self, rows: Iterable[dict] = (), notes: Iterable[str] = ()):
        super().__init__(rows)
        self.notes: list[str] = list(notes)


# --------------------------------------------------------------------------- fitting and scoring


def _counts(pool: Pool) -> tuple[int, int]:
    y = pool.y
    return int((y == 0).sum()), int((y == 1).sum())


def _need_both(pool: Pool, what: str) -> None:
    n_real, n_fake = _counts(pool)
    if n_real == 0 or n_fake == 0:
        raise UsageError(f"{what} needs real and fake images; the pool has {n_real} real, {n_fake} fake "
                         "(label by layout real/** and fake/<generator>/**, or --manifest)")


def _fit(train: Pool, head: str, seed: int, target_fpr: float, params: dict | None,
         fit_config: FitConfig | None = None, text=None):
    """A detector on `train`, calibrated out-of-fold when every class has >= 2 references.

    `fit_config`: the `FitConfig` every fit starts from (e.g. prune, prune_basis; head, seed, target_fpr
    and params are this fit's); `text`: the `TextEmbedder` prompt heads need; an empty `train` fits a
    zero-shot head."""
    n_real, n_fake = _counts(train)
    return fit_from_pool(train, fit_config, head=head, params=params or {}, target_fpr=target_fpr, seed=seed,
                         attribute=False, calibrate=min(n_real, n_fake) >= 2, text=text)


def decide(det, pool: Pool) -> np.ndarray:
    """`det`'s scores on `pool`, from the features its head reads (embedding, heads, layers)."""
    lay = det.layout
    kind = lay.get("kind", "embedding")
    blocks = lay.get("blocks") if kind in ("layers", "layers_mean", "layers_both") else None
    return det.decision_function(pool.matrix(kind, blocks)[0])


def zero_shot_heads(heads: Sequence[str]) -> list[str]:
    """The heads among `heads` that work without references (K = 0 on a k-shot curve)."""
    from ..detectors import heads_registry

    return [h for h in heads if h != "auto" and getattr(heads_registry().get(h), "zero_shot", False)]


def _score(det, test: Pool) -> dict:
    """Metrics of `det` on `test` at the detector's own (reference-calibrated) threshold."""
    from .metrics import binary_report

    y = test.y
    s = decide(det, test) if len(test) else np.zeros(0)
    p = det.proba_from_scores(s) if len(s) else None
    rep = binary_report(y, s, threshold=det.threshold, p_fake=p)
    out = {m: rep[m] for m in METRICS}
    flagged = s >= det.threshold
    out.update({
        "fpr": float(flagged[y == 0].mean()) if (y == 0).any() else math.nan,
        "tpr": float(flagged[y == 1].mean()) if (y == 1).any() else math.nan,
        "threshold": float(det.threshold),
        "calibration": det.meta["calibration"]["method"],
        "ece": float(rep["ece"]),
        "n_test": int(len(y)), "n_test_real": int((y == 0).sum()), "n_test_fake": int((y == 1).sum()),
    })
    return out


def _train_counts(train: Pool) -> dict:
    n_real, n_fake = _counts(train)
    return {"n_train": len(train), "n_train_real": n_real, "n_train_fake": n_fake}


def split_references(pool: Pool, k: int | None, seed: int, per_generator: bool = False) -> tuple[list[int], list[int]]:
    """(reference indices, test indices) of `pool`: `k` references per class drawn with `seed`; the rest,
    minus anything sharing a reference's SHA-256, is the test set."""
    train = sample_shots(pool.label, pool.generator, k, seed, per_generator, keys=pool.sha256)
    ref_shas = {pool.sha256[i] for i in train}
    test = [i for i in range(len(pool)) if pool.sha256[i] not in ref_shas]
    return train, test


# --------------------------------------------------------------------------- k-shot curve


def _testable_split(pool, shots, seed, per_generator, notes: list, what: str, hint: str = ""):
    """(train, test) indices from `split_references`, or None (with a note) when the test set would
    lack a class."""
    train, test = split_references(pool, shots, seed, per_generator)
    tr, te = _counts(pool.take(test))
    if tr == 0 or te == 0:
        notes.append(f"{what} skipped: the test set would lack {'real' if tr == 0 else 'fake'} images{hint}")
        return None
    return train, test


# --------------------------------------------------------------------------- summaries


def summarise(rows: Iterable[Mapping], by: Sequence[str], metrics: Sequence[str] = SUMMARY_METRICS,
              level: float = 0.95) -> list[dict]:
    """Rows grouped by the `by` columns (first-seen order): n, and per metric `<m>_mean` and `<m>_ci95`
    (half-width of the t-interval over seeds at `level`; NaN values are left out, NaN with one value)."""
    from .stats import mean_ci

    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(by, key))
        s["n"] = len(rs)
        for m in metrics:
            vals = [float(r[m]) for r in rs if m in r and r[m] is not None and not math.isnan(float(r[m]))]
            mean, half = mean_ci(vals, level)
            s[f"{m}_mean"], s[f"{m}_ci95"] = mean, half
        out.append(s)
    return out
