"""Plots write real PNG files; the Markdown report links only to images that exist."""

from __future__ import annotations

import re

import numpy as np
import pytest

from clipdet.errors import UsageError
from clipdet.evaluate import plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is optional for this check
        return
    with Image.open(path) as im:
        im.verify()


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + 2 * y
    return y, s


def test_plot_roc(tmp_path, data):
    y, s = data
    curves = {"logistic": (y, s), "random": (y, np.zeros_like(s)), "one class": ([1, 1], [0.1, 0.2])}
    out = plots.plot_roc(curves, tmp_path / "roc.png")
    assert out == tmp_path / "roc.png"
    _check_png(out)


def test_plot_score_hist(tmp_path, data):
    y, s = data
    _check_png(plots.plot_score_hist(y, s, 0.7, tmp_path / "hist.png"))
    _check_png(plots.plot_score_hist([1, 1], [0.3, 0.3], None, tmp_path / "hist1.png"))


def test_plot_bars(tmp_path):
    out = plots.plot_bars({"sd15": 0.93, "midjourney": 0.81, "dalle3": float("nan")}, tmp_path / "bars.png",
                           title="AUC per generator", ylabel="AUC", chance=0.5)
    _check_png(out)


def test_plot_kshot_per_seed_and_aggregated(tmp_path):
    rng = np.random.default_rng(1)
    rows = [
        {"head": head, "k": k, "seed": seed, "auc": min(1.0, 0.6 + 0.05 * np.log2(k) + rng.normal(0, 0.02))}
        for head in ("logistic", "centroid")
        for k in (1, 2, 4, 8, 16)
        for seed in range(5)
    ]
    _check_png(plots.plot_kshot(rows, tmp_path / "kshot.png"))
    agg = [{"head": "svm", "k": k, "mean": 0.7 + 0.01 * k, "half_width": 0.02} for k in (1, 4, 16)]
    _check_png(plots.plot_kshot(agg, tmp_path / "kshot_agg.png"))
    with pytest.raises(UsageError):
        plots.plot_kshot([{"head": "x", "k": 1}], tmp_path / "bad.png")


def test_plot_confusion(tmp_path):
    _check_png(plots.plot_confusion(["real", "fake"], np.array([[40, 3], [5, 52]]), tmp_path / "cm.png"))
    with pytest.raises(UsageError):
        plots.plot_confusion(["real", "fake"], np.zeros((3, 3)), tmp_path / "bad.png")


def test_no_figures_left_open(tmp_path, data):
    plt = pytest.importorskip("matplotlib.pyplot")
    y, s = data
    before = len(plt.get_fignums())
    for i in range(3):
        plots.plot_roc({"a": (y, s)}, tmp_path / f"r{i}.png")
        plots.plot_bars({"a": 0.5}, tmp_path / f"b{i}.png")
    assert len(plt.get_fignums()) == before


def test_markdown_table():
    rows = [{"generator": "sd|15", "auc": 0.91234, "n": 40, "ok": True},
            {"generator": "dalle", "auc": float("nan"), "n": 3}]
    text = report.markdown_table(rows, ["generator", "auc", "n", "ok"])
    lines = text.strip().splitlines()
    assert lines[0] == "| generator | auc | n | ok |"
    assert lines[1] == "|---|---:|---:|---|"
    assert lines[2] == "| sd\\|15 | 0.912 | 40 | True |"
    assert lines[3] == "| dalle | n/a | 3 |  |"
    # default columns: first-seen order
    assert report.markdown_table(rows).splitlines()[0] == "| generator | auc | n | ok |"
    assert report.markdown_table([]) == ""


def test_markdown_report_links_existing_images(tmp_path, data):
    y, s = data
    plots.plot_roc({"a": (y, s)}, tmp_path / "roc.png")
    (tmp_path / "plots").mkdir()
    plots.plot_bars({"a": 0.9}, tmp_path / "plots" / "bars.png")
    path = report.write_markdown_report(
        tmp_path,
        "clipdet evaluation",
        [
            ("Summary", report.markdown_table([{"auc": 0.9}]), ["roc.png"]),
            ("Per generator", "AUC per generator.", [tmp_path / "plots" / "bars.png"]),
            ("Notes", "no images here"),
        ],
    )
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# clipdet evaluation\n")
    assert "## Summary" in text and "## Notes" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["roc.png", "plots/bars.png"]
    for link in links:
        assert (tmp_path / link).is_file()
    assert not (tmp_path / ".report.md.tmp").exists()


def test_markdown_report_missing_image(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        report.write_markdown_report(tmp_path, "t", [("h", "x", ["missing.png"])])


def test_plot_bars_shows_counts_lists_excluded_and_wraps_long_titles(tmp_path, monkeypatch):
    from clipdet.evaluate import plots

    captured = []

    def keep(fig, path):
        captured.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    title = "a very long title that would be clipped at the edge of a small figure " * 2
    plots.plot_bars({"sdxl": 0.9, "mj": float("nan")}, tmp_path / "x.png", title=title, chance=0.5,
                     counts={"sdxl": 1234, "mj": 3}, excluded=["dalle (no test fakes)"])
    fig = captured[0]
    ax = fig.axes[0]
    assert "\n" in ax.get_title() and ax.get_title().replace("\n", " ").split() == title.split()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sdxl", "mj"]
    assert [t.get_text() for t in ax.texts] == ["0.900\nn=1,234", "n/a\nn=3"]
    assert any("not shown: dalle (no test fakes)" in t.get_text() for t in fig.texts)
