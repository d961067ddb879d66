"""``quantkit cache``: write a TensorRT calibration cache from ranges.json or from a Q/DQ model."""

from __future__ import annotations

import argparse

import onnx

from quantkit._io import check_output_file
from quantkit.errors import QuantkitError
from quantkit.export.qdq import ranges_from_qdq
from quantkit.ranges import RangeSet
from quantkit.trt_cache import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION, write_trt_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-ranges", help="ranges.json from quantkit calibrate")
    src.add_argument("--from-qdq", help="a TensorRT-style Q/DQ ONNX model (int8 per-tensor activation scales)")
    p.add_argument("--method", help="with --from-ranges: which method (default: the first)")
    p.add_argument(
        "--trt-version", default=DEFAULT_TRT_VERSION, help=f"TensorRT version stamped in the header (default {DEFAULT_TRT_VERSION})"
    )
    p.add_argument(
        "--cache-algorithm",
        default=DEFAULT_ALGORITHM,
        choices=ALGORITHMS,
        help=f"calibrator name in the header (default {DEFAULT_ALGORITHM}, what trtexec's --calib reads)",
    )
    p.add_argument("-o", "--output", required=True, help="output cache file")


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, args.from_ranges, args.from_qdq)
    if args.from_ranges:
        ranges = RangeSet.load(args.from_ranges)
        scales = ranges.scales(args.method)
    else:
        try:
            model = onnx.load(args.from_qdq)
        except Exception as exc:  # noqa: BLE001
            raise QuantkitError(f"cannot read {args.from_qdq} as an ONNX model ({type(exc).__name__})") from None
        scales = ranges_from_qdq(model).scales()
        if not scales:
            raise QuantkitError(f"{args.from_qdq} has no per-tensor int8 QuantizeLinear scales to export")
    path = write_trt_cache(args.output, scales, args.trt_version, args.cache_algorithm)
    if not args.quiet:
        print(f"wrote {path} ({len(scales)} tensors, TRT-{args.trt_version} {args.cache_algorithm})")
    return 0
