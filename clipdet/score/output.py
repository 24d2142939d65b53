"""Score rows out: CSV/JSONL writer (flushed per chunk), one-image verdicts and the run summary."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import IO, Sequence

from ..errors import UsageError, printable

COLUMNS = ["path", "sha256", "score", "p_fake", "label", "generator", "generator_p",
           "nearest_path", "nearest_label", "nearest_similarity", "error", "provenance"]
#: Written to JSONL only (a JSON object per row; CSV keeps the short `provenance` value).
JSONL_ONLY = ["provenance_details"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return printable(str(v))


class RowWriter:
    """Writes rows as CSV (default, also for '-') or JSONL (by .jsonl suffix), flushing each chunk.

    The output file is opened at the first row (or by `finish` for zero rows): a run that fails
    before scoring anything — weights unavailable, Ctrl-C while the model loads — leaves an existing
    file from an earlier run untouched.
    """

    def __init__(self, out: str | None, columns: Sequence[str] = COLUMNS):
        self.path = out
        self.jsonl = bool(out) and out.lower().endswith((".jsonl", ".ndjson"))
        self.columns = list(columns) + ([c for c in JSONL_ONLY if c not in columns] if self.jsonl else [])
        self._own = False
        self.fh: IO[str] | None = None
        self._csv = None
        if out and out != "-" and os.path.isdir(out):
            raise UsageError(f"--out {out}: is a folder; give a file name ending in .csv or .jsonl")

    def _open(self) -> None:
        if self.fh is not None or not self.path:
            return
        if self.path == "-":
            self.fh = sys.stdout
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._own = True
        if not self.jsonl:
            self._csv = csv.writer(self.fh)
            self._csv.writerow(self.columns)

    def write(self, row: dict) -> None:
        """Write one row."""
        if not self.path:
            return
        self._open()
        if self.jsonl:
            # every column, null when empty: the same keys as the CSV header, whatever the head
            clean = {k: (None if (isinstance(row.get(k), float) and math.isnan(row[k])) or row.get(k) == ""
                         else printable(row[k]) if isinstance(row.get(k), str) else row.get(k))
                     for k in self.columns}
            self.fh.write(json.dumps(clean) + "\n")
        else:
            self._csv.writerow([_fmt(row.get(c)) for c in self.columns])

    def flush(self) -> None:
        """Flush to the OS (rows survive an interrupted run)."""
        if self.fh is not None:
            self.fh.flush()

    def finish(self) -> None:
        """The run completed: make sure the output exists (a header-only CSV for zero rows)."""
        self._open()

    def close(self) -> None:
        """Flush and close the file (not stdout)."""
        if self.fh is not None:
            self.fh.flush()
            if self._own:
                self.fh.close()
        self.fh = None


def verdict(row: dict, threshold: float) -> str:
    """A readable one-image verdict (a non-UTF-8 file name backslash-escaped)."""
    return printable(_verdict(row, threshold))


def _verdict(row: dict, threshold: float) -> str:
    if row.get("error"):
        return f"{row['path']}: could not score ({row['error']})"
    lab = row["label"].upper()
    cmp = ">=" if row["score"] >= threshold else "<"
    text = (f"{row['path']}: {lab} (p_fake {row['p_fake']:.3f}; score {row['score']:.4g} {cmp} "
            f"threshold {threshold:.4g})")
    if row.get("unsure_reason"):
        text += f"; unsure: {row['unsure_reason']}"
    elif row.get("stable"):
        text += f"; stable on every view (scores {row['score_min']:.4g} to {row['score_max']:.4g})"
    if row.get("generator"):
        gp = row.get("generator_p")
        text += f"; generator {row['generator']}" + (f" (p {gp:.2f})" if gp is not None and not math.isnan(gp) else "")
    if row.get("nearest_path"):
        text += (f"; nearest reference {row['nearest_path']} ({row['nearest_label']}, "
                 f"similarity {row['nearest_similarity']:.3f})")
    if row.get("provenance"):
        text += f"; provenance marks: {row['provenance']} (not part of the score)"
    return text


def summarise(rows_label_counts: dict, errors: int, total: int, uncaptioned: int = 0) -> str:
    """'N images: fake A, real B, unknown C; E could not be read[; U without a caption]' (`errors` counts
    every row with an error, `uncaptioned` those whose error is only a missing caption)."""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(rows_label_counts.items()))
    line = f"{total} images: {parts or 'none scored'}; {errors - uncaptioned} could not be read"
    return line + (f"; {uncaptioned} without a caption" if uncaptioned else "")
