"""``quantkit sensitivity``: which quantized nodes cost accuracy (enable-one, disable-one, output SQNR)."""

from __future__ import annotations

import argparse

from quantkit import api
from quantkit._io import ensure_writable_dir, write_files_atomic
from quantkit.cli.args import out_dir, scale_out_from_args
from quantkit.cli.tuning_args import add_tuning_arguments, tuning_inputs
from quantkit.errors import QuantkitError
from quantkit.report.tune import sensitivity_files


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_tuning_arguments(p, tune=False)


def run(args: argparse.Namespace) -> int:
    if args.method == "auto":
        raise QuantkitError("--method auto is tune's (it tunes the best method): sensitivity analyses one method; name it", option="method")
    out = ensure_writable_dir(out_dir(args))
    model, ranges, evaluator, export = tuning_inputs(args)
    result = api.analyze(model, ranges, evaluator, export, scale_out=scale_out_from_args(args), quiet=args.quiet)
    files = write_files_atomic(sensitivity_files(out, result))
    if not args.quiet:
        print(result.table())
        print("\n".join(f"wrote {f}" for f in files))
    return 0
