"""HTML building blocks of every report: a self-contained page and Markdown tables (charts: ``plots``)."""

from __future__ import annotations

import html

from quantkit import __version__


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
