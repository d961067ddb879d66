"""``quantkit optimize``: the model after the structure-optimization passes, with its layer-count table."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.cli.args import add_check_args, check_and_print
from quantkit.graph.optimize import PASSES, optimize_model
from quantkit.model import load_model


def passes_from_args(args: argparse.Namespace) -> list[str]:
    chosen = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else list(PASSES)
    return [p for p in chosen if p not in (args.skip or "").split(",")]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--passes", help=f"comma list of passes (default: all of {', '.join(PASSES)})")
    p.add_argument("--skip", help="comma list of passes to leave out, e.g. vertical for a model going to TensorRT")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    add_check_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, args.model, args.data)
    model = load_model(args.model)
    passes = passes_from_args(args)
    optimized, report = optimize_model(model, passes)
    check_and_print(args, model, optimized)
    out = write_bytes_atomic(Path(args.output), optimized.SerializeToString())
    if not args.quiet:
        print(report.table())
        hint = " (FusedConv nodes: runs on onnxruntime; TensorRT fuses itself, use --skip vertical)" if "vertical" in passes else ""
        print(f"wrote {out}{hint}")
    return 0
