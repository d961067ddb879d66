"""The reports' charts, drawn by matplotlib and embedded as inline SVG (report.html stays one file).

Every chart keeps honest scales: bars start at zero, a chart shared by several variants has one
axis for all of them, ticks are rounded (matplotlib's locators), and point labels are moved
until no two overlap (checked on the drawn figure: ``label_overlaps``). SVG output is
byte-identical on repeat: no date, fixed ids.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BLUE, RED, GREEN, GREY = "#1f77b4", "#d62728", "#2ca02c", "#888888"
WIDTH_IN = 7.5


@dataclass
class Point:
    label: str
    x: float
    y: float
    x_low: float | None = None  # spread of x (latency p10..p90)
    x_high: float | None = None
    y_err: float | None = None  # standard error of y
    marked: str = ""  # "FP32 baseline", "chosen": drawn red, named in the label


def _mpl() -> Any:
    import matplotlib

    matplotlib.rcParams.update(
        {
            "svg.hashsalt": "quantkit",  # fixed ids: the same report twice is the same bytes
            "svg.fonttype": "none",  # text stays text: smaller, searchable, measurable in a browser
            "font.family": "DejaVu Sans",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)  # measures text for the overlap check; savefig("svg") still writes SVG
        return fig

    return figure


def _svg(fig: Any, label: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype: it sits inside HTML
    return text.replace("<svg ", f'<svg role="img" aria-label="{_escape(label)}" ', 1)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def label_overlaps(fig: Any, texts: Sequence[Any]) -> list[tuple[str, str]]:
    """Pairs of the given text artists whose drawn boxes intersect."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
    return [(a, c) for i, (a, b) in enumerate(boxes) for c, d in boxes[i + 1 :] if b.overlaps(d)]


def _spread_labels(fig: Any, texts: list[Any], step_pt: float = 11.0, rounds: int = 60) -> None:
    """Move annotation labels down or up by whole lines until none overlaps another."""
    for _ in range(rounds):
        pairs = label_overlaps(fig, texts)
        if not pairs:
            return
        moved = {b for _, b in pairs}
        for t in texts:
            if t.get_text() in moved:
                x, y = t.get_position()  # offset in points from the anchor point
                t.set_position((x, y - step_pt))


def scatter(points: Sequence[Point], xlabel: str, ylabel: str, percent: bool, title: str, target: float | None = None) -> str:
    """Points with error bars (x spread, y standard error), each labelled without overlaps."""
    if not points:
        return "<p>Nothing to plot: no variant has both values.</p>"
    Figure = _mpl()
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(WIDTH_IN, 4.2))
    ax = fig.add_subplot()
    scale = 100.0 if percent else 1.0
    texts = []
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        color = RED if p.marked else BLUE
        xerr = None
        if p.x_low is not None and p.x_high is not None:
            xerr = [[max(p.x - p.x_low, 0.0)], [max(p.x_high - p.x, 0.0)]]
        yerr = [[p.y_err]] if p.y_err else None
        ax.errorbar([p.x], [p.y * scale], xerr=xerr, yerr=yerr, fmt="s" if p.marked else "o", color=color, ecolor=GREY, capsize=3)
        text = p.label + (f" ({p.marked})" if p.marked else "")
        texts.append(ax.annotate(text, (p.x, p.y * scale), xytext=(7, 5), textcoords="offset points", fontsize=8, color="#222"))
    if target is not None:
        ax.axhline(target * scale, color=GREY, linestyle="--", linewidth=1)
        ax.annotate("target", (0, target * scale), xycoords=("axes fraction", "data"), xytext=(2, 3), textcoords="offset points")
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=None))
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 100.0 + (high - low) * 0.05))  # no axis beyond 100%
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.grid(alpha=0.3)
    fig.canvas.draw()
    _spread_labels(fig, texts)
    return _svg(fig, title)


def bars(items: Sequence[tuple[str, float]], unit: str, title: str, xmax: float | None = None, marks: float | None = None) -> str:
    """Horizontal bars from zero, valued at their ends; ``xmax`` shares one scale across charts;
    ``marks`` draws a reference line (e.g. the collapse threshold)."""
    if not items:
        return "<p>Nothing to plot.</p>"
    Figure = _mpl()
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(WIDTH_IN, 0.8 + 0.24 * len(items)))
    ax = fig.add_subplot()
    names = [n for n, _ in items][::-1]
    values = [v for _, v in items][::-1]
    finite = [v for v in values if math.isfinite(v)]
    top = xmax if xmax is not None else max([*finite, 1e-9])

    def drawn(v: float) -> float:  # bars start at zero: a negative value is a label on an empty bar
        return min(max(v, 0.0), top) if math.isfinite(v) else top

    ax.barh(range(len(values)), [drawn(v) for v in values], color=GREEN, height=0.7)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g} {unit}" if math.isfinite(v) else "∞", (drawn(v), i), xytext=(3, -3), textcoords="offset points", fontsize=8)
    if marks is not None:
        ax.axvline(marks, color=RED, linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(0, top * 1.18)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel(unit)
    ax.set_title(title, loc="left")
    return _svg(fig, title)


def lines(
    series: Sequence[tuple[str, Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    threshold: float | None = None,
    joined: bool = True,
) -> str:
    """One line per series over a shared index axis and one shared y axis from zero; ``joined``
    False draws markers only (the index is categorical: classes, not a sequence)."""
    if not series:
        return "<p>Nothing to plot.</p>"
    Figure = _mpl()
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(WIDTH_IN, 3.4))
    ax = fig.add_subplot()
    finite = [v for _, ys in series for v in ys if math.isfinite(v)]
    cap = (max(finite) if finite else 1.0) * 1.1 or 1.0
    for name, ys in series:
        shown = [min(v, cap) if not math.isnan(v) else math.nan for v in ys]
        ax.plot(range(len(shown)), shown, marker="o", markersize=3, linewidth=1 if joined else 0, label=name)
    if threshold is not None:
        ax.axhline(threshold, color=RED, linestyle="--", linewidth=1, label=f"collapse ({threshold:g} {ylabel.split()[-1]})")
    ax.set_ylim(min(0.0, min(finite, default=0.0)), cap)
    ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never on them
    return _svg(fig, title)


def svg_texts(svg: str) -> list[str]:
    """The text of every <text> element of an SVG (for tests and checks)."""
    return [re.sub(r"<[^>]+>", "", m) for m in re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S)]
