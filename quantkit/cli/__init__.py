"""``quantkit`` command line: a thin layer over the Python API (one module per subcommand)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quantkit import __version__
from quantkit.cli import build as build_cmd
from quantkit.cli import cache as cache_cmd
from quantkit.cli import calibrate as calibrate_cmd
from quantkit.cli import evaluate as evaluate_cmd
from quantkit.cli import fp16 as fp16_cmd
from quantkit.cli import optimize as optimize_cmd
from quantkit.cli import quantize as quantize_cmd
from quantkit.cli import tune as tune_cmd
from quantkit.errors import QuantkitError

SUBCOMMANDS = {
    "calibrate": calibrate_cmd,
    "quantize": quantize_cmd,
    "fp16": fp16_cmd,
    "cache": cache_cmd,
    "optimize": optimize_cmd,
    "inspect": optimize_cmd,
    "eval": evaluate_cmd,
    "sensitivity": tune_cmd,
    "tune": tune_cmd,
    "build": build_cmd,
    "doctor": build_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description="Calibrate and quantize ONNX models for TensorRT and onnxruntime.")
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(SUBCOMMANDS.values()):  # a module may add several subcommands
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(SUBCOMMANDS[args.command].run(args) or 0)
    except QuantkitError as exc:
        print(f"quantkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quantkit {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
