"""The CLI's one error boundary: exit codes and one-line messages.

- 0: success;
- 2: bad input or environment (``QuantkitError``, a file the OS cannot read or write);
- 130: interrupted (Ctrl-C), also during start-up;
- 1: a bug in quantkit: a one-line request for a report, the traceback with ``--debug``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from quantkit._io import log, recording_writes
from quantkit.errors import QuantkitError

#: API parameter -> the flag the CLI shows for it (where the names differ beyond - and _)
FLAG_OF = {
    "bins": "--num-bins",
    "methods": "--method",
    "metrics": "--metric",
    "address": "--ray-address",
    "out": "--out-dir",
    "use_ranges": "--no-ranges",
    "samples": "--check-samples",
}


def flag_for(option: str) -> str:
    return FLAG_OF.get(option, "--" + option.replace("_", "-"))


def message(exc: QuantkitError) -> str:
    """The library's message, with the flag of each option it names (the library names fields, not flags)."""
    text = str(exc)
    options = (exc.option,) if isinstance(exc.option, str) else tuple(exc.option or ())
    if options:
        text += f" ({', '.join(flag_for(o) for o in options)})"
    return text


def _print_json(command: str, code: int, written: list, result: Any, text: str, error: str | None = None) -> None:
    """The --json document: what ran, how it ended, the files it wrote, its result, its messages."""
    doc = {
        "command": command,
        "exit_code": code,
        "error": error,
        "outputs": [str(p) for p in written],
        "result": result,
        "messages": [line for line in text.splitlines() if line.strip()],
    }
    print(json.dumps(doc, indent=1, default=str, allow_nan=False))


@contextlib.contextmanager
def _logging(args: Any) -> Iterator[None]:
    """-v: quantkit's log on stderr; --log-file: all of it, with times, in a file; --threads: every session."""
    from quantkit.backends.ort import set_default_threads, set_ort_verbosity

    handlers: list[logging.Handler] = []
    if getattr(args, "verbose", False):
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setLevel(logging.INFO)
        handlers[-1].setFormatter(logging.Formatter("quantkit: %(message)s"))
    if getattr(args, "log_file", None):
        from quantkit._io import check_output_file
        from quantkit.cli.args import read_paths

        # before it is opened: appending log lines to an input (the model, ranges.json) would corrupt it
        check_output_file(args.log_file, *read_paths(args), option="log_file")
        if getattr(args, "output", None) and Path(args.output).resolve() == Path(args.log_file).resolve():
            raise QuantkitError(f"the log file {args.log_file} is the output file; choose another name", option="log_file")
        handlers.append(logging.FileHandler(args.log_file, encoding="utf-8"))
        handlers[-1].setLevel(logging.DEBUG)
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in handlers:
        log.addHandler(h)
    previous = log.level
    if handlers:
        log.setLevel(logging.DEBUG)
        log.debug("quantkit %s: %s", args.command, " ".join(sys.argv[1:]))
    set_default_threads(getattr(args, "threads", None))
    set_ort_verbosity(bool(getattr(args, "verbose", False)))
    try:
        yield
    finally:
        set_default_threads(None)
        set_ort_verbosity(False)
        log.setLevel(previous)
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _failure(exc: BaseException, debug: bool) -> tuple[int, str]:
    """The exit code and the one line (after the command's name) an exception ends a command with."""
    if isinstance(exc, QuantkitError):
        return exc.exit_code, f"error: {message(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted; no output was written"
    if isinstance(exc, OSError):
        where = f" {exc.filename}:" if getattr(exc, "filename", None) else ""
        return 2, f"error:{where} {exc.strerror or exc}; check the path and its permissions"
    if debug:
        traceback.print_exc()
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return 1, (
        f"internal error ({type(exc).__name__}: {first}); this is a bug in quantkit, please report it "
        "with the command line (rerun with --debug for the traceback)"
    )


def _run_command(args: Any, as_json: bool, captured: io.StringIO, written: list) -> int:
    from quantkit.cli import COMMANDS

    module = importlib.import_module(f"quantkit.cli.{COMMANDS[args.command][0]}")
    with _logging(args):
        if not as_json:
            return int(module.run(args) or 0)
        with contextlib.redirect_stdout(captured):
            code = int(module.run(args) or 0)
        _print_json(args.command, code, written, getattr(args, "result", None), captured.getvalue())
        return code


def run_guarded(argv: Sequence[str]) -> int:
    """Parse and run one command. Every way it ends is an exit code and one stderr line, and with
    ``--json`` one document on stdout (argparse's refusals, OS and internal errors, Ctrl-C too),
    listing what was written and printed before it ended."""
    command = "quantkit"
    as_json = "--json" in argv
    debug = "--debug" in argv
    captured = io.StringIO()
    with recording_writes() as written:
        try:
            from quantkit.cli import build_parser

            args = build_parser(argv).parse_args(argv)
            command = f"quantkit {args.command}"
            as_json = bool(getattr(args, "json", False))
            return _run_command(args, as_json, captured, written)
        except BrokenPipeError:  # the reader went away (quantkit doctor | head): nothing is wrong, and nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except SystemExit:  # --help and --version
            raise
        except BaseException as exc:  # noqa: BLE001 - the boundary: every other ending becomes one line
            code, line = _failure(exc, debug)
            prog = getattr(exc, "prog", None) or command
            print(f"{prog}: {line}", file=sys.stderr)
            if as_json:
                error = line.removeprefix("error: ")
                _print_json(prog.removeprefix("quantkit").strip(), code, written, None, captured.getvalue(), error=error)
            return code
