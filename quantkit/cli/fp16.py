"""``quantkit fp16``: a float16 model (weights and compute), float32 inputs and outputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantkit._io import write_bytes_atomic
from quantkit.export.fp16 import convert_fp16, fp16_precisions
from quantkit.export.qdq import node_names
from quantkit.model import load_model
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (FP32, or a Q/DQ model whose float parts should become FP16)")
    p.add_argument("--plan", help="precision plan: nodes marked fp32 stay in float32")
    p.add_argument("--ranges", help="ranges.json: nodes whose tensors exceed float16's range stay in float32")
    p.add_argument("--keep-op-types", default="", help="comma list of op types to keep in float32, e.g. Softmax,LayerNormalization")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    plan = PrecisionPlan.load(args.plan) if args.plan else None
    names = node_names(model) if plan else []
    precisions = fp16_precisions(plan, names) if plan else None
    ranges = RangeSet.load(args.ranges) if args.ranges else None
    keep = {t.strip() for t in args.keep_op_types.split(",") if t.strip()}
    converted, report = convert_fp16(model.proto, precisions=precisions, ranges=ranges, keep_op_types=keep)
    out = write_bytes_atomic(Path(args.output), converted.SerializeToString())
    if not args.quiet:
        print(report.summary())
        for node, reason in list(report.kept_fp32.items())[:20]:
            print(f"  fp32: {node} ({reason})")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, FP32 was {model.path.stat().st_size / 1e6:.2f} MB)")
    return 0
