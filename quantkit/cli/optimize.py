"""``quantkit optimize`` and ``quantkit inspect``: structure optimization and its layer-count table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantkit.atomic import write_bytes_atomic
from quantkit.model import load_model
from quantkit.optimize import PASSES, optimize_model


def _passes(args: argparse.Namespace) -> list[str]:
    chosen = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else list(PASSES)
    return [p for p in chosen if p not in (args.skip or "").split(",")]


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("optimize", "fold BN, fuse Conv+activation (CBR), merge sibling convs, fold Concats; write the optimized model"),
        ("inspect", "layer counts before and after each optimization step, and the fusions found (writes nothing)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="FP32 ONNX model")
        p.add_argument("--passes", help=f"comma list of passes (default: all of {', '.join(PASSES)})")
        p.add_argument("--skip", help="comma list of passes to leave out, e.g. vertical for a model going to TensorRT")
        if name == "optimize":
            p.add_argument("-o", "--output", required=True, help="output ONNX file")
            p.add_argument("--quiet", action="store_true")
        else:
            p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    optimized, report = optimize_model(model, _passes(args))
    if args.command == "inspect":
        print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
        return 0
    out = write_bytes_atomic(Path(args.output), optimized.SerializeToString())
    if not args.quiet:
        print(report.table())
        print(
            f"wrote {out}"
            + (" (FusedConv nodes: runs on onnxruntime; TensorRT fuses itself, use --skip vertical)" if "vertical" in _passes(args) else "")
        )
    return 0
