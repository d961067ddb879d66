"""Flags shared by ``quantkit sensitivity`` and ``quantkit tune``, and the inputs both start from."""

from __future__ import annotations

import argparse

from quantkit.cli.args import (
    add_class_names_arg,
    add_data_arg,
    add_objective_args,
    add_out_dir,
    add_preprocess_args,
    add_scale_out_args,
    data_options_from_args,
    data_path,
)
from quantkit.model import ModelInfo
from quantkit.options import TARGETS, ExportOptions
from quantkit.ranges import RangeSet
from quantkit.tuning.sensitivity import Evaluator, prepare


def add_tuning_arguments(p: argparse.ArgumentParser, tune: bool) -> None:
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("--calib", help="calibration data (or --ranges)")
    p.add_argument("--ranges", help="ranges.json from quantkit calibrate")
    add_data_arg(p, "validation data; labels (a label column, npz key or folder names) give the task metric")
    p.add_argument(
        "--method",
        default="auto" if tune else "entropy",
        help="calibration method whose ranges are used"
        + (
            "; default auto: every method is calibrated in one pass (or read from --ranges) and the one whose all-INT8 model "
            "scores best is tuned"
            if tune
            else " (default entropy)"
        ),
    )
    p.add_argument("--target", choices=TARGETS, default="tensorrt", help="Q/DQ placement (default tensorrt)")
    add_objective_args(p, several=False)
    p.add_argument("--no-labels", action="store_true", help="ignore the labels: compare with FP32 only")
    add_class_names_arg(p)
    p.add_argument("--num-samples", type=int, help="validation samples (default: all)")
    p.add_argument("--num-calib-samples", type=int, help="calibration samples (default: all)")
    p.add_argument("--batch-size", type=int, help="validation batch (default: the fixed batch, else up to 32 that fit 1 GiB)")
    add_out_dir(p, "output folder")
    if tune:
        p.add_argument(
            "--max-drop",
            type=float,
            default=0.5,
            help="how much of the objective the tuned model may lose: points, dB for sqnr (default 0.5)",
        )
        p.add_argument("--fallback", choices=["fp16", "fp32"], default="fp32", help="precision of the nodes taken out of INT8")
        p.add_argument("--max-trials", type=int, help="stop after N trials (the best plan so far is saved)")
        p.add_argument("--timeout", type=float, help="stop after S seconds (the best plan so far is saved)")
        p.add_argument(
            "--ranking",
            choices=["disable-one", "sqnr"],
            default="disable-one",
            help="rank nodes by evaluating each kept in FP32 (disable-one, default), or by the SQNR each loses (sqnr: two passes)",
        )
        p.add_argument(
            "--start-from-known", action="store_true", help="start with Softmax/LayerNorm and the first/last layers in high precision"
        )
    add_scale_out_args(p)
    add_preprocess_args(p)


def tuning_inputs(args: argparse.Namespace) -> tuple[ModelInfo, RangeSet, Evaluator, ExportOptions]:
    auto = args.method == "auto"
    model, ranges, evaluator = prepare(
        args.model,
        data_path(args),
        calib=args.calib,
        ranges_path=args.ranges,
        method="all" if auto else args.method,
        data_options=data_options_from_args(args, shuffle=False),
        num_calib_samples=args.num_calib_samples,
        metric=args.metric,
        use_labels=not args.no_labels,
        conf=args.conf,
        mask_threshold=args.mask_threshold,
    )
    method = None if auto else args.method if args.method in ranges.methods else None
    return model, ranges, evaluator, ExportOptions(method, args.target, allow_missing=True)
