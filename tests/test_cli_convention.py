"""One CLI convention for every command (the README's "Command line")."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_PREPROCESS

from quantkit.cli import COMMANDS, build_parser, main

FILE_WRITERS = {"quantize", "fp16", "cache", "optimize", "build"}
FOLDER_WRITERS = {"calibrate", "eval", "sensitivity", "tune", "demo"}


def help_of(command: str) -> str:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.format_help()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_the_common_flags_and_one_output_rule(command):
    text = help_of(command)
    for flag in ("-q, --quiet", "-v, --verbose", "--log-file", "--json", "--threads"):
        assert flag in text, f"{command}: {flag}"
    assert ("-o OUTPUT, --output OUTPUT" in text) == (command in FILE_WRITERS)
    assert ("--out-dir" in text) == (command in FOLDER_WRITERS)
    assert "--report" not in text and "--val " not in text and "--out " not in text  # the old names are gone
    if command in {"calibrate", "eval", "sensitivity", "tune"}:
        assert "--data" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_says_what_it_does(command):
    import argparse

    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    silent = [a.option_strings or a.dest for a in sub._actions if a.help is None and not isinstance(a, argparse._HelpAction)]
    assert silent == []


def calibrate_args(out):
    return ["calibrate", str(DEMO_MODEL), "--data", str(DEMO_CALIB), "--preprocess-config", str(DEMO_PREPROCESS), "--method", "minmax",
            "--num-samples", "32", "--out-dir", str(out)]  # fmt: skip


def test_json_document_lists_what_was_written(tmp_path, capsys):
    assert main([*calibrate_args(tmp_path / "c"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "calibrate" and doc["exit_code"] == 0 and doc["error"] is None
    assert str(tmp_path / "c" / "ranges.json") in doc["outputs"] and doc["result"]["calibration"]["num_samples"] == 32
    assert main(["calibrate", str(tmp_path / "missing.onnx"), "--data", str(DEMO_CALIB), "--out-dir", str(tmp_path), "--json"]) == 2
    out, err = capsys.readouterr()
    failed = json.loads(out)
    assert failed["exit_code"] == 2 and "missing.onnx" in failed["error"] and "missing.onnx" in err


def _boom(args):
    raise RuntimeError("planted bug")


def _interrupt(args):
    raise KeyboardInterrupt


def _os_error(args):
    raise PermissionError(13, "Permission denied", "/root/x")


@pytest.mark.parametrize(
    ("argv", "planted", "code"),
    [
        (["calibrate", "m.onnx", "--bogus"], None, 2),  # argparse: unknown flag (and required flags missing)
        (["quantize", "m.onnx", "--ranges", "r.json"], None, 2),  # argparse: -o missing
        (["no-such-command"], None, 2),
        ([], None, 2),
        (["inspect", str(DEMO_MODEL)], _boom, 1),  # a bug in quantkit
        (["inspect", str(DEMO_MODEL)], _os_error, 2),
        (["inspect", str(DEMO_MODEL)], _interrupt, 130),
    ],
)
def test_json_is_one_document_on_every_exit(argv, planted, code, capsys, monkeypatch):
    """--json prints exactly one parseable document on stdout, whatever ends the command, and
    stderr holds exactly one line."""
    if planted is not None:
        import quantkit.cli.inspect

        monkeypatch.setattr(quantkit.cli.inspect, "run", planted)
    assert main([*argv, "--json"]) == code
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["exit_code"] == code and doc["error"] and doc["outputs"] == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_verbose_and_log_file(tmp_path, capsys):
    log = tmp_path / "run.log"
    assert main([*calibrate_args(tmp_path / "c"), "-v", "--log-file", str(log), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "quantkit: collect statistics:" in err
    text = log.read_text()
    assert "quantkit calibrate:" in text and "collect statistics:" in text and " INFO " in text
    assert main([*calibrate_args(tmp_path / "q"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main([*calibrate_args(tmp_path / "t"), "--threads", "0"]) == 2


def test_old_flag_names_are_unknown_flags_not_abbreviations(tmp_path, capsys):
    """0.1's --out/--report/--val are gone: exit 2, one line, and no prefix match onto --out-dir or --data."""
    args = calibrate_args(tmp_path / "c")
    args[args.index("--out-dir")] = "--out"
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
    args[args.index("--out")] = "--out-d"  # an abbreviation of --out-dir
    assert main([*args, "--quiet"]) == 2 and "unrecognized arguments: --out-d" in capsys.readouterr().err
    assert main(["eval", str(DEMO_MODEL), "--data", str(DEMO_CALIB), "--quiet"]) == 2
    assert "give --out-dir DIR" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error():
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m quantkit doctor | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("quantkit ") and "error" not in done.stderr.lower(), done.stderr


def test_the_cli_reference_is_current():
    """docs/cli.md is generated from the parsers (make docs): a flag added or changed shows here first."""
    from conftest import ROOT

    from quantkit.cli.reference import markdown

    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == markdown(), "docs/cli.md is stale: run make docs"
