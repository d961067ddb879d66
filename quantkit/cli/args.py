"""Argument groups shared by the subcommands, and the options objects they build."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, TypeVar

import onnx

from quantkit.data.preprocess import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import FidelityError
from quantkit.evaluation.check import verify as check_model
from quantkit.model import ModelInfo
from quantkit.options import CHECK_SAMPLES, MIN_SQNR_DB, CheckOptions, DataOptions, ScaleOut
from quantkit.plan import NodeFilter
from quantkit.ranges import RangeSet

T = TypeVar("T")

PREPROCESS_FLAGS = ("resize", "center_crop", "scale", "mean", "std", "color", "layout", "dtype", "letterbox")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command has (the one CLI convention; see the README's "Command line")."""
    group = parser.add_argument_group("every command")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress, no summary)")
    group.add_argument("-v", "--verbose", action="store_true", help="log each step and its time on stderr")
    group.add_argument("--log-file", help="also write the full log (debug level, with times) to this file")
    group.add_argument("--json", action="store_true", help="print one machine-readable JSON document on stdout instead of the summary")
    group.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default: all cores)")


#: the flags whose value is a file or folder the command reads (an output or log file must be none of them)
INPUT_FLAGS = (
    "model", "ranges", "data", "calib", "plan", "preprocess_config", "from_ranges", "from_qdq", "from_cache", "cache", "timing_cache",
)  # fmt: skip


def read_paths(args: argparse.Namespace) -> list[str]:
    """Every path the command reads: its input flags, and the files named in eval's NAME=file variants."""
    paths = [v for v in (getattr(args, f, None) for f in INPUT_FLAGS) if isinstance(v, str)]
    variants = getattr(args, "variants", None)
    if isinstance(variants, str):
        paths += [v.split("=", 1)[1] for v in variants.split(",") if "=" in v]
    return paths


def add_class_names_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--class-names",
        help="comma list of the model's classes in its output order, naming the label folders of an image folder "
        "(default: the model's metadata; else folder names that are integers are the class indices; else alphabetical, "
        "printed and in report.json)",
    )


def add_out_dir(parser: argparse.ArgumentParser, help: str, *, default: str | None = None) -> None:
    """``--out-dir`` for a command that writes a folder (``-o/--output`` is for one file)."""
    parser.add_argument("--out-dir", default=default, help=help + ("" if default is None else f" (default {default})"))


def out_dir(args: argparse.Namespace) -> str:
    """The output folder, which every folder-writing command needs (``--out-dir``)."""
    if not args.out_dir:
        raise QuantkitError("the output folder is missing: give --out-dir DIR")
    return str(args.out_dir)


def add_data_arg(parser: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """``--data`` for the inputs of every command (required checked in ``data_path``)."""
    parser.add_argument("--data", help=help)
    parser.set_defaults(data_required=required)


def data_path(args: argparse.Namespace) -> str:
    if not args.data:
        raise QuantkitError("the input data is missing: give --data (a folder, a table, arrays, a saved dataset or hf:NAME)")
    return str(args.data)


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
    group.add_argument(
        "--letterbox", action="store_true", default=None, help="with --resize HxW: keep the aspect ratio and pad (detectors)"
    )


def preprocess_from_args(args: argparse.Namespace) -> PreprocessSpec:
    """--preprocess-config, else the preprocessing ranges.json recorded (--ranges), with the flags on top."""
    if args.preprocess_config:
        base = PreprocessSpec.load(args.preprocess_config)
    elif getattr(args, "ranges", None):
        recorded = RangeSet.load(args.ranges).calibration.get("preprocess")
        base = PreprocessSpec.from_mapping(recorded, f"the preprocessing recorded in {args.ranges}") if recorded else PreprocessSpec()
    else:
        base = PreprocessSpec()
    return base.merged({k: getattr(args, k) for k in PREPROCESS_FLAGS})


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    """Which nodes may be quantized (a --plan's own entries win where both speak)."""
    group = parser.add_argument_group("which nodes are quantized (a --plan's entries win over these)")
    group.add_argument("--op-types", help="comma list: quantize only these op types, e.g. Conv,Gemm")
    group.add_argument("--exclude-op-types", help="comma list of op types to keep in float, e.g. MatMul")
    group.add_argument("--nodes", action="append", help="regular expression over ONNX node names: quantize only matches (repeatable)")
    group.add_argument("--exclude-nodes", action="append", help="regular expression over ONNX node names to keep in float (repeatable)")
    group.add_argument(
        "--quantize-attention",
        action="store_true",
        help="TensorRT placement: also quantize the attention core (Q.K^T and attention.V MatMuls), kept float by default",
    )


def filters_from_args(args: argparse.Namespace) -> NodeFilter | None:
    def items(text: str | None) -> tuple[str, ...]:
        return tuple(t.strip() for t in (text or "").split(",") if t.strip())

    found = NodeFilter(items(args.op_types), items(args.exclude_op_types), tuple(args.nodes or ()), tuple(args.exclude_nodes or ()))
    return None if found.empty else found


def add_objective_args(parser: argparse.ArgumentParser, several: bool) -> None:
    """--metric and the parameters of the detection and map objectives (eval, sensitivity, tune)."""
    from quantkit.evaluation.objectives import BUILT_IN

    parser.add_argument(
        "--metric",
        default="auto",
        help=f"{'comma list of ' if several else ''}{', '.join(BUILT_IN)}, or your module:function / file.py:function "
        "(called with outputs, FP32 outputs, labels). Default auto: chosen from the outputs' shapes and the labels, "
        "and printed with the reason",
    )
    parser.add_argument("--conf", type=finite_float, default=0.25, help="detection-f1: class-score threshold (default 0.25)")
    parser.add_argument(
        "--mask-threshold", type=finite_float, default=0.5, help="mask-iou: probability above which a pixel is in the mask (default 0.5)"
    )


def add_scale_out_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray (the [distributed] extra)")
    group.add_argument("--workers", type=int, help="run on N Ray workers (results identical to a single process)")
    group.add_argument("--ray-address", help="join this Ray cluster (default: start a local instance)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker reserves")


def scale_out_from_args(args: argparse.Namespace) -> ScaleOut:
    return ScaleOut(args.workers, args.ray_address, args.gpus_per_worker)


def data_options_from_args(args: argparse.Namespace, **overrides: object) -> DataOptions:
    """DataOptions from the flags a command has (those it lacks keep their defaults)."""
    values = {
        "preprocess": preprocess_from_args(args) if hasattr(args, "preprocess_config") else None,
        "input_name": getattr(args, "input_name", None),
        "shuffle": getattr(args, "shuffle", True),
        "seed": getattr(args, "seed", 0),
        "num_samples": getattr(args, "num_samples", None),
        "batch_size": getattr(args, "batch_size", None),
        "class_names": tuple(n.strip() for n in args.class_names.split(",")) if getattr(args, "class_names", None) else None,
    }
    values.update(overrides)
    return DataOptions(**values)  # type: ignore[arg-type]


def options_from_args(cls: type[T], args: argparse.Namespace, flags: dict[str, str] | None = None, **values: Any) -> T:
    """An options object from the parsed flags: each field from the flag of its name (or ``flags[field]``).

    Fields without a flag keep their defaults; ``values`` override both.
    """
    flags = flags or {}
    taken = {}
    for f in fields(cls):  # type: ignore[arg-type]
        dest = flags.get(f.name, f.name)
        if f.name in values:
            taken[f.name] = values[f.name]
        elif hasattr(args, dest):
            taken[f.name] = getattr(args, dest)
    return cls(**taken)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a QuantkitError reaches the CLI's one-line boundary)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise QuantkitError(f"expected a whole number of at least 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN would switch a threshold off)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise QuantkitError(f"expected a finite number, got {text!r}")
    return value


def add_check_args(parser: argparse.ArgumentParser) -> None:
    """The fidelity check's flags, with --data and preprocessing for its samples."""
    group = parser.add_argument_group("fidelity check (the new model against FP32 before it is written)")
    group.add_argument("--data", help="samples for the check (default: the calibration data recorded in ranges.json)")
    add_preprocess_args(parser)
    group.add_argument("--force", action="store_true", help="write the model even when an output is non-finite or collapsed")
    group.add_argument(
        "--min-sqnr", type=finite_float, default=MIN_SQNR_DB, help=f"an output below this SQNR has collapsed (default {MIN_SQNR_DB:g} dB)"
    )
    group.add_argument(
        "--check-samples", type=positive_int, default=CHECK_SAMPLES, help=f"samples the check runs (default {CHECK_SAMPLES})"
    )


def check_options_from_args(args: argparse.Namespace) -> CheckOptions:
    return CheckOptions(force=args.force, min_sqnr=args.min_sqnr, samples=args.check_samples)


@contextlib.contextmanager
def printing_check(args: argparse.Namespace) -> Iterator[None]:
    """When the fidelity check refuses a model, its verdict goes to stdout (the error line follows on stderr)."""
    try:
        yield
    except FidelityError as exc:
        if exc.check is not None and not args.quiet:
            print(exc.check.summary())
        raise


def check_and_print(args: argparse.Namespace, model: ModelInfo, candidate: onnx.ModelProto, ranges: RangeSet | None = None) -> None:
    """The library's fidelity check (``quantkit.evaluation.check.verify``) from the flags, printed."""
    preprocess = preprocess_from_args(args) if getattr(args, "data", None) else None
    with printing_check(args):
        result = check_model(model, candidate, check_options_from_args(args), data=args.data, preprocess=preprocess, ranges=ranges)
    if not args.quiet:
        print(result.summary())
    if not result.ok:
        print(f"warning: writing a broken model (--force): {result.failure()}", file=sys.stderr)
