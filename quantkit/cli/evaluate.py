"""``quantkit eval``: accuracy, fidelity, latency and size of every variant; writes the report."""

from __future__ import annotations

import argparse

from quantkit._io import ensure_writable_dir
from quantkit.backends.ort import RUNTIMES
from quantkit.cli.args import (
    add_class_names_arg,
    add_objective_args,
    add_out_dir,
    add_preprocess_args,
    data_options_from_args,
    options_from_args,
    out_dir,
)
from quantkit.errors import QuantkitError
from quantkit.evaluation.run import evaluate
from quantkit.options import DEFAULT_MAX_DROP, DEFAULT_MAX_MEMORY, DEFAULT_VARIANTS, EvalOptions, RuntimeOptions, parse_size
from quantkit.report.eval import decision_lines, to_json, to_markdown, write_report


def _slices(specs: list[str] | None) -> dict[str, list[tuple[int, int, int]]] | None:
    """OUTPUT:AXIS:START-STOP[,START-STOP...] -> {output: [(axis, start, stop), ...]}."""
    if not specs:
        return None
    out: dict[str, list[tuple[int, int, int]]] = {}
    for spec in specs:
        try:
            name, axis, ranges = spec.rsplit(":", 2)
            for r in ranges.split(","):
                start, stop = r.split("-")
                out.setdefault(name, []).append((int(axis), int(start), int(stop)))
        except ValueError:
            raise QuantkitError(f"--slice {spec!r}: use OUTPUT:AXIS:START-STOP[,START-STOP...], e.g. output0:1:0-4,4-84") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--data", required=True, help="validation data (image folder, table or arrays), with labels where available")
    p.add_argument("--calib", help="calibration data, to build int8 variants")
    p.add_argument("--ranges", help="ranges.json to build int8 variants from, instead of calibrating")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma list (default {DEFAULT_VARIANTS}); also fp16, modelopt, int8-tensorrt:M, NAME=file.onnx",
    )
    p.add_argument("--labels", default=None, help="label column of a table (default: label/labels/target/class, or image-folder names)")
    p.add_argument("--no-labels", action="store_true", help="ignore labels: fidelity against FP32 only")
    add_class_names_arg(p)
    add_objective_args(p, several=True)
    p.add_argument("--runtime", choices=list(RUNTIMES), default="ort-cpu", help="where the variants run (default ort-cpu)")
    p.add_argument("--num-samples", type=int, help="validation samples (default: all)")
    p.add_argument("--num-calib-samples", type=int, help="calibration samples (default: all)")
    p.add_argument(
        "--batch-size", type=int, help="validation batch (default: the model's fixed batch, else up to 32 that fit --max-memory)"
    )
    p.add_argument(
        "--max-memory",
        type=parse_size,
        default=DEFAULT_MAX_MEMORY,
        help="activation memory one run may hold, which picks the batch size (default 1G; e.g. 512M)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=DEFAULT_MAX_DROP,
        help=f"flag variants losing more than this many points (dB for sqnr) of the first metric (default {DEFAULT_MAX_DROP})",
    )
    p.add_argument("--slice", action="append", help="check fidelity per slice: OUTPUT:AXIS:START-STOP[,...] (repeatable)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    add_out_dir(p, "output folder of report.json/.md/.html, e.g. reports/mymodel")
    add_preprocess_args(p)


def run(args: argparse.Namespace) -> int:
    ensure_writable_dir(out_dir(args))  # before the long work: an existing file or a read-only folder fails now
    options = options_from_args(
        EvalOptions,
        args,
        metrics=[m.strip() for m in args.metric.split(",") if m.strip()],
        labels=not args.no_labels,
        slices=_slices(args.slice),
        latency=not args.no_latency,
    )
    result = evaluate(
        args.model,
        args.data,
        options,
        data_options=data_options_from_args(args, shuffle=False, label_column=args.labels),
        runtime=RuntimeOptions(args.runtime),
        calib=args.calib,
        ranges_path=args.ranges,
        quiet=args.quiet,
    )
    files = write_report(result, out_dir(args))
    args.result = to_json(result)
    if not args.quiet:
        print(f"objective: {result.objective}")
        mapping = result.data.get("class_mapping")
        if mapping:
            shown = ", ".join(f"{k} -> {v}" for k, v in sorted(mapping["folders"].items(), key=lambda kv: kv[1])[:12])
            print(f"labels: folder names -> class indices by {mapping['source']}: {shown}")
        print(to_markdown(result).split("## Per-output fidelity")[0].rstrip())
        print("\n".join(decision_lines(result)).strip())
        print()
        for f in files:
            print(f"wrote {f}")
    return 0
