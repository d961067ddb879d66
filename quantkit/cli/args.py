"""Argument groups shared by the subcommands, and the options objects they build."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

from quantkit.data.preprocess import PreprocessSpec
from quantkit.options import DataOptions, ScaleOut

T = TypeVar("T")

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
        "batch_size": getattr(args, "batch_size", 32),
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
