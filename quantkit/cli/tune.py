"""``quantkit sensitivity`` and ``quantkit tune``: which nodes hurt INT8 accuracy, and the fewest to keep high."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quantkit.atomic import ensure_writable_dir, write_files_atomic
from quantkit.calibration import calibrate
from quantkit.cli.calibrate import add_distributed_args, add_preprocess_args, preprocess_from_args
from quantkit.data import batches, open_source
from quantkit.errors import QuantkitError
from quantkit.metrics import METRICS
from quantkit.model import ModelInfo, load_model
from quantkit.qdq import TARGETS
from quantkit.ranges import RangeSet
from quantkit.report import html_page, markdown_table_to_html, svg_bars, svg_scatter
from quantkit.sensitivity import Evaluator, SensitivityResult, analyze
from quantkit.tune import TuneResult, summary, tune


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("sensitivity", "rank quantized nodes by the accuracy they cost (enable-one, disable-one, output SQNR)"),
        ("tune", "find the fewest nodes to keep in FP16/FP32 so that INT8 meets an accuracy target; writes a precision plan"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="FP32 ONNX model")
        p.add_argument("--calib", help="calibration data (or --ranges)")
        p.add_argument("--ranges", help="ranges.json from quantkit calibrate")
        p.add_argument(
            "--val", required=True, help="validation data; labels (a label column, npz key or folder names) give the task metric"
        )
        p.add_argument("--method", default="entropy", help="calibration method whose ranges are used (default entropy)")
        p.add_argument("--target", choices=TARGETS, default="tensorrt", help="Q/DQ placement (default tensorrt)")
        p.add_argument(
            "--metric", default="top1", choices=sorted(METRICS), help="task metric where labels exist (else top-1 agreement with FP32)"
        )
        p.add_argument("--no-labels", action="store_true", help="use top-1 agreement with FP32 even where labels exist")
        p.add_argument("--num-samples", type=int, help="validation samples (default: all)")
        p.add_argument("--num-calib-samples", type=int, help="calibration samples (default: all)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--quiet", action="store_true")
        if name == "tune":
            p.add_argument("--max-drop", type=float, default=0.5, help="accuracy points the tuned model may lose (default 0.5)")
            p.add_argument("--fallback", choices=["fp16", "fp32"], default="fp32", help="precision of the nodes taken out of INT8")
            p.add_argument("--max-trials", type=int, help="stop after N trials (the best plan so far is saved)")
            p.add_argument("--timeout", type=float, help="stop after S seconds (the best plan so far is saved)")
            p.add_argument(
                "--start-from-known", action="store_true", help="start with Softmax/LayerNorm and the first/last layers in high precision"
            )
        add_distributed_args(p)
        add_preprocess_args(p)


def _setup(args: argparse.Namespace) -> tuple[ModelInfo, RangeSet, Evaluator]:
    model = load_model(args.model)
    preprocess = preprocess_from_args(args)
    if args.ranges:
        ranges = RangeSet.load(args.ranges)
    elif args.calib:
        ranges = calibrate(
            model, args.calib, methods=args.method, num_samples=args.num_calib_samples, batch_size=args.batch_size, preprocess=preprocess
        ).ranges
    else:
        raise QuantkitError("give calibration data (--calib) or a ranges file (--ranges)")
    source = open_source(args.val, model, preprocess, shuffle=False)
    val = list(batches(source, model, args.batch_size, args.num_samples, source.description))
    labels = [label for b in val for label in b.labels]
    labelled = not args.no_labels and bool(labels) and all(label is not None for label in labels)
    return model, ranges, Evaluator(model, val, (args.metric, METRICS[args.metric]) if labelled else None, labels if labelled else None)


def _sensitivity_files(out: Path, result: SensitivityResult) -> dict[Path, bytes]:
    doc = {
        "format": "quantkit.sensitivity",
        "accuracy": result.accuracy_name,
        "baseline_accuracy": result.baseline.accuracy,
        "all_int8_accuracy": result.all_int8.accuracy,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "nodes": [n.to_json() for n in result.nodes],
        "notes": result.notes,
    }
    table = result.table(limit=len(result.nodes))
    bars = [(n.name[-40:], max(n.disable_one_gain, n.enable_one_loss, 0.0)) for n in result.nodes[:40]]
    body = (
        markdown_table_to_html(table)
        + "<h2>Sensitivity (points, max of disable-one gain and enable-one loss)</h2>"
        + svg_bars(bars, "pts", "sensitivity")
    )
    return {
        out / "sensitivity.json": (json.dumps(doc, indent=1) + "\n").encode(),
        out / "sensitivity.md": ("# Per-node sensitivity\n\n" + table + "\n").encode(),
        out / "sensitivity.html": html_page("quantkit per-node sensitivity", body).encode(),
    }


def _tune_files(out: Path, result: TuneResult, evaluator: Evaluator) -> dict[Path, bytes]:
    text = summary(result, evaluator)
    rows = ["| trial | phase | fallback nodes | accuracy | drop (points) | meets | latency ms |", "|---|---|---|---|---|---|---|"]
    for t in result.trials:
        lat = f"{t.latency_ms:.3f}" if t.latency_ms is not None else "-"
        rows.append(
            f"| {t.index} | {t.phase} | {len(t.fallback)} | {t.accuracy * 100:.2f}% | {t.drop:+.2f} | "
            f"{'yes' if t.meets else 'no'} | {lat} |"
        )
    best = result.best.index if result.best else None
    points = [(f"#{t.index}", float(len(t.fallback)), t.accuracy, "chosen" if t.index == best else "") for t in result.trials]
    md = "# Precision tuning\n\n" + text + "\n\n## Trials\n\n" + "\n".join(rows) + "\n"
    body = (
        markdown_table_to_html(text)
        + "<h2>Trade-off: accuracy vs nodes in high precision</h2>"
        + svg_scatter(points, "nodes kept in high precision", evaluator.accuracy_name)
        + "<h2>Trials</h2>"
        + markdown_table_to_html("\n".join(rows))
    )
    return {out / "tune_report.md": md.encode(), out / "tune_report.html": html_page("quantkit precision tuning", body).encode()}


def run(args: argparse.Namespace) -> int:
    if not args.workers:
        return _run(args, None)
    from quantkit.distributed import RayExecutor, ray_cluster

    with ray_cluster(args.workers, args.ray_address) as ray:
        return _run(
            args,
            lambda model, ranges, method: RayExecutor(
                ray, model, ranges, method, args.target, args.workers, args.gpus_per_worker, args.quiet
            ),
        )


def _run(args: argparse.Namespace, make_executor: Any) -> int:
    out = ensure_writable_dir(args.out)
    model, ranges, evaluator = _setup(args)
    method = args.method if args.method in ranges.methods else None
    executor = make_executor(model, ranges, method) if make_executor else None
    if args.command == "sensitivity":
        result = analyze(model, ranges, evaluator, method=method, target=args.target, executor=executor)
        files = write_files_atomic(_sensitivity_files(out, result))
        if not args.quiet:
            print(result.table())
            print("\n".join(f"wrote {f}" for f in files))
        return 0
    tuned = tune(
        model,
        ranges,
        evaluator,
        out,
        max_drop=args.max_drop,
        method=method,
        target=args.target,
        fallback=args.fallback,
        max_trials=args.max_trials,
        timeout=args.timeout,
        start_from_known=args.start_from_known,
        executor=executor,
    )
    files = dict(_tune_files(out, tuned, evaluator))
    if tuned.sensitivity is not None:
        files.update(_sensitivity_files(out, tuned.sensitivity))
    written = write_files_atomic(files)
    if not args.quiet:
        print(summary(tuned, evaluator))
        print("\n".join(f"wrote {f}" for f in [*tuned.files, *written]))
    return 0
