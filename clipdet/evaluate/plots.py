"""Plots (matplotlib, PNG) for evaluations and benchmarks (the Markdown side is `report`).

matplotlib is imported inside the functions. Figures are built with ``matplotlib.figure.Figure``
(Agg canvas) rather than pyplot, so nothing is registered globally: no backend switch, no
figure left open, no memory growth across many calls. Every plot function returns the path written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError


def _new_figure(figsize=(5.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(p, format="png")
    finally:
        fig.clear()
    return p


def plot_roc(curves: Mapping[str, tuple], path, title: str = "ROC") -> Path:
    """ROC curves, one per name: ``curves = {name: (y_true, scores)}``; legend shows each AUC.

    Curves with a single class are listed in the legend as undefined and not drawn.
    """
    from .metrics import roc_auc, roc_curve

    if not curves:
        raise UsageError("plot_roc needs at least one curve")
    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    for name, pair in curves.items():
        try:
            y, s = pair
        except (TypeError, ValueError):
            raise UsageError(f"curve {name!r} must be a (y_true, scores) pair") from None
        auc = roc_auc(y, s)
        if math.isnan(auc):
            ax.plot([], [], label=f"{name} (one class: undefined)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (real called fake)")
    ax.set_ylabel("true-positive rate (fake detected)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_score_hist(
    y_true, scores, threshold: float | None, path, bins: int = 40, title: str = "Scores"
) -> Path:
    """Histograms of scores for real (0) and fake (1) images on shared bins, threshold as a line."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise UsageError(f"y_true and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    finite = s[np.isfinite(s)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if threshold is not None and math.isfinite(threshold):
            lo, hi = min(lo, threshold), max(hi, threshold)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for label, name, color in ((0, "real", "tab:blue"), (1, "fake", "tab:red")):
            v = s[(y == label) & np.isfinite(s)]
            if v.size:
                ax.hist(v, bins=edges, alpha=0.5, color=color, label=f"{name} (n={v.size})")
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1.2,
                   label=f"threshold {float(threshold):.3g}")
    ax.set_xlabel("score (higher = more likely fake)")
    ax.set_ylabel("images")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_bars(
    values: Mapping[str, float],
    path,
    title: str = "",
    ylabel: str = "AUC",
    chance: float | None = None,
    counts: Mapping[str, int] | None = None,
    excluded: Sequence[str] = (),
) -> Path:
    """One bar per name (e.g. AUC per generator), value printed on each bar; NaN shown as "n/a".

    ``chance`` draws a dotted reference line (e.g. 0.5 for AUC). ``counts`` adds "n=..." under each
    name (how many images the value rests on); ``excluded`` names what is not plotted, under the axes.
    Long titles are wrapped, never clipped.
    """
    import textwrap

    if not values:
        raise UsageError("plot_bars needs at least one value")
    names = [str(k) for k in values]
    ns = [f"\nn={counts[n]:,}" if counts and n in counts else "" for n in names]
    vals = [float(v) if v is not None else math.nan for v in values.values()]
    fig = _new_figure((max(4.0, 0.6 * len(names) + 2.0), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    heights = [0.0 if math.isnan(v) else v for v in vals]
    ax.bar(x, heights, color="tab:blue")
    top = max(heights + [1e-12])
    for xi, v, h, n in zip(x, vals, heights, ns, strict=True):
        ax.text(xi, h, ("n/a" if math.isnan(v) else f"{v:.3f}") + n, ha="center", va="bottom", fontsize=8)
    if chance is not None:
        ax.axhline(float(chance), color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    many = len(names) > 4
    ax.set_xticklabels(names, rotation=30 if many else 0, ha="right" if many else "center")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * (1.22 if counts else 1.12) if top > 0 else 1.0)
    if top <= 1.0:  # headroom for the labels, but no tick beyond 1 for a metric that stops there
        ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 1.0])
    width_chars = int(fig.get_figwidth() * 11)
    if title:
        ax.set_title(textwrap.fill(title, width_chars), fontsize=10)
    if excluded:
        fig.text(0.01, 0.01, textwrap.fill("not shown: " + ", ".join(excluded), width_chars), fontsize=7,
                 ha="left", va="bottom", color="dimgrey")
        fig.subplots_adjust(bottom=0.25)
    return _save(fig, path)


def _kshot_series(rows: Iterable[Mapping], metric: str, level: float):
    from .stats import mean_ci

    groups: dict[str, dict[float, list]] = {}
    for i, r in enumerate(rows):
        if "head" not in r or "k" not in r:
            raise UsageError(f"k-shot row {i} needs 'head' and 'k' keys, got {sorted(r)}")
        groups.setdefault(str(r["head"]), {}).setdefault(float(r["k"]), []).append(r)
    series = {}
    for head, by_k in groups.items():
        ks, means, halves = [], [], []
        for k in sorted(by_k):
            rs = by_k[k]
            if all("mean" in r for r in rs) and len(rs) == 1:
                r = rs[0]
                m = float(r["mean"])
                if "half_width" in r and r["half_width"] is not None:
                    h = float(r["half_width"])
                elif "lo" in r and "hi" in r:
                    h = (float(r["hi"]) - float(r["lo"])) / 2.0
                else:
                    h = math.nan
            elif all(metric in r for r in rs):
                m, h = mean_ci([float(r[metric]) for r in rs], level)
            else:
                raise UsageError(
                    f"k-shot rows for head {head!r}, k={k:g} need either one 'mean' "
                    f"(+ 'half_width') or per-seed {metric!r} values"
                )
            ks.append(k)
            means.append(m)
            halves.append(h)
        series[head] = (np.array(ks), np.array(means), np.array(halves))
    return series


def plot_kshot(
    rows: Sequence[Mapping],
    path,
    metric: str = "auc",
    level: float = 0.95,
    title: str | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Path:
    """k-shot curve: metric vs shots K (log x), one line per head with a confidence band.

    ``bounds`` is the metric's range (AUC, accuracy: [0, 1]): bands are clipped to it and the y
    axis shows it; ``None`` for an unbounded metric.

    Each row is a dict with ``head`` and ``k`` and either per-seed values under ``metric``
    (rows with the same head and k are pooled into a t-interval at ``level``) or one
    pre-aggregated ``mean`` with ``half_width`` (or ``lo``/``hi``).
    """
    rows = list(rows)
    if not rows:
        raise UsageError("plot_kshot needs at least one row")
    series = _kshot_series(rows, metric, level)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for head, (ks, means, halves) in series.items():
        (line,) = ax.plot(ks, means, marker="o", markersize=3, linewidth=1.5, label=head)
        ok = np.isfinite(halves)
        if ok.any():
            lo_band, hi_band = (means - halves)[ok], (means + halves)[ok]
            if bounds is not None:
                lo_band, hi_band = np.clip(lo_band, *bounds), np.clip(hi_band, *bounds)
            ax.fill_between(ks[ok], lo_band, hi_band, alpha=0.2, color=line.get_color(), linewidth=0)
    if bounds is not None:
        pad = 0.02 * (bounds[1] - bounds[0])
        ax.set_ylim(bounds[0] - pad, bounds[1] + pad)
    if all(k > 0 for s in series.values() for k in s[0]):
        ax.set_xscale("log")
    all_k = sorted({float(k) for s in series.values() for k in s[0]})
    ax.set_xticks(all_k)
    ax.set_xticklabels([f"{k:g}" for k in all_k])
    ax.minorticks_off()
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel(f"{metric} (mean, {level:.0%} interval)")
    ax.set_title(title or f"{metric} vs shots")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_confusion(labels: Sequence, matrix, path, title: str = "Confusion matrix", normalise: bool = False,
                   columns: Sequence | None = None) -> Path:
    """Confusion-matrix heat map (rows true, columns predicted) with counts in each cell.

    ``normalise=True`` colours and labels each cell by its share of the row (the true class), with
    the count in brackets, so classes of different sizes read alike. ``columns``: the predicted
    classes when they differ from ``labels`` (a rectangular matrix).
    """
    m = np.asarray(matrix)
    counts = m
    labels = [str(x) for x in labels]
    cols = labels if columns is None else [str(x) for x in columns]
    if m.ndim != 2 or m.shape != (len(labels), len(cols)):
        raise UsageError(f"matrix must be {len(labels)}x{len(cols)} for {len(labels)} rows and {len(cols)} "
                         f"columns, got shape {m.shape}")
    if normalise:
        totals = m.sum(axis=1, keepdims=True).astype(np.float64)
        m = np.divide(m, totals, out=np.zeros(m.shape, dtype=np.float64), where=totals > 0)
    size = max(3.5, 0.55 * max(len(labels), len(cols)) + 2.5)
    fig = _new_figure((size + 0.8, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1.0 if normalise else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    vmax = float(m.max()) if m.size else 0.0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            if normalise:
                txt = f"{float(v):.2f}\n({int(counts[i, j])})"
            else:
                txt = f"{v:d}" if np.issubdtype(m.dtype, np.integer) else f"{float(v):.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if vmax and v > vmax / 2 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_yticks(range(len(labels)))
    many = len(cols) > 3
    ax.set_xticklabels(cols, rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_yticklabels(labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)
