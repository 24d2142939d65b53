"""Leave-one-generator-out: fit without one generator's fakes, test on them (and held-out reals)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..fit.config import DEFAULT_TARGET_FPR, FitConfig
from ..fit.pools import Pool
from ..fit.shots import sample_shots
from .common import METRICS, Rows, _counts, _fit, _need_both, _score, _train_counts, decide, summarise
from .parse import parse_heads, parse_seeds


def summarise_logo(rows: Iterable[Mapping]) -> list[dict]:
    """Per (head, held-out generator): mean and 95% half-width over seeds, including `auc_seen`."""
    return summarise(rows, ("head", "generator"), METRICS + ("auc_seen",))


# --------------------------------------------------------------------------- leave one generator out


def leave_one_generator_out(
    pool: Pool,
    heads: str | Sequence[str],
    shots: int | None = 10,
    seeds: int | Sequence[int] = 5,
    target_fpr: float = DEFAULT_TARGET_FPR,
    per_generator: bool = False,
    real_holdout: float = 0.5,
    params: Mapping[str, dict] | None = None,
    fit_config: FitConfig | None = None,
    text=None,
) -> Rows:
    """For each generator g with fakes: fit on reals + fakes of the other generators, test on g.

    References: `shots` per class drawn from the reals and the other generators' fakes (or all of them
    with `shots=None`, in which case a seeded `real_holdout` fraction of the reals is kept back for
    testing). Test set: the reals not drawn + every fake of g. One row per (head, g, seed) with the
    `METRICS` on that test set, plus `auc_seen`: the same detector's AUC on the other generators' fakes
    that were not references, against the same reals (NaN when none are left) — the gap to `auc`
    is the price of an unseen generator. Fakes without a generator name are training-only.
    """
    heads, seeds = parse_heads(heads), parse_seeds(seeds)
    _need_both(pool, "leave-one-generator-out")
    if not 0 < real_holdout < 1:
        raise UsageError(f"real_holdout {real_holdout}: expected a fraction in (0, 1)")
    labels, gens = pool.label, pool.generator
    named = sorted({g for g, lab in zip(gens, labels) if lab == "fake" and g})
    if len(named) < 2:
        raise UsageError(f"leave-one-generator-out needs fakes from at least 2 named generators (have {len(named)}: "
                         f"{', '.join(named) or 'none'}); name them by layout fake/<generator>/** or --manifest")
    rows = Rows()
    unnamed = sum(1 for g, lab in zip(gens, labels) if lab == "fake" and not g)
    if unnamed:
        rows.notes.append(f"logo: {unnamed} fake image(s) without a generator name are used for training only")
    reals = sorted((i for i in range(len(pool)) if labels[i] == "real"), key=lambda i: pool.sha256[i])
    if shots is not None and shots >= len(reals):
        rows.notes.append(f"logo: skipped: --shots {shots} leaves no real image to test on (have {len(reals)})")
        return rows
    plans = []
    for g in named:
        held = [i for i in range(len(pool)) if labels[i] == "fake" and gens[i] == g]
        others = [i for i in range(len(pool)) if labels[i] == "fake" and gens[i] != g]
        for seed in seeds:
            if shots is None:
                perm = np.random.default_rng(seed).permutation(len(reals))
                n_test = max(1, int(round(real_holdout * len(reals))))
                test_reals = sorted(reals[j] for j in perm[:n_test])
                cand = sorted(set(reals) - set(test_reals)) + others
                train = cand
            else:
                cand = sorted(reals + others)
                sub = sample_shots([labels[i] for i in cand], [gens[i] for i in cand], shots, seed, per_generator,
                                   keys=[pool.sha256[i] for i in cand])
                train = [cand[j] for j in sub]
            ref_shas = {pool.sha256[i] for i in train}
            test_reals = [i for i in reals if pool.sha256[i] not in ref_shas]
            test_g = [i for i in held if pool.sha256[i] not in ref_shas]
            seen = [i for i in others if pool.sha256[i] not in ref_shas and gens[i]]
            if not test_reals or not test_g:
                rows.notes.append(f"logo: generator {g} seed {seed} skipped: no test "
                                  f"{'real' if not test_reals else 'fake'} images left")
                continue
            if _counts(pool.take(train))[1] == 0:
                rows.notes.append(f"logo: generator {g} seed {seed} skipped: no fake references from other generators")
                continue
            plans.append((g, seed, train, test_reals, test_g, seen))
    for head in heads:
        for g, seed, train, test_reals, test_g, seen in plans:
            tr_pool = pool.take(train)
            det = _fit(tr_pool, head, seed, target_fpr, (params or {}).get(head), fit_config, text)
            row = {"protocol": "logo", "head": head, "generator": g, "seed": seed,
                   "shots": "all" if shots is None else shots, **_train_counts(tr_pool),
                   **_score(det, pool.take(test_reals + test_g))}
            if seen:
                from .metrics import roc_auc

                te = pool.take(test_reals + seen)
                row["auc_seen"] = roc_auc(te.y, decide(det, te))
            else:
                row["auc_seen"] = math.nan
            rows.append(row)
    return rows
