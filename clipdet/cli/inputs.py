"""Turning command-line inputs into library arguments: paths and manifests, captions, --layers, --engine."""

from __future__ import annotations

from typing import List, Optional

from .common import err


def input_refs(paths: List[str], manifest: Optional[str]):
    """Discover the inputs; no image at all is an error (exit 1), an input without images a warning."""
    from ..errors import UsageError
    from ..extract.discover import discover, require_images

    if not paths and not manifest:
        raise UsageError("give at least one PATH (folder, file or - for stdin) or --manifest CSV")
    refs = discover(paths, manifest=manifest)
    require_images(refs, paths)
    for where in refs.empty:
        err(f"clipdet: warning: no images found in {where}")
    for note in refs.notes:
        err(f"note: {note}")
    return refs


def discovery_summary(refs) -> None:
    """At the end of a run: how many files inside the folders were not images."""
    line = refs.summary() if hasattr(refs, "summary") else ""
    if line:
        err(f"note: {line}")


def captions_for(det, refs, captions: Optional[str], what: str):
    """Captions for scoring with `det` (None for image features); refuses caption features without any."""
    from ..text import needs_captions, read_captions
    from ..text.features import no_captions_error

    if not needs_captions(det.features):
        return None
    caps = read_captions(captions)
    if not len(caps) and not any(getattr(r, "caption", None) for r in refs):
        raise no_captions_error(what, det.features)
    return caps


def parse_layers(spec: Optional[str]) -> tuple[int, ...]:
    from ..errors import UsageError

    if not spec:
        return ()
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--layers {spec!r}: expected comma-separated block indices like -1,-4,-8") from None


def engine_option(name: str, ray_address: str | None = None) -> str:
    from ..errors import UsageError
    from ..extract.engines import check_engine

    if ray_address and name != "ray":
        raise UsageError(f"--ray-address {ray_address}: only used with --engine ray (this run: --engine {name})")
    return check_engine(name)
