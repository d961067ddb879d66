"""``quantkit inspect``: layer counts before and after each optimization step (writes nothing)."""

from __future__ import annotations

import argparse
import json

from quantkit.cli.optimize import add_common, passes_from_args
from quantkit.graph.optimize import optimize_model
from quantkit.model import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    _, report = optimize_model(load_model(args.model), passes_from_args(args))
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
    return 0
