"""Progress on long work (issue 31): sensitivity, tune, fp16's range pass and eval show a bar on a
terminal, and print nothing with -q. Run on a real pseudo-terminal of 120 x 40."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_PREPROCESS


def on_a_terminal(argv: list[str]) -> str:
    """What a command writes to a 120x40 pseudo-terminal (stdout and stderr both)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    done = subprocess.Popen([sys.executable, "-m", "quantkit", *argv], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert done.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def ranges(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress")
    pp = ["--preprocess-config", str(DEMO_PREPROCESS)]
    subprocess.run(
        [sys.executable, "-m", "quantkit", "calibrate", str(DEMO_MODEL), "--data", str(DEMO_CALIB), *pp, "--method", "entropy",
         "--num-samples", "64", "--out-dir", str(out), "-q"],
        check=True,
    )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("command", "bar"),
    [
        ("sensitivity", "sensitivity:"),
        ("tune", "tune:"),
        ("fp16", "calibrating:"),
        ("eval", "eval:"),
    ],
)
def test_long_commands_show_progress_on_a_terminal_and_nothing_with_quiet(ranges, tmp_path, command, bar):
    pp = ["--preprocess-config", str(DEMO_PREPROCESS)]
    data = ["--data", str(DEMO_CALIB), *pp, "--num-samples", "64"]
    argv = {
        "sensitivity": ["sensitivity", str(DEMO_MODEL), "--ranges", str(ranges / "ranges.json"), *data, "--out-dir", str(tmp_path)],
        "tune": ["tune", str(DEMO_MODEL), "--ranges", str(ranges / "ranges.json"), *data, "--max-drop", "0", "--max-trials", "3",
                 "--out-dir", str(tmp_path)],
        "fp16": ["fp16", str(DEMO_MODEL), "--data", str(DEMO_CALIB), *pp, "--num-samples", "64", "-o", str(tmp_path / "h.onnx")],
        "eval": ["eval", str(DEMO_MODEL), *data, "--variants", "fp32,fp16", "--no-latency", "--out-dir", str(tmp_path)],
    }[command]  # fmt: skip
    assert bar in on_a_terminal(argv)
    assert on_a_terminal([*argv, "-q"]).strip() == ""
