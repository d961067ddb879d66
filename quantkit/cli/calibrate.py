"""``quantkit calibrate``: collect activation ranges and write ranges.json + TensorRT caches."""

from __future__ import annotations

import argparse

from quantkit.api import calibrate
from quantkit.calibration.methods import METHOD_NAMES
from quantkit.calibration.pipeline import summary_table
from quantkit.cli.args import (
    add_out_dir,
    add_preprocess_args,
    add_scale_out_args,
    data_options_from_args,
    options_from_args,
    out_dir,
    scale_out_from_args,
)
from quantkit.options import DEFAULT_MAX_MEMORY, CalibrationOptions, RuntimeOptions, parse_size
from quantkit.trt_cache import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Run MODEL over calibration data and write ranges.json and <model>.<method>.cache into --out-dir."
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--data", required=True, help="image folder, .parquet/.arrow/.csv/.jsonl table, or .npy/.npz arrays (file or folder)")
    add_out_dir(p, "output folder: ranges.json and the caches")
    p.add_argument("--method", default="entropy", help=f"{', '.join(METHOD_NAMES)}, a comma list, or all (default: entropy)")
    p.add_argument("--num-samples", type=int, help="stop after N samples (default: all)")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: the largest that fits --max-memory)")
    p.add_argument(
        "--max-memory",
        type=parse_size,
        default=DEFAULT_MAX_MEMORY,
        help="activation memory calibration may hold, which picks the batch size (default 1G; e.g. 512M)",
    )
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    p.add_argument("--num-bins", type=int, default=2048, help="histogram bins that at least cover [0, max|x|] (power of two, default 2048)")
    p.add_argument("--all-tensors", action="store_true", help="calibrate every float tensor, not only those feeding quantizable ops")
    p.add_argument("--input-name", help="model input that images feed (for models with several float inputs)")
    p.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false", help="read image folders in sorted order (default: seeded shuffle)"
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument(
        "--trt-version", default=DEFAULT_TRT_VERSION, help=f"TensorRT version stamped in the cache header (default {DEFAULT_TRT_VERSION})"
    )
    p.add_argument("--cache-algorithm", default=DEFAULT_ALGORITHM, choices=ALGORITHMS, help="calibrator name in the cache header")
    add_scale_out_args(p)
    add_preprocess_args(p)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(CalibrationOptions, args, {"methods": "method", "bins": "num_bins"})
    result = calibrate(
        args.model,
        args.data,
        options,
        data_options=data_options_from_args(args),
        runtime=RuntimeOptions(threads=args.threads),
        scale_out=scale_out_from_args(args),
        out=out_dir(args),
        quiet=args.quiet,
    )
    args.result = {"data": result.data_description, "tensors": len(result.ranges.tensors), "methods": list(result.ranges.methods),
                   "calibration": result.ranges.calibration, "timings_s": result.timings}  # fmt: skip
    if not args.quiet:
        print(summary_table(result))
    return 0
