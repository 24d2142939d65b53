"""The evaluation stage: honest metrics on labelled images, benchmark protocols and reports.

- `run`: `evaluate` (score labelled images with a detector; the overlap guard) and its report.
- `metrics`, `stats`: detection metrics and intervals in plain numpy.
- `common`, `kshot`, `logo`, `robustness`, `shortcut`: the protocols over cached pools.
- `bench`: `run_bench` / `write_bench` (what `clipdet bench` runs); `pools`: its labelled pools per view.
- `record`: versions and the run record; `plots`, `report`: figures and Markdown.
"""

from __future__ import annotations

from .bench import BenchResult, parse_protocols, run_bench, write_bench
from .pools import load_pools
from .run import evaluate, public, write_report

__all__ = ["BenchResult", "evaluate", "load_pools", "parse_protocols", "public", "run_bench", "write_bench",
           "write_report"]
