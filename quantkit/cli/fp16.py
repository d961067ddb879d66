"""``quantkit fp16``: a float16 model (weights and compute), float32 inputs and outputs."""

from __future__ import annotations

import argparse

from quantkit.api import fp16
from quantkit.cli.args import add_check_args, check_options_from_args, preprocess_from_args, printing_check
from quantkit.options import DEFAULT_MAX_MEMORY, DataOptions, Fp16Options, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (FP32, or a Q/DQ model whose float parts should become FP16)")
    p.add_argument("--plan", help="precision plan: nodes marked fp32 stay in float32")
    p.add_argument("--ranges", help="ranges.json: nodes whose tensors exceed float16's range stay in float32")
    p.add_argument("--no-ranges", action="store_true", help="convert without knowing any tensor's range (unsafe: overflow goes unnoticed)")
    p.add_argument("--num-samples", type=int, help="with --data: samples of the min/max pass (default: all)")
    p.add_argument(
        "--max-memory",
        type=parse_size,
        default=DEFAULT_MAX_MEMORY,
        help="activation memory the min/max pass may hold, which picks its batch size (default 1G; e.g. 512M)",
    )
    p.add_argument("--keep-op-types", default="", help="comma list of op types to keep in float32, e.g. Softmax,LayerNormalization")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    add_check_args(p)


def run(args: argparse.Namespace) -> int:
    options = Fp16Options(
        ranges=args.ranges,
        use_ranges=not args.no_ranges,
        plan=args.plan,
        num_samples=args.num_samples,
        keep_op_types=tuple(t.strip() for t in args.keep_op_types.split(",") if t.strip()),
        max_memory=args.max_memory,
    )
    data_options = DataOptions(preprocess=preprocess_from_args(args)) if args.data else None
    with printing_check(args):
        check = check_options_from_args(args)
        result = fp16(args.model, args.output, options, data=args.data, data_options=data_options, check=check, quiet=args.quiet)
    if not args.quiet:
        print(result.summary())
    return 0
