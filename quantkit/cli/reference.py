"""docs/cli.md, generated from the parsers themselves (``make docs``; a test keeps it current)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from quantkit.cli import COMMANDS, build_parser

WIDTH = "100"  # help text wrapped the same on every terminal


def _help(argv: list[str]) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser(argv)
        if not argv:
            return parser.format_help()
        sub = next(a for a in parser._actions if a.dest == "command")
        return sub.choices[argv[0]].format_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def markdown() -> str:
    lines = [
        "# quantkit command-line reference",
        "",
        "Generated from the argparse parsers by `make docs` (`python -m quantkit.cli.reference docs/cli.md`);",
        "`tests/test_cli_convention.py` fails when it is out of date. The guide to what the commands do is",
        "[guide.md](guide.md); every command has the common flags (`-q`, `-v`, `--log-file`, `--json`, `--threads`).",
        "",
        "```",
        _help([]).rstrip(),
        "```",
    ]
    for name in COMMANDS:
        lines += ["", f"## quantkit {name}", "", "```", _help([name]).rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(markdown(), encoding="utf-8")
