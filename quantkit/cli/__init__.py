"""``quantkit`` command line: a thin layer over the Python API, one module per subcommand.

Only the chosen subcommand's module is imported, so ``quantkit --version`` and ``--help`` stay
fast. Every command parses its flags into the API's options objects (``cli.args``), makes one
API call and prints the result. Errors pass through one boundary (``main``): exit 2 with one line
for bad input, 130 for Ctrl-C, and a short bug-report line (the traceback with ``--debug``)
for anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from quantkit import __version__
from quantkit.errors import QuantkitError

#: subcommand -> (module, one-line help)
COMMANDS = {
    "calibrate": ("calibrate", "collect activation ranges (entropy, minmax, percentile, mse) and write ranges.json + TensorRT caches"),
    "quantize": ("quantize", "write an explicitly quantized (Q/DQ) ONNX model from ranges or a TensorRT cache"),
    "fp16": ("fp16", "convert a model to float16 (strongly typed, float32 I/O)"),
    "cache": ("cache", "write a TensorRT (<= 10) calibration cache from ranges.json or a Q/DQ model"),
    "optimize": ("optimize", "fold BN, fuse Conv+activation (CBR), merge sibling convs, fold Concats; write the optimized model"),
    "inspect": ("inspect", "layer counts before and after each optimization step, and the fusions found (writes nothing)"),
    "eval": ("evaluate", "evaluate FP32/FP16/INT8 variants against FP32 and write report.json/.md/.html"),
    "sensitivity": ("sensitivity", "rank quantized nodes by the accuracy they cost (enable-one, disable-one, output SQNR)"),
    "tune": ("tune", "find the fewest nodes to keep in FP16/FP32 so that INT8 meets an accuracy target; writes a precision plan"),
    "build": ("build", "build a TensorRT engine (10.x/11.x) or an optimized onnxruntime model"),
    "doctor": ("doctor", "what is available here: onnxruntime providers, TensorRT, CUDA devices"),
    "demo": ("demo", "run the bundled demo end to end (calibrate, quantize, fp16, eval) into --out-dir"),
}


def _command_in(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


class UsageError(QuantkitError):
    """A command line argparse refuses: reported by the one error boundary (one line, exit 2, --json)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised to the error boundary instead of printed here."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)

    def _get_value(self, action: argparse.Action, arg_string: str):  # type: ignore[no-untyped-def]
        """A flag's type function may raise QuantkitError (parse_size does): argparse then names the flag."""
        try:
            return super()._get_value(action, arg_string)
        except QuantkitError as exc:
            raise argparse.ArgumentError(action, str(exc)) from None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its arguments (``quantkit --help`` lists the table)."""
    parser = Parser(prog="quantkit", description="Calibrate and quantize ONNX models for TensorRT and onnxruntime.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _command_in(argv)
    for name, (module, helptext) in COMMANDS.items():
        # no prefix matching: an old flag (--out) must not pass as an abbreviation of a new one (--out-dir)
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".", allow_abbrev=False)
        if chosen == name:
            importlib.import_module(f"quantkit.cli.{module}").add_arguments(p)
            from quantkit.cli.args import add_common_args

            add_common_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from quantkit.cli.errors import run_guarded

    try:
        return run_guarded(argv)
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being reported: still 130, not death by SIGINT
        return 130


if __name__ == "__main__":
    sys.exit(main())
