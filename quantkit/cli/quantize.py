"""``quantkit quantize``: a Q/DQ ONNX model (TensorRT 11's INT8 path, also run by onnxruntime)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.api import calibrate
from quantkit.backends.ort import optimized_graph_check
from quantkit.cli.args import add_check_args, add_filter_args, filters_from_args, positive_int, preprocess_from_args, verify
from quantkit.data.batching import batches, fixed_batch
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import check_samples
from quantkit.export.apply import apply_plan
from quantkit.export.int4 import quantize_int4_weights
from quantkit.export.qdq import record_quantization
from quantkit.export.smoothquant import check_alpha, smooth_model
from quantkit.model import ModelInfo, load_model
from quantkit.options import TARGETS, CalibrationOptions, DataOptions, ExportOptions
from quantkit.plan import QUANTIZED_FORMATS, PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.trt_cache import encode_version, ranges_from_trt_cache, read_trt_cache
from quantkit.tuning.speed import SpeedChoice, fastest_placement


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
        "--smoothquant",
        action="store_true",
        help="SmoothQuant before INT8/FP8: needs --data (channel maxima, then calibration of the smoothed model with --method)",
    )
    p.add_argument(
        "--alpha",
        default="auto",
        help="SmoothQuant's migration strength in [0, 1], or auto (default): per activation, the alpha (or none) whose INT8 "
        "MatMul error is smallest on the calibration data",
    )
    p.add_argument("--block-size", type=positive_int, default=128, help="int4-weights: weights per block along K (default 128)")
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


def _int4(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    calibration = None
    if args.data:
        spec = preprocess_from_args(args)
        source = open_source(args.data, model, spec, shuffle=False)
        calibration = batches(source, model, fixed_batch(model) or 16)  # streamed: the moments need no sample in memory
    quantized, report = quantize_int4_weights(model, block_size=args.block_size, calibration=calibration)
    verify(args, model, quantized)
    out = write_bytes_atomic(Path(args.output), quantized.SerializeToString())
    if not args.quiet:
        print(report.summary())
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, FP32 was {model.path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _smoothquant(args: argparse.Namespace) -> int:
    """Smooth, calibrate the smoothed model on the same data, quantize it, check it, write it."""
    if not args.data or args.ranges or args.from_cache:
        raise QuantkitError("--smoothquant calibrates the smoothed model itself: give --data, not --ranges or --from-cache", option="data")
    alpha = check_alpha(args.alpha)
    model = load_model(args.model)
    spec = preprocess_from_args(args)
    smoothed, report = smooth_model(
        model, batches(open_source(args.data, model, spec, shuffle=False), model, fixed_batch(model) or 16), alpha
    )
    with tempfile.TemporaryDirectory(prefix="quantkit-sq-") as tmp:
        path = Path(tmp) / model.path.name
        onnx.save(smoothed, str(path))
        smoothed_info = load_model(path)
        method = args.method or ("minmax" if args.format == "fp8" else "entropy")
        ranges = calibrate(smoothed_info, args.data, CalibrationOptions(methods=method), data_options=DataOptions(preprocess=spec)).ranges
        plan = PrecisionPlan.load(args.plan) if args.plan else None
        options = ExportOptions(
            method, args.target, args.allow_missing, args.weight_bits, filters_from_args(args), args.quantize_attention, args.format
        )
        applied = apply_plan(smoothed_info, ranges, plan, options)
        record_quantization(applied.model, applied.model, {"smoothquant_alpha": alpha})
        verify(args, model, applied.model)  # against the original FP32 model, on the same samples
    out = write_bytes_atomic(Path(args.output), applied.model.SerializeToString())
    if not args.quiet:
        print(report.summary())
        print(applied.quantize.summary())
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _speed_batches(args: argparse.Namespace) -> list[int]:
    """--measure-speed's batch sizes, refused up front where it cannot apply (before any work)."""
    if not args.measure_speed:
        return []
    if args.target != "onnxruntime" or args.format != "int8" or args.smoothquant:
        raise QuantkitError(
            "--measure-speed times onnxruntime's CPU kernels: use it with --target onnxruntime (int8, without --smoothquant)",
            option="measure_speed",
        )
    try:
        sizes = [int(b) for b in args.measure_speed.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise QuantkitError(f"--measure-speed {args.measure_speed!r}: give batch sizes, e.g. 1,32", option="measure_speed")
    return sizes


def _resolve_format(args: argparse.Namespace) -> None:
    """--format, else the plan's quantized_format, else int8; a plan made for another format is refused."""
    plan_format = PrecisionPlan.load(args.plan).quantized_format if args.plan else None
    if args.format is None:
        args.format = plan_format or "int8"
    elif plan_format and args.format in QUANTIZED_FORMATS and args.format != plan_format:
        raise QuantkitError(
            f"{args.plan} was made for {plan_format} (its quantized_format) but --format is {args.format}: its choices were "
            f"checked in {plan_format}; tune again for {args.format}, or drop --format",
            option="format",
        )


#: with --format fp8 and no --method: E4M3 spans about 18 binades, so clipping buys little precision
#: and costs the clipped values. all-MiniLM-L6-v2 (bench/encoder.py), embedding cosine: max 0.9975,
#: mse-fp8 0.9974, entropy 0.990, percentile 0.992; ModelOpt's FP8 calibration is max too
FP8_DEFAULT_METHODS = ("mse-fp8", "minmax")


def _fp8_default_method(args: argparse.Namespace, ranges: RangeSet) -> RangeSet:
    """--format fp8 without --method: mse-fp8 where calibrated, else each tensor's observed max."""
    if args.format != "fp8" or args.method is not None:
        return ranges
    args.method = next((m for m in FP8_DEFAULT_METHODS if m in ranges.methods), "minmax")
    if args.method == "minmax" and "minmax" not in ranges.methods:
        ranges = ranges.with_observed_max("minmax")
    if not args.quiet:
        print(f"fp8: {args.method} ranges (E4M3's range needs no clipping; --method chooses another)")
    return ranges


def _method_format_warning(ranges: RangeSet, method: str | None, fmt: str) -> list[str]:
    method = ranges.method_name(method)
    made_for = ranges.method_format(method)
    if made_for in ("any", fmt):
        return []
    fits = "mse-fp8 or minmax" if fmt == "fp8" else "mse, entropy or percentile"
    return [f"the {method} ranges were chosen for {made_for}'s grid, not {fmt}'s: {fits} fit {fmt} (quantkit calibrate --method)"]


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, args.model, args.ranges, args.from_cache, args.plan)
    _resolve_format(args)
    speed_batches = _speed_batches(args)
    if args.format == "int4-weights":
        if args.ranges or args.from_cache or args.plan:
            raise QuantkitError("int4-weights quantizes weights only: it takes no --ranges, --from-cache or --plan", option="format")
        return _int4(args)
    if args.smoothquant:
        return _smoothquant(args)
    if not (args.ranges or args.from_cache):
        raise QuantkitError("give --ranges ranges.json (from quantkit calibrate) or --from-cache CACHE", option="ranges")
    model = load_model(args.model)
    warnings: list[str] = []
    if args.from_cache:
        cache = read_trt_cache(args.from_cache)
        if args.trt_version and cache.version != encode_version(args.trt_version):
            warnings.append(f"{args.from_cache} was written for TensorRT {cache.version_string}, not {args.trt_version}")
        ranges = ranges_from_trt_cache(cache, args.from_cache)
        known = {name for node in model.proto.graph.node for name in [*node.input, *node.output]}
        if ranges.tensors and not set(ranges.tensors) & known:
            raise QuantkitError(
                f"none of the {len(ranges.tensors)} tensors in {args.from_cache} is a tensor of {model.path} "
                f"(first: {next(iter(ranges.tensors))!r}): is it the cache of another model?"
            )
        allow_missing = True  # a cache from TensorRT covers what TensorRT calibrated; the rest stays float, with a warning
    else:
        ranges = RangeSet.load(args.ranges)
        allow_missing = args.allow_missing
        ranges = _fp8_default_method(args, ranges)
        warnings += _method_format_warning(ranges, args.method, args.format)
    plan = PrecisionPlan.load(args.plan) if args.plan else None
    options = ExportOptions(
        args.method, args.target, allow_missing, args.weight_bits, filters_from_args(args), args.quantize_attention, args.format
    )
    speed = _measure_speed(args, model, ranges, options, plan, speed_batches) if speed_batches else None
    applied = speed.applied if speed else apply_plan(model, ranges, plan, options, range_aware_fp16=bool(args.ranges))
    quantized, report = applied.model, applied.quantize
    if args.from_cache and report.missing_ranges:
        shown = ", ".join(report.missing_ranges[:5])
        warnings.append(f"{len(report.missing_ranges)} tensor(s) have no entry in the cache; their ops stay in float: {shown}")
    if args.format == "int8" and any(r.startswith("attention core") for r in report.kept_float.values()):
        warnings.append(
            "a transformer: --smoothquant (with --data) moves its activations' outlier channels into the weights "
            "(all-MiniLM-L6-v2, TensorRT INT8: embedding cosine 0.985 without, 0.998 with; reports/bench/encoder.md)"
        )
    if applied.fp16 is not None and not args.quiet:
        print(applied.fp16.summary())
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        raise QuantkitError(f"output directory {out.parent} does not exist")
    verify(args, model, quantized, None if args.from_cache else ranges)
    write_bytes_atomic(out, quantized.SerializeToString())
    if not args.quiet:
        print(report.summary())
        if args.target == "onnxruntime" and args.format == "int8":
            print(optimized_graph_check(quantized).summary())  # what the CPU provider really runs in int8
        if speed is not None:
            print(speed.summary())
        for w in warnings:
            print(f"warning: {w}")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _measure_speed(
    args: argparse.Namespace, model: ModelInfo, ranges: RangeSet, options: ExportOptions, plan: PrecisionPlan | None, sizes: list[int]
) -> SpeedChoice:
    fixed = fixed_batch(model)
    if fixed:
        sizes = [fixed]  # the model's batch dimension is static
    preprocess = preprocess_from_args(args) if args.data else None
    feeds, _ = check_samples(model, args.data, preprocess, ranges, 1)
    say = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr))
    return fastest_placement(model, ranges, options, feeds[0], sizes, plan=plan, progress=say, range_aware_fp16=bool(args.ranges))
