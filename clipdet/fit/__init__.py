"""The fit stage: references → drawn shots → head → reference-only calibration → `Detector`.

- `config`: `FitConfig` (what to fit), --shots and --param parsing.
- `shots`: the seeded, order-independent draw of K references per class (or per generator).
- `pools`: labelled cached features (`Pool`), from the cache's index or extracted from paths.
- `head`: `fit_from_pool` (head, calibration, attribution with the open-set rule, pruning).
- `prune`: choosing the components `--prune` removes, on the references only.
- `text`: fits with the text tower (zero-shot prompts, caption features).
- `run`: `fit`, the library form of `clipdet fit`.
"""

from __future__ import annotations

from .config import DEFAULT_TARGET_FPR, FitConfig, parse_params, parse_shots
from .head import fit_from_pool
from .pools import Pool, load_pool, pool_from_refs, resolve_backbone_key, sample_from_cache
from .run import fit
from .shots import sample_shots

__all__ = [
    "DEFAULT_TARGET_FPR", "FitConfig", "Pool", "fit", "fit_from_pool", "load_pool", "parse_params", "parse_shots",
    "pool_from_refs", "resolve_backbone_key", "sample_from_cache", "sample_shots",
]
