"""HTML building blocks of every report: a self-contained page, Markdown tables, inline SVG charts."""

from __future__ import annotations

import html

from quantkit import __version__


def svg_scatter(points: list[tuple[str, float, float, str]], xlabel: str, ylabel: str) -> str:
    """points: (label, x, y, highlight); a non-empty highlight (e.g. "FP32 baseline") marks the point in red."""
    w, h, m = 640, 360, 60
    if not points:
        return "<p>No variant has both a latency and an accuracy.</p>"
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = 0.0, max(xs) * 1.15 or 1.0
    y0, y1 = min(ys), max(ys)
    pad = max((y1 - y0) * 0.15, 0.005)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def py(y: float) -> float:
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="Accuracy vs latency">']
    parts.append(f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" fill="#fafafa" stroke="#999"/>')
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{m - 6}" y="{py(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv * 100:.1f}%</text>')
        parts.append(f'<text x="{px(xv):.1f}" y="{h - m + 16}" font-size="11" text-anchor="middle">{xv:.2f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 12}" font-size="12" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(
        f'<text x="14" y="{h / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {h / 2})">{html.escape(ylabel)}</text>'
    )
    placed: list[tuple[float, float]] = []
    for label, x, y, baseline in sorted(points, key=lambda p: (not p[3], p[1], -p[2])):
        color = "#d62728" if baseline else "#1f77b4"
        lx, ly = px(x) + 9, py(y) - 8
        while any(abs(ly - oy) < 13 and abs(lx - ox) < 120 for ox, oy in placed):
            ly += 13  # keep labels of nearby points readable
        placed.append((lx, ly))
        shape = (
            f'<rect x="{px(x) - 6:.1f}" y="{py(y) - 6:.1f}" width="12" height="12" fill="{color}"/>'
            if baseline
            else f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="6" fill="{color}"/>'
        )
        parts.append(shape)
        if ly != py(y) - 8:  # moved to stay readable: a leader line back to its point
            parts.append(f'<line x1="{px(x):.1f}" y1="{py(y):.1f}" x2="{lx - 2:.1f}" y2="{ly - 4:.1f}" stroke="#bbb"/>')
        parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11">{html.escape(label)}{f" ({baseline})" if baseline else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: list[tuple[str, float]], unit: str, label: str) -> str:
    w, row, m = 640, 26, 170
    h = row * len(items) + 30
    top = max((v for _, v in items), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(label)}">']
    for i, (name, value) in enumerate(items):
        y = 10 + i * row
        width = (w - m - 90) * value / top
        parts.append(f'<text x="{m - 8}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
        parts.append(f'<rect x="{m}" y="{y}" width="{max(width, 1):.1f}" height="{row - 8}" fill="#2ca02c"/>')
        parts.append(f'<text x="{m + width + 6:.1f}" y="{y + 15}" font-size="12">{value:.3g} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_page(title: str, body: str) -> str:
    """A self-contained page with the report's style."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
<p style="font-size:11px;color:#777">quantkit {__version__}</p>
</body></html>
"""


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #eee; }
.flags li { color: #a00; }
"""


def markdown_table_to_html(markdown: str) -> str:
    """The Markdown tables quantkit writes, as HTML (other lines become paragraphs)."""
    out, rows = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
            continue
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('- '))}</p>")
    return "\n".join(out)
