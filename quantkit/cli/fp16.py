"""``quantkit fp16``: a float16 model (weights and compute), float32 inputs and outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.api import calibrate
from quantkit.cli.args import add_check_args, preprocess_from_args, verify
from quantkit.data.batching import fixed_batch
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import data_or_recorded
from quantkit.export.fp16 import convert_fp16, fp16_precisions
from quantkit.export.qdq import node_names
from quantkit.model import load_model
from quantkit.options import CalibrationOptions, DataOptions
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (FP32, or a Q/DQ model whose float parts should become FP16)")
    p.add_argument("--plan", help="precision plan: nodes marked fp32 stay in float32")
    p.add_argument("--ranges", help="ranges.json: nodes whose tensors exceed float16's range stay in float32")
    p.add_argument("--no-ranges", action="store_true", help="convert without knowing any tensor's range (unsafe: overflow goes unnoticed)")
    p.add_argument("--num-samples", type=int, help="with --data: samples of the min/max pass (default: all)")
    p.add_argument("--keep-op-types", default="", help="comma list of op types to keep in float32, e.g. Softmax,LayerNormalization")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    add_check_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, args.model, args.ranges, args.plan, args.data)
    model = load_model(args.model)
    plan = PrecisionPlan.load(args.plan) if args.plan else None
    names = node_names(model) if plan else []
    precisions = fp16_precisions(plan, names) if plan else None
    ranges = RangeSet.load(args.ranges) if args.ranges else None
    if ranges is not None:
        ranges.check_model(model.path, model.sha256)
    data, preprocess = data_or_recorded(args.data, preprocess_from_args(args) if args.data else None, ranges)
    if args.no_ranges:
        ranges = None
        print("warning: converting without ranges (--no-ranges): a tensor beyond float16's range becomes inf unnoticed", file=sys.stderr)
    else:
        if data is not None:  # one min/max pass over every float tensor fills what ranges.json lacks
            observed = calibrate(
                model,
                data,
                CalibrationOptions(methods="minmax", all_tensors=True),
                data_options=DataOptions(
                    preprocess=preprocess,
                    num_samples=args.num_samples or (ranges.calibration.get("num_samples") if ranges is not None else None),
                    shuffle=False,
                    batch_size=fixed_batch(model) or 32,
                ),
            ).ranges
            ranges = observed if ranges is None else ranges.with_missing_from(observed)
        if ranges is None:
            raise QuantkitError(
                "fp16 needs the tensors' ranges to keep what overflows float16 in float32: pass --ranges ranges.json "
                "or --data (one min/max pass), or --no-ranges to convert without them",
                option="ranges",
            )
    keep = {t.strip() for t in args.keep_op_types.split(",") if t.strip()}
    converted, report = convert_fp16(model.proto, precisions=precisions, ranges=ranges, keep_op_types=keep)
    if report.unranged:
        shown = ", ".join(report.unranged[:5]) + (" ..." if len(report.unranged) > 5 else "")
        raise QuantkitError(
            f"{len(report.unranged)} float tensor(s) have no range in {args.ranges} ({shown}) and its calibration data "
            "is not reachable: pass --data for a min/max pass, or calibrate with --all-tensors",
            option="data",
        )
    verify(args, model, converted, ranges)
    out = write_bytes_atomic(Path(args.output), converted.SerializeToString())
    if not args.quiet:
        print(report.summary())
        for node, reason in list(report.kept_fp32.items())[:20]:
            print(f"  fp32: {node} ({reason})")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, FP32 was {model.path.stat().st_size / 1e6:.2f} MB)")
    return 0
