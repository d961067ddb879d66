"""``quantkit quantize``: a Q/DQ ONNX model (TensorRT 11's INT8 path, also run by onnxruntime)."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantkit.atomic import write_bytes_atomic
from quantkit.errors import QuantkitError
from quantkit.fp16 import convert_fp16, fp16_precisions
from quantkit.model import load_model
from quantkit.plan import PrecisionPlan
from quantkit.qdq import TARGETS, quantize_model
from quantkit.ranges import RangeSet
from quantkit.trt_cache import encode_version, ranges_from_trt_cache, read_trt_cache


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an explicitly quantized (Q/DQ) ONNX model from ranges or a TensorRT cache")
    p.add_argument("model", help="FP32 ONNX model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ranges", help="ranges.json from quantkit calibrate")
    src.add_argument("--from-cache", help="a TensorRT calibration cache (TensorRT <= 10) to migrate to Q/DQ")
    p.add_argument("--method", help="which method's ranges (default: the first in ranges.json)")
    p.add_argument("--plan", help="precision plan (JSON/YAML): node names or patterns -> int8/fp16/fp32")
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="tensorrt",
        help="placement: tensorrt (int8 symmetric, default) or onnxruntime (uint8, fast on CPU)",
    )
    p.add_argument("--allow-missing", action="store_true", help="leave ops whose input has no range in float instead of failing")
    p.add_argument("--trt-version", help="with --from-cache: warn when the cache was written for another TensorRT version")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    warnings: list[str] = []
    if args.from_cache:
        cache = read_trt_cache(args.from_cache)
        if args.trt_version and cache.version != encode_version(args.trt_version):
            warnings.append(f"{args.from_cache} was written for TensorRT {cache.version_string}, not {args.trt_version}")
        ranges = ranges_from_trt_cache(cache, args.from_cache)
        allow_missing = True  # a cache from TensorRT covers what TensorRT calibrated; the rest stays float, with a warning
    else:
        ranges = RangeSet.load(args.ranges)
        allow_missing = args.allow_missing
    plan = PrecisionPlan.load(args.plan) if args.plan else None
    quantized, report = quantize_model(model, ranges, method=args.method, plan=plan, target=args.target, allow_missing=allow_missing)
    if args.from_cache and report.missing_ranges:
        shown = ", ".join(report.missing_ranges[:5])
        warnings.append(f"{len(report.missing_ranges)} tensor(s) have no entry in the cache; their ops stay in float: {shown}")
    if plan is not None:
        names = [n.name for n in quantized.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        wanted = fp16_precisions(plan, names, set(report.int8_nodes))
        if any(p == "fp16" for p in wanted.values()):
            quantized, fp16_report = convert_fp16(quantized, precisions=wanted, ranges=ranges if args.ranges else None)
            if not args.quiet:
                print(fp16_report.summary())
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        raise QuantkitError(f"output directory {out.parent} does not exist")
    write_bytes_atomic(out, quantized.SerializeToString())
    if not args.quiet:
        print(report.summary())
        for w in warnings:
            print(f"warning: {w}")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0
