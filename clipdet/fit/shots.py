"""Drawing the shots: K references per class (or per generator), seeded and independent of input order."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def sample_shots(
    labels: Sequence[str], generators: Sequence[str], shots: int | None, seed: int,
    per_generator: bool = False, keys: Sequence[str] | None = None,
) -> list[int]:
    """Indices of the chosen references: `shots` per class (or per generator for fakes), seeded.

    The draw depends only on (`keys` order-free content, seed): candidates are sorted by `keys`
    (content hashes) before the seeded permutation, so the same files in any order give the same
    shots. With `per_generator`, each named generator gets `shots` fakes and reals get
    `shots` x (number of generators) (capped at what exists). A class with fewer candidates than
    asked contributes all it has.
    """
    n = len(labels)
    keys = list(keys) if keys is not None else [str(i) for i in range(n)]
    order = np.argsort(np.array(keys, dtype=str), kind="stable") if n else np.zeros(0, np.int64)
    names, codes = np.unique(np.array([g or "unknown" for g in generators] or [""], dtype=str), return_inverse=True)
    return draw_shots(order, np.array([lab == "real" for lab in labels], bool),
                      np.array([lab == "fake" for lab in labels], bool), codes.ravel()[:n], list(names),
                      shots, seed, per_generator)


def draw_shots(order: np.ndarray, is_real: np.ndarray, is_fake: np.ndarray, gen_codes: np.ndarray,
               code_names: Sequence[str], shots: int | None, seed: int, per_generator: bool = False) -> list[int]:
    """The seeded draw behind `sample_shots`, on arrays: `order` sorts candidates by content hash,
    `gen_codes` index `code_names` (each fake's generator name, 'unknown' when unnamed). Works on
    millions of candidates without one Python object each."""
    rng = np.random.default_rng(seed)

    def draw(members: np.ndarray, k: int | None) -> list[int]:
        if k is None or k >= len(members):
            return members.tolist()
        perm = rng.permutation(len(members))[:k]
        return members[np.sort(perm)].tolist()

    order = np.asarray(order, dtype=np.int64)
    reals = order[is_real[order]]
    fakes = order[is_fake[order]]
    if not per_generator:
        return sorted(draw(reals, shots) + draw(fakes, shots))
    fake_codes = np.asarray(gen_codes)[fakes]
    present = np.unique(fake_codes)
    gens = sorted({code_names[c] for c in present})
    chosen: list[int] = []
    for g in gens:
        codes = [c for c in present if code_names[c] == g]
        chosen += draw(fakes[np.isin(fake_codes, codes)], shots)
    k_real = None if shots is None else shots * max(1, len(gens))
    return sorted(draw(reals, k_real) + chosen)


def candidate_counts(labels: Sequence[str], generators: Sequence[str]) -> dict:
    """Candidates per class and fakes per generator ('unknown' when unnamed): shots_shortfall's input."""
    gens: dict[str, int] = {}
    for g, lab in zip(generators, labels):
        if lab == "fake":
            gens[g or "unknown"] = gens.get(g or "unknown", 0) + 1
    return {"real": list(labels).count("real"), "fake": list(labels).count("fake"), "generators": gens}


def shots_shortfall(counts: dict, k: int | None, per_generator: bool = False) -> str:
    """A note when `k` shots per class (or per generator) exceed the candidates `counts`
    (from candidate_counts), else ''."""
    if k is None:
        return ""
    have = {"real": counts["real"], "fake": counts["fake"]}
    want = {"real": k, "fake": k}
    if per_generator:
        gens = counts["generators"]
        want["real"] = k * max(1, len(gens))
        have.pop("fake")
        want.pop("fake")
        have.update({f"fake/{g}": n for g, n in sorted(gens.items())})
        want.update({f"fake/{g}": k for g in gens})
    short = [f"{have[c]} {c}" for c in have if have[c] < want[c]]
    if not short:
        return ""
    return (f"--shots {k} asks for more references than there are ({', '.join(short)} available): "
            "all of those were used, so this fit has fewer (and unbalanced) references")
