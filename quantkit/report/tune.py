"""Reports of per-layer precision work: ``sensitivity.{json,md,html}`` and ``tune_report.{md,html}``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantkit.evaluation.metrics import COLLAPSE_SQNR_DB
from quantkit.report.html import html_page, markdown_table_to_html
from quantkit.report.plots import Point, bars, scatter
from quantkit.tuning.search import TuneResult, summary
from quantkit.tuning.sensitivity import Evaluator, SensitivityResult


def sensitivity_files(out: Path, result: SensitivityResult) -> dict[Path, bytes]:
    doc = {
        "format": "quantkit.sensitivity",
        "accuracy": result.accuracy_name,
        "unit": result.unit,
        "baseline_accuracy": result.baseline.accuracy,
        "all_int8_accuracy": result.all_int8.accuracy,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "nodes": [n.to_json() for n in result.nodes],
        "notes": result.notes,
    }
    table = result.table(limit=len(result.nodes))
    shown = result.nodes[:40]
    gains = [(n.name[-40:], max(n.disable_one_gain, n.enable_one_loss if not math.isnan(n.enable_one_loss) else 0.0, 0.0)) for n in shown]
    charts = ""
    if not all(math.isnan(n.disable_one_gain) for n in shown):
        charts += f"<h2>Sensitivity ({result.unit}; the larger of disable-one gain and enable-one loss)</h2>"
        charts += bars(gains, result.unit, f"sensitivity, {result.accuracy_name} ({result.unit})")
    local = [(n.name[-40:], n.local_sqnr_db) for n in shown if not math.isnan(n.local_sqnr_db)]
    if local:
        charts += "<h2>Local SQNR per node (dB; each node alone quantized on FP32's inputs, lower is worse)</h2>"
        charts += bars(local, "dB", "local SQNR per node", marks=COLLAPSE_SQNR_DB)
    body = markdown_table_to_html(table) + charts
    return {
        out / "sensitivity.json": (json.dumps(doc, indent=1) + "\n").encode(),
        out / "sensitivity.md": ("# Per-node sensitivity\n\n" + table + "\n").encode(),
        out / "sensitivity.html": html_page("quantkit per-node sensitivity", body).encode(),
    }


def tune_files(out: Path, result: TuneResult, evaluator: Evaluator) -> dict[Path, bytes]:
    text = summary(result, evaluator)
    unit = evaluator.objective.unit
    rows = [
        f"| trial | phase | fallback nodes | {evaluator.accuracy_name} | drop ({unit}) | meets | latency ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result.trials:
        lat = f"{t.latency_ms:.3f}" if t.latency_ms is not None else "-"
        rows.append(
            f"| {t.index} | {t.phase} | {len(t.fallback)} | {evaluator.objective.show(t.accuracy)} ± {t.noise:.2f} | {t.drop:+.2f} | "
            f"{'yes' if t.meets else 'no'} | {lat} |"
        )
    best = result.best.index if result.best else None
    # one label per fallback count (the first trial there, or the chosen one): trials of equal
    # count sit on one vertical line, and labelling each made them unreadable
    labelled = {len(t.fallback): t.index for t in reversed(result.trials)}
    labelled.update({len(t.fallback): t.index for t in result.trials if t.index == best})
    points = [
        Point(
            f"#{t.index}" if labelled.get(len(t.fallback)) == t.index else "",
            float(len(t.fallback)),
            t.accuracy,
            y_err=t.noise or None,
            marked="chosen" if t.index == best else "",
        )
        for t in result.trials
    ]
    objective = evaluator.objective
    target = None if result.max_drop is None else evaluator.baseline.accuracy - result.max_drop / objective.scale
    md = "# Precision tuning\n\n" + text + "\n\n## Trials\n\n" + "\n".join(rows) + "\n"
    body = (
        markdown_table_to_html(text)
        + "<h2>Trade-off: accuracy vs nodes in high precision</h2>"
        + scatter(points, "nodes kept in high precision", objective.name, unit == "points", "trials", target=target)
        + "<h2>Trials</h2>"
        + markdown_table_to_html("\n".join(rows))
    )
    return {out / "tune_report.md": md.encode(), out / "tune_report.html": html_page("quantkit precision tuning", body).encode()}
