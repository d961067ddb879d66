"""``quantkit quantize``: a Q/DQ ONNX model (TensorRT 11's INT8 path, also run by onnxruntime).

Parses the flags into ``QuantizeOptions``, calls ``quantkit.quantize`` and prints its summary.
"""

from __future__ import annotations

import argparse
import sys

from quantkit.api import quantize
from quantkit.cli.args import (
    add_check_args,
    add_filter_args,
    check_options_from_args,
    filters_from_args,
    preprocess_from_args,
    printing_check,
)
from quantkit.errors import QuantkitError
from quantkit.options import INT4_BLOCK_SIZES, TARGETS, DataOptions, QuantizeOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FP32 ONNX model")
    src = p.add_mutually_exclusive_group()
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
    p.add_argument(
        "--weight-bits",
        type=int,
        choices=[7, 8],
        help="weight precision (default: 7 for onnxruntime, safe on CPUs without VNNI; 8 for tensorrt)",
    )
    p.add_argument("--trt-version", help="with --from-cache: warn when the cache was written for another TensorRT version")
    p.add_argument(
        "--format",
        choices=["int8", "fp8", "int4-weights"],
        help="int8 (default, or the --plan's quantized_format); fp8: E4M3 Q/DQ at opset 19, scales amax/448, for TensorRT "
        "on Ada, Hopper and later GPUs; int4-weights: MatMul/Gemm weights only, block-wise int4 (opset 21), "
        "no ranges needed (--data weighs the clip search)",
    )
    p.add_argument(
        "--algorithms",
        default="auto",
        help="auto (default: where the check finds the model short of FP32 -- a task measure, else an output's cosine, "
        "under 0.99, or an output's SQNR under 30 dB -- depthwise-equalization on a model with depthwise Convs, SmoothQuant "
        "on one with MatMul projections, then bias-correction, empirical-bias-correction, gptq and gptq with "
        "empirical-bias-correction are tried and kept if the check shows they help), none, or a "
        "comma list: cle (cross-layer equalization of Conv pairs with high-bias absorption), depthwise-equalization "
        "(each depthwise Conv's input channels brought to one range, the inverse in its weights) — these two rewrite "
        "the model, then calibrate it on --data, instead of --ranges; gptq (each Conv/Gemm/MatMul's int8 weights, or with "
        "--format int4-weights each MatMul/Gemm's int4 blocks, rounded to minimise its output error on the calibration "
        "data; int8 layers in order, on their inputs in the quantized model, whose error they take back), "
        "bias-correction (each quantized Conv/Gemm's bias corrected for the mean shift of its quantized "
        "weights), empirical-bias-correction (each one's bias corrected for the mean shift of its output measured in the "
        "quantized model, which the quantized activations upstream add to; one pass per level of layers); gptq and the "
        "bias corrections read --data or the recorded calibration data",
    )
    p.add_argument(
        "--high-precision",
        choices=["fp16", "fp32"],
        help="what is not quantized runs in (default: fp16 for --target tensorrt, where strong typing makes the ONNX types "
        "decide each layer's precision, range-safe: what overflows float16 stays float32; fp32 for onnxruntime)",
    )
    p.add_argument(
        "--smoothquant",
        action="store_true",
        help="SmoothQuant before INT8/FP8: needs --data (channel maxima, then calibration of the smoothed model with --method; "
        "without it, each INT8 method and the best by the check)",
    )
    p.add_argument(
        "--alpha",
        default="auto",
        help="SmoothQuant's migration strength in [0, 1], or auto (default): per activation, the alpha (or none) whose INT8 "
        "MatMul error is smallest on the calibration data",
    )
    p.add_argument(
        "--block-size", type=int, choices=INT4_BLOCK_SIZES, default=128, help="int4-weights: weights per block along K (default 128)"
    )
    p.add_argument(
        "--measure-speed",
        metavar="BATCHES",
        help="onnxruntime target: time int8 against float on this CPU, kernel group by group (depthwise, 1x1 and other "
        "convs, MatMul/Gemm, other int8 ops), at these batch sizes (e.g. 1,32), and keep in float the groups whose int8 "
        "kernels are slower here",
    )
    add_filter_args(p)
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    add_check_args(p)


def _speed_batches(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise QuantkitError(f"--measure-speed {text!r}: give batch sizes, e.g. 1,32", option="measure_speed")
    return tuple(sizes)


def _quantize_options(args: argparse.Namespace) -> QuantizeOptions:
    return QuantizeOptions(
        ranges=args.ranges,
        from_cache=args.from_cache,
        trt_version=args.trt_version,
        plan=args.plan,
        method=args.method,
        target=args.target,
        format=args.format,
        allow_missing=args.allow_missing,
        weight_bits=args.weight_bits,
        filters=filters_from_args(args),
        quantize_attention=args.quantize_attention,
        high_precision=args.high_precision,
        algorithms=tuple(a.strip() for a in args.algorithms.split(",") if a.strip() and a.strip() != "none"),
        smoothquant=args.smoothquant,
        alpha=args.alpha,
        block_size=args.block_size,
        measure_speed=_speed_batches(args.measure_speed),
    )


def run(args: argparse.Namespace) -> int:
    options = _quantize_options(args)
    data_options = DataOptions(preprocess=preprocess_from_args(args)) if args.data else None
    progress = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr))
    with printing_check(args):
        result = quantize(
            args.model,
            args.output,
            options,
            data=args.data,
            data_options=data_options,
            check=check_options_from_args(args),
            progress=progress,
        )
    if not args.quiet:
        print(result.summary())
    return 0
