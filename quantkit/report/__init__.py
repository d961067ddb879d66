"""Reports: the evaluation report (``eval``: JSON with a versioned schema, Markdown, HTML), the
tuning and sensitivity reports (``tune``), and the HTML building blocks they share (``html``)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["SCHEMA", "SCHEMA_PATH", "SCHEMA_VERSION", "to_html", "to_json", "to_markdown", "write_report"], "quantkit.report.eval"
    ),
    **dict.fromkeys(["html_page", "markdown_table_to_html"], "quantkit.report.html"),
    **dict.fromkeys(["Point", "bars", "label_overlaps", "lines", "scatter"], "quantkit.report.plots"),
    **dict.fromkeys(["sensitivity_files", "tune_files"], "quantkit.report.tune"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
