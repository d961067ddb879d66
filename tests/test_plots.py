"""The report charts: byte-identical on repeat, honest scales, labels that do not overlap."""

from __future__ import annotations

import re

from quantkit.report import plots


def crowded() -> list[plots.Point]:
    """Eight variants within 0.2 ms and 0.3 points of each other: their labels must be moved apart."""
    return [
        plots.Point(f"int8:method{k}", 1.0 + 0.02 * k, 0.97 + 0.0004 * k, 0.9, 1.3, 0.4, "FP32 baseline" if k == 0 else "")
        for k in range(8)
    ]


def test_scatter_is_deterministic_and_labels_never_overlap():
    first = plots.scatter(crowded(), "latency (ms)", "top1", True, "top1 vs latency")
    assert first == plots.scatter(crowded(), "latency (ms)", "top1", True, "top1 vs latency")
    assert first.startswith("<svg") and "<?xml" not in first and "dc:date" not in first
    texts = plots.svg_texts(first)
    assert "int8:method0 (FP32 baseline)" in texts and all(f"int8:method{k}" in texts for k in range(1, 8))
    ticks = [t for t in texts if t.endswith("%")]
    assert ticks and all(float(t.rstrip("%")) <= 100 for t in ticks)  # a fraction's axis never runs past 100%
    assert all(re.fullmatch(r"-?\d+(\.\d{1,2})?%", t) for t in ticks), ticks  # rounded ticks


def test_the_overlap_check_sees_overlaps_and_spreading_removes_them():
    Figure = plots._mpl()
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    texts = [ax.annotate(f"label {k}", (0.5, 0.5), xytext=(5, 5), textcoords="offset points") for k in range(4)]
    fig.canvas.draw()
    assert len(plots.label_overlaps(fig, texts)) == 6  # four labels on one spot: every pair
    plots._spread_labels(fig, texts)
    assert plots.label_overlaps(fig, texts) == []


def test_bars_start_at_zero_and_share_a_scale():
    a = plots.bars([("x", 10.0), ("y", 40.0)], "dB", "a", xmax=80.0)
    b = plots.bars([("x", 70.0), ("y", -5.0)], "dB", "b", xmax=80.0)
    # the same axis (0 to 80, a little room for the value labels) in both charts
    ticks_a = [t for t in plots.svg_texts(a) if re.fullmatch(r"\d+", t)]
    assert ticks_a == [t for t in plots.svg_texts(b) if re.fullmatch(r"\d+", t)] and ticks_a[0] == "0" and "80" in ticks_a
    assert "-5 dB" in plots.svg_texts(b)  # a negative value keeps its label on an empty bar
