"""``quantkit calibrate``: collect activation ranges and write ranges.json + TensorRT caches."""

from __future__ import annotations

import argparse

from quantkit.calibration import calibrate, summary_table
from quantkit.data.preprocess import PreprocessSpec
from quantkit.methods import METHOD_NAMES
from quantkit.trt_cache import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION

PREPROCESS_FLAGS = ("resize", "center_crop", "scale", "mean", "std", "color", "layout", "dtype")


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image preprocessing (flags override --preprocess-config)")
    group.add_argument("--preprocess-config", metavar="FILE", help="JSON or YAML file with the keys below")
    group.add_argument("--resize", help="N (shorter side) or HxW")
    group.add_argument("--center-crop", dest="center_crop", help="N or HxW")
    group.add_argument("--scale", type=float, help="multiply pixel values by this (default 1/255)")
    group.add_argument("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")
    group.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    group.add_argument("--color", choices=["RGB", "BGR", "L"], type=str.upper, help="channel order (default: from the model's channels)")
    group.add_argument("--layout", choices=["NCHW", "NHWC"], type=str.upper, help="default: from the model input's shape")
    group.add_argument("--dtype", help="input dtype (default: the model input's)")


def preprocess_from_args(args: argparse.Namespace) -> PreprocessSpec:
    base = PreprocessSpec.load(args.preprocess_config) if args.preprocess_config else PreprocessSpec()
    return base.merged({k: getattr(args, k) for k in PREPROCESS_FLAGS})


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray (pip install quantkit[distributed])")
    group.add_argument("--workers", type=int, help="run on N Ray workers (results identical to a single process)")
    group.add_argument("--ray-address", help="join this Ray cluster (default: start a local instance)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker reserves")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="collect activation ranges (entropy, minmax, percentile, mse) and write ranges.json + TensorRT caches",
        description="Run MODEL over calibration data and write ranges.json and <model>.<method>.cache into --out.",
    )
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--data", required=True, help="image folder, .parquet/.arrow/.csv/.jsonl table, or .npy/.npz arrays (file or folder)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default="entropy", help=f"{', '.join(METHOD_NAMES)}, a comma list, or all (default: entropy)")
    p.add_argument("--num-samples", type=int, help="stop after N samples (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
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
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_distributed_args(p)
    add_preprocess_args(p)


def run(args: argparse.Namespace) -> int:
    result = calibrate(
        args.model,
        args.data,
        methods=args.method,
        out=args.out,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        preprocess=preprocess_from_args(args),
        input_name=args.input_name,
        shuffle=args.shuffle,
        seed=args.seed,
        percentile=args.percentile,
        bins=args.num_bins,
        all_tensors=args.all_tensors,
        trt_version=args.trt_version,
        cache_algorithm=args.cache_algorithm,
        threads=args.threads,
        quiet=args.quiet,
        workers=args.workers,
        ray_address=args.ray_address,
        gpus_per_worker=args.gpus_per_worker,
    )
    if not args.quiet:
        print(summary_table(result))
    return 0
