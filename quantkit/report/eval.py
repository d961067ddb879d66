"""Reports: ``report.json`` (versioned schema), ``report.md`` and a self-contained ``report.html``.

The HTML embeds its charts as inline SVG drawn by matplotlib (``quantkit.report.plots``): the
objective against latency (p10-p90 spread, standard error) with the FP32 baseline marked, size
bars, and per-slice SQNR of every output, all variants on one axis. It needs no network and no
JavaScript.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit._io import write_files_atomic
from quantkit.evaluation.metrics import COLLAPSE_SQNR_DB
from quantkit.evaluation.objectives import format_value
from quantkit.evaluation.run import EvalResult, VariantResult
from quantkit.report.html import STYLE
from quantkit.report.plots import Point, bars, lines, scatter

SCHEMA = "quantkit.report"
SCHEMA_VERSION = 2  # 2: objectives (any unit, with their noise) replace top-1-only metrics
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def to_json(result: EvalResult) -> dict[str, Any]:
    variants = []
    for v in result.variants:
        variants.append(
            {
                "name": v.name,
                "size_bytes": v.size_bytes,
                "metrics": v.metrics,
                "noise": v.noise,
                "latency": asdict(v.latency) if v.latency else None,
                "fidelity": [
                    {
                        "output": f.output,
                        "top1_agreement": f.top1_agreement,
                        "cosine": f.cosine,
                        "sqnr_db": _finite(f.sqnr_db),
                        "max_abs_error": _finite(f.max_abs_error),
                        "mean_abs_error": _finite(f.mean_abs_error),
                        "slices": [
                            {"axis": s.axis, "start": s.start, "stop": s.stop, "sqnr_db": _finite(s.sqnr_db), "collapsed": s.collapsed}
                            for s in f.slices
                        ],
                    }
                    for f in v.fidelity
                ],
                "error": v.error,
                "notes": v.notes,
                "layer_precisions": v.precisions,
            }
        )
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "quantkit_version": __version__,
        "model": result.model,
        "runtime": {"name": result.runtime, "providers": result.providers, "hardware": result.hardware},
        "data": result.data,
        "labelled": result.labelled,
        "metrics": result.metric_names,
        "objective": result.objective,
        "units": result.units,
        "max_drop": result.max_drop,
        "variants": variants,
        "flags": result.flags,
        "decision": [asdict(d) for d in result.decisions],
    }  # no step timings: without latency the report repeats byte for byte (timings are in the -v / --log-file log)


# ---- shared row values ------------------------------------------------------------------------
def _accuracy(result: EvalResult, v: VariantResult | None) -> tuple[str, float | None]:
    """The figure a variant is ranked by: the first objective's value."""
    if result.metric_names:
        key = result.metric_names[0]
        return key, v.metrics.get(key) if v else None
    return "top-1 agreement", v.fidelity[0].top1_agreement if v and v.fidelity else None


def _unit(result: EvalResult) -> str:
    return result.units.get(result.metric_names[0], "points") if result.metric_names else "points"


def _fmt(x: float | None, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x * scale:{spec}}{suffix}"


def _rows(result: EvalResult) -> list[list[str]]:
    base = next((v for v in result.variants if v.name == "fp32"), None)
    key = _accuracy(result, base)[0]
    unit = _unit(result)
    rows = [
        [
            "variant",
            "size MB",
            f"{key} (± s.e.)",
            f"Δ vs FP32 ({unit})",
            "top-1 agreement",
            "SQNR dB",
            "cosine",
            "batch-1 p50 ms",
            "p10–p90 ms",
            "throughput /s",
        ]
    ]
    base_acc = _accuracy(result, base)[1] if base else None
    for v in result.variants:
        if v.error:
            rows.append([v.name, "failed", v.error, "", "", "", "", "", "", ""])
            continue
        acc = _accuracy(result, v)[1]
        f = v.fidelity[0] if v.fidelity else None
        scale = 100 if unit == "points" else 1
        delta = None if acc is None or base_acc is None else scale * (acc - base_acc)
        noise = v.noise.get(key)
        shown = format_value(acc, unit) + (f" ± {noise:.2f}" if noise else "")
        rows.append(
            [
                v.name,
                _fmt(v.size_bytes, ".3f", 1e-6) if v.size_bytes else "–",
                shown,
                _fmt(delta, "+.2f") if v is not base else "baseline",
                _fmt(f.top1_agreement if f else None, ".1f", 100, "%"),
                _fmt(f.sqnr_db if f else None, ".1f"),
                _fmt(f.cosine if f else None, ".5f"),
                _fmt(v.latency.batch1_p50_ms if v.latency else None),
                f"{v.latency.batch1_p10_ms:.3f}–{v.latency.batch1_p90_ms:.3f}" if v.latency else "–",
                _fmt(v.latency.throughput_samples_per_s if v.latency else None, ".0f"),
            ]
        )
    return rows


def decision_lines(result: EvalResult) -> list[str]:
    """The report's last section: what to ship for each target, and how to make and build it."""
    if not result.decisions:
        return []
    lines = ["", "## Decision", ""]
    for d in result.decisions:
        lines += d.lines()
    return lines


# ---- Markdown ---------------------------------------------------------------------------------
def to_markdown(result: EvalResult) -> str:
    rows = _rows(result)
    lines = [
        f"# quantkit report: {Path(result.model['path']).name}",
        "",
        f"Runtime {result.runtime} ({', '.join(result.providers)}) on {result.hardware}. "
        f"Validation: {result.data['samples']} samples from {result.data['path']}"
        + ("" if result.labelled else " (no labels: compared with FP32)")
        + f". Throughput at batch {next((v.latency.throughput_batch for v in result.variants if v.latency), '-')}.",
        "",
        f"Objective: {result.objective or 'none'}.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if result.flags:
        lines += ["", "## Flags", ""] + [f"- {f}" for f in result.flags]
    counted = [v for v in result.variants if v.precisions]
    if counted:
        lines += ["", "## Layer precisions (from the ONNX types, as a strongly typed TensorRT build reads them)", ""]
        lines += [f"- {v.name}: " + ", ".join(f"{p} {n}" for p, n in v.precisions.items()) for v in counted]
    lines += ["", "## Per-output fidelity", ""]
    for v in result.variants:
        for f in v.fidelity:
            collapsed = f.collapsed_slices
            lines.append(
                f"- {v.name} / {f.output}: SQNR {_fmt(f.sqnr_db, '.1f')} dB, cosine {_fmt(f.cosine, '.5f')}, "
                f"max |err| {f.max_abs_error:.4g}, mean |err| {f.mean_abs_error:.4g}"
                + (
                    f", worst slice {min(f.slices, key=lambda s: s.sqnr_db).label()} {_fmt(min(s.sqnr_db for s in f.slices), '.1f')} dB"
                    if f.slices
                    else ""
                )
                + (f", **{len(collapsed)} collapsed slice(s)**" if collapsed else "")
            )
    notes = [(v.name, n) for v in result.variants for n in v.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {n}" for name, n in notes]
    lines += decision_lines(result)
    return "\n".join(lines) + "\n"


# ---- HTML with inline SVG ---------------------------------------------------------------------
def _latency_points(result: EvalResult, key: str) -> list[Point]:
    """One point a variant that ran and was timed: batch-1 p50 latency against its accuracy."""
    points = []
    for v in result.variants:
        acc = _accuracy(result, v)[1]
        if v.error or not v.latency or acc is None:
            continue
        noise = v.noise.get(key)
        lat = v.latency
        label = "FP32 baseline" if v.name == "fp32" else ""
        points.append(Point(v.name, lat.batch1_p50_ms, acc, lat.batch1_p10_ms or None, lat.batch1_p90_ms, noise if noise else None, label))
    return points


def _html_table(rows: list[list[str]]) -> str:
    table = "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
    for r in rows[1:]:
        if r[1] == "failed":  # the error spans the row
            error = f'<td colspan="{len(r) - 2}" style="text-align:left">{html.escape(r[2])}</td>'
            table += f"<tr><td>{html.escape(r[0])}</td><td>failed</td>{error}</tr>"
            continue
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
    return table + "</tbody></table>"


def _fidelity_charts(result: EvalResult, base: Any) -> list[str]:
    """One per-slice SQNR chart per output, every variant on one axis."""
    blocks = []
    for name in [f.output for f in base.fidelity] if base else []:
        series = [
            (v.name, [_finite(s.sqnr_db) if _finite(s.sqnr_db) is not None else math.inf for s in f.slices[:256]])
            for v in result.variants
            for f in v.fidelity
            if f.output == name and f.slices and v.name != "fp32"
        ]
        if series:
            title = f"{name}: per-slice SQNR against FP32"
            blocks.append(lines(series, "slice index (axis 1)", "SQNR dB", title, threshold=COLLAPSE_SQNR_DB, joined=False))
    return blocks


def to_html(result: EvalResult) -> str:
    base = next((v for v in result.variants if v.name == "fp32"), None)
    key = _accuracy(result, base)[0]
    unit = _unit(result)
    points = _latency_points(result, key)
    sizes = [(v.name, v.size_bytes / 1e6) for v in result.variants if v.size_bytes and not v.error]
    table = _html_table(_rows(result))
    fidelity_blocks = _fidelity_charts(result, base)
    scatter_y = f"{key} ({'± standard error' if unit == 'points' else 'dB'})"
    accuracy_chart = scatter(points, "batch-1 latency (ms): p50, bars p10-p90", scatter_y, unit == "points", f"{key} vs latency")
    flags = "".join(f"<li>{html.escape(f)}</li>" for f in result.flags) or "<li>none</li>"
    title = f"quantkit report: {Path(result.model['path']).name}"
    unlabelled = "" if result.labelled else " <b>(no labels: compared with FP32)</b>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Runtime <b>{html.escape(result.runtime)}</b> ({html.escape(", ".join(result.providers))}) on {html.escape(result.hardware)}.
Validation: {result.data["samples"]} samples from {html.escape(str(result.data["path"]))}{unlabelled}.</p>
<p>Objective: <b>{html.escape(result.objective or "none")}</b>.</p>
<h2>Variants</h2>
{table}
<h2>Flags</h2>
<ul class="flags">{flags}</ul>
<h2>Accuracy vs latency</h2>
{accuracy_chart}
<h2>Model size</h2>
{bars(sizes, "MB", "model size")}
<h2>Per-output fidelity</h2>
{"".join(fidelity_blocks) or "<p>No sliced outputs.</p>"}
<p style="font-size:11px;color:#777">quantkit {__version__}, report schema {SCHEMA_VERSION}</p>
</body></html>
"""


def write_report(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """Write report.json, report.md and report.html into ``out_dir``, all or nothing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_files_atomic(
        {
            out / "report.json": (json.dumps(to_json(result), indent=1, allow_nan=False) + "\n").encode(),
            out / "report.md": to_markdown(result).encode(),
            out / "report.html": to_html(result).encode(),
        }
    )
