"""The Markdown side of reports: tables, output folders, the random-weights warning."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError

# --------------------------------------------------------------------------- Markdown


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return "n/a" if math.isnan(f) else f"{f:.3f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts); floats to 3 decimals, NaN as "n/a".

    ``columns`` picks and orders the keys (default: keys in first-seen order); missing values
    are blank; numeric columns are right-aligned.
    """
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    columns = list(columns)
    if not columns:
        return ""

    def numeric(c) -> bool:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        return bool(vals) and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            for v in vals
        )

    head = "| " + " | ".join(_cell(c) for c in columns) + " |"
    sep = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def prepare_output_dir(path, option: str = "--out") -> Path:
    """Create folder `path` (if needed) and check that files can be written in it, before any work.

    Raises `UsageError` naming `option`, the path and the remedy: a file in the way, or a folder
    that cannot be written (permissions, read-only file system).
    """
    import tempfile

    d = Path(path)
    if d.exists() and not d.is_dir():
        raise UsageError(f"{option} {d}: is a file; give a folder name (created if missing), not a file")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".clipdet-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {d}: cannot write there ({e.strerror or e}); choose another folder") from None
    return d


RANDOM_WEIGHTS_WARNING = ("**RANDOM backbone weights: these numbers say nothing about detection quality** "
                          "(a test or speed run; use pretrained weights such as ViT-L-14:openai)")


def random_weights_warning(backbone: Mapping | None) -> str:
    """The warning line for a backbone record with random weights, else ''."""
    return RANDOM_WEIGHTS_WARNING if (backbone or {}).get("weights") == "random" else ""


def write_markdown_report(directory, title: str, sections: Iterable[Sequence], warning: str = "") -> Path:
    """Write ``report.md`` in ``directory`` and return its path.

    ``warning`` (e.g. `random_weights_warning`) becomes the report's first line, above the title.

    ``sections`` are ``(heading, markdown_text)`` or ``(heading, markdown_text, images)`` where
    ``images`` are PNG file names relative to ``directory`` (absolute paths inside it are made
    relative). A missing image raises `UsageError` so the report never links to nothing.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    parts = ([warning, ""] if warning else []) + [f"# {title}", ""]
    for i, sec in enumerate(sections):
        sec = tuple(sec)
        if len(sec) not in (2, 3):
            raise UsageError(f"section {i} must be (heading, text) or (heading, text, images)")
        heading, text = sec[0], sec[1]
        images = list(sec[2] or []) if len(sec) == 3 else []
        parts += [f"## {heading}", ""]
        if text:
            parts += [str(text).rstrip(), ""]
        for img in images:
            ip = Path(img)
            full = ip if ip.is_absolute() else d / ip
            if not full.is_file():
                raise UsageError(f"report image not found: {full}")
            rel = Path(os.path.relpath(full.resolve(), d.resolve())).as_posix()
            if rel.startswith("../"):
                raise UsageError(f"report image {full} is outside the report folder {d}")
            parts += [f"![{Path(rel).stem}]({rel})", ""]
    out = d / "report.md"
    tmp = d / ".report.md.tmp"
    tmp.write_text("\n".join(parts).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
