"""``quantkit build``: a TensorRT engine (10.x/11.x), or an optimized onnxruntime model (``quantkit.build``)."""

from __future__ import annotations

import argparse

from quantkit.api.build import EngineNotBuilt, build
from quantkit.backends.ort import ORT_RUNTIMES
from quantkit.backends.trtexec import PRECISIONS
from quantkit.options import BuildOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (FP32, or Q/DQ / FP16 from quantkit quantize / fp16)")
    p.add_argument(
        "--runtime",
        choices=["tensorrt", *ORT_RUNTIMES],
        default="tensorrt",
        help="tensorrt: an engine (default); ort-*: an optimized onnxruntime model for that provider",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="TensorRT 10 builder precision (ignored for Q/DQ models)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cache", help="TensorRT calibration cache for implicit INT8 (TensorRT 10)")
    src.add_argument("--qdq", action="store_true", help="the model carries Q/DQ: build strongly typed (detected from the model too)")
    p.add_argument(
        "--weak-typing",
        action="store_true",
        help="TensorRT 10, a float16 or mixed model: build with --fp16 hints instead of strongly typed (the default for any typed "
        "model); layers kept in FP32 against overflow may then run in FP16",
    )
    p.add_argument("--plan", help="precision plan for per-layer constraints (TensorRT 10)")
    p.add_argument(
        "--restamp",
        action="store_true",
        help="the cache is stamped for another TensorRT version: write a copy stamped for the installed one and build with it",
    )
    p.add_argument(
        "--placeholder-ranges",
        action="store_true",
        help="allow --precision int8 without ranges: placeholder scales, for a performance-only engine (accuracy meaningless)",
    )
    p.add_argument("--shapes", help="dynamic shapes: NAME:MIN/OPT/MAX, dims joined by x")
    p.add_argument(
        "--ranges",
        help="ranges.json from calibrate: its recorded input shapes give the dynamic inputs' optimization profile (unless --shapes)",
    )
    p.add_argument("--workspace", type=int, help="workspace memory pool in MiB")
    p.add_argument("--timing-cache", help="timing cache file, read and updated")
    p.add_argument("-o", "--output", required=True, help="engine file (TensorRT) or optimized .onnx (onnxruntime)")


def run(args: argparse.Namespace) -> int:
    options = BuildOptions(
        runtime=args.runtime,
        precision=args.precision,
        cache=args.cache,
        qdq=args.qdq,
        plan=args.plan,
        restamp=args.restamp,
        placeholder_ranges=args.placeholder_ranges,
        shapes=args.shapes,
        ranges=args.ranges,
        workspace=args.workspace,
        timing_cache=args.timing_cache,
        weak_typing=args.weak_typing,
    )
    try:
        report = build(args.model, args.output, options)
    except EngineNotBuilt as exc:
        if not args.quiet:
            print("\n".join(exc.commands))  # what to run on a machine with TensorRT; the error line follows
        raise
    if not args.quiet:
        print(report.summary())
    return 0
