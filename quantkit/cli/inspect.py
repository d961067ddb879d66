"""``quantkit inspect``: layer counts before and after each optimization step (writes nothing)."""

from __future__ import annotations

import argparse

from quantkit.cli.optimize import add_common, passes_from_args
from quantkit.graph.optimize import optimize_model
from quantkit.model import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)


def run(args: argparse.Namespace) -> int:
    _, report = optimize_model(load_model(args.model), passes_from_args(args))
    args.result = report.to_json()
    if not args.quiet:
        print(report.summary())
    return 0
