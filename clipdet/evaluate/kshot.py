"""k-shot curves: for each K and seed, fit on K references per class and test on the rest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..fit.config import DEFAULT_TARGET_FPR, FitConfig
from ..fit.pools import Pool
from .common import Rows, _counts, _fit, _need_both, _score, _testable_split, _train_counts, summarise, zero_shot_heads
from .parse import parse_heads, parse_ks, parse_seeds

#: The issue's K grid (shots per class).
DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100)


def kshot_curve(
    pool: Pool,
    heads: str | Sequence[str],
    ks: str | Sequence[int] = DEFAULT_KS,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    params: Mapping[str, dict] | None = None,
    fit_config: FitConfig | None = None,
    text=None,
) -> Rows:
    """Metrics vs shots: one row per (head, K, seed); test set = `pool` minus the drawn references.

    Rows hold protocol, head, k, seed, n_train*, the `METRICS`, fpr/tpr at the threshold, threshold,
    calibration and n_test*. A K that leaves no real or no fake image to test on (K >= what a class
    has) is skipped with a note in `Rows.notes`. For a fixed seed the draws are nested: the references
    for K are a subset of those for any larger K. `params` maps a head name to its parameters.
    Heads that work without references (zeroshot) also get one K = 0 row (no references, the whole pool
    is the test set, uncalibrated threshold), with the first seed: nothing in it is random.
    """
    heads, ks, seeds = parse_heads(heads), parse_ks(ks), parse_seeds(seeds)
    _need_both(pool, "k-shot curve")
    n_real, n_fake = _counts(pool)
    rows = Rows()
    splits: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for k in ks:
        if not per_generator and k >= min(n_real, n_fake):
            rows.notes.append(f"k-shot: K={k} skipped: needs more than {k} real and {k} fake images so that some "
                              f"remain for testing (have {n_real} real, {n_fake} fake)")
            continue
        for seed in seeds:
            split = _testable_split(pool, k, seed, per_generator, rows.notes, f"k-shot: K={k} seed {seed}")
            if split is not None:
                splits[(k, seed)] = split
    for head in heads:
        if zero_shot_heads([head]):
            det = _fit(pool.take([]), head, seeds[0], target_fpr, (params or {}).get(head), text=text)
            rows.append({"protocol": "kshot", "head": head, "k": 0, "seed": seeds[0], **_train_counts(pool.take([])),
                         **_score(det, pool)})
        for (k, seed), (train, test) in splits.items():
            tr_pool, te_pool = pool.take(train), pool.take(test)
            det = _fit(tr_pool, head, seed, target_fpr, (params or {}).get(head), fit_config, text)
            rows.append({"protocol": "kshot", "head": head, "k": k, "seed": seed, **_train_counts(tr_pool),
                         **_score(det, te_pool)})
    return rows


def summarise_kshot(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, k): mean and 95% half-width over seeds of every metric."""
    return summarise(rows, ("head", "k"))
