"""Extraction engines: where the reader and embedder stages run.

- `local` (default): threads in this process (clipdet.extract.pipeline).
- `ray`: Ray Data stages on a Ray cluster (clipdet.extract.engines.ray_driver, clipdet.extract.engines.ray_stages); the
  cache is written by this machine, batch by batch, through the same code as `local`.

Nothing here imports Ray; it is imported only when `--engine ray` runs.
"""

from __future__ import annotations

from ...errors import UsageError

ENGINES = ("local", "ray")


def check_engine(name: str) -> str:
    """`name` if it is a known engine, else a UsageError listing them."""
    if name not in ENGINES:
        raise UsageError(f"--engine {name!r}: expected one of {', '.join(ENGINES)}")
    return name


def run_extract(engine: str, refs, backbone: str, **kwargs):
    """Run `clipdet.extract.extract` on `engine` (not 'local'); returns its ExtractSummary."""
    if check_engine(engine) == "ray":
        from .ray_driver import extract_on_ray

        return extract_on_ray(refs, backbone, **kwargs)
    raise UsageError(f"--engine {engine}: run it through clipdet.extract.extract")  # local is not dispatched here


__all__ = ["ENGINES", "check_engine", "run_extract"]
