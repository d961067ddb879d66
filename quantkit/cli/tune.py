"""``quantkit tune``: the fewest nodes to keep in FP16/FP32 so that INT8 meets an accuracy target."""

from __future__ import annotations

import argparse
import sys

from quantkit import api
from quantkit._io import ensure_writable_dir, write_files_atomic
from quantkit.cli.args import options_from_args, out_dir, scale_out_from_args
from quantkit.cli.tuning_args import add_tuning_arguments, tuning_inputs
from quantkit.evaluation.check import FidelityError
from quantkit.options import TuneOptions
from quantkit.report.tune import sensitivity_files, tune_files
from quantkit.tuning.search import summary

#: exit code of a tuning run whose best plan misses the accuracy target
TARGET_MISSED = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_tuning_arguments(p, tune=True)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(TuneOptions, args, choose_method=args.method == "auto")
    out = ensure_writable_dir(out_dir(args))
    model, ranges, evaluator, export = tuning_inputs(args)
    tuned = api.tune(model, ranges, evaluator, out, options, export=export, scale_out=scale_out_from_args(args), quiet=args.quiet)
    files = dict(tune_files(out, tuned, evaluator))
    if tuned.sensitivity is not None:
        files.update(sensitivity_files(out, tuned.sensitivity))
    written = write_files_atomic(files)
    if not args.quiet:
        print(summary(tuned, evaluator))
        print("\n".join(f"wrote {f}" for f in [*tuned.files, *written]))
    if tuned.broken:
        raise FidelityError("the best model found is broken, so no tuned model was written: " + "; ".join(tuned.broken[:3]))
    if not tuned.target_met:
        print(f"quantkit tune: the target ({options.max_drop} points) was not met; the best plan is written as such", file=sys.stderr)
        return TARGET_MISSED
    return 0
