"""The CLI's one error boundary: exit codes and one-line messages.

- 0: success;
- 2: bad input or environment (``QuantkitError``, a file the OS cannot read or write);
- 130: interrupted (Ctrl-C), also during start-up;
- 1: a bug in quantkit: a one-line request for a report, the traceback with ``--debug``.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Sequence

from quantkit.errors import QuantkitError

#: API parameter -> the flag the CLI shows for it (where the names differ beyond - and _)
FLAG_OF = {"bins": "--num-bins", "methods": "--method", "address": "--ray-address"}


def flag_for(option: str) -> str:
    return FLAG_OF.get(option, "--" + option.replace("_", "-"))


def message(exc: QuantkitError) -> str:
    text = str(exc)
    if exc.option:
        text += f" ({flag_for(exc.option)})"
    return text


def run_guarded(argv: Sequence[str]) -> int:
    command = "quantkit"
    debug = "--debug" in argv
    try:
        from quantkit.cli import COMMANDS, build_parser

        args = build_parser(argv).parse_args(argv)
        command = f"quantkit {args.command}"
        module = importlib.import_module(f"quantkit.cli.{COMMANDS[args.command][0]}")
        return int(module.run(args) or 0)
    except QuantkitError as exc:
        print(f"{command}: error: {message(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{command}: error:{where} {exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return 2
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: anything else is a bug in quantkit
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(
            f"{command}: internal error ({type(exc).__name__}: {first}); this is a bug in quantkit, please report it "
            "with the command line (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
