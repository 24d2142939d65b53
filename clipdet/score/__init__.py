"""The scoring stage: images → (features from the cache, or extracted) → detector → rows, in input order.

- `stream`: `score_refs` (chunked, flat memory) and `score_paths`.
- `plan`: how a detector's rows are read from, and added to, the cache group it scores from.
- `output`: the CSV/JSONL row writer, one-image verdicts, the run summary.
- `stability`: `--stability` (perturbed views in memory, the unsure band, label "unsure").

Importing this package lets `Detector.score_paths` work (it registers `score_paths` there).
"""

from __future__ import annotations

from ..detectors.detector import set_path_scorer
from .output import COLUMNS, RowWriter, summarise, verdict
from .plan import read_plan
from .stream import check_backbone_override, growing_chunks, score_paths, score_refs

set_path_scorer(score_paths)

__all__ = ["COLUMNS", "RowWriter", "check_backbone_override", "growing_chunks", "read_plan", "score_paths",
           "score_refs", "summarise", "verdict"]
