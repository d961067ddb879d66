"""``quantkit demo``: the bundled demo end to end (calibrate, quantize, fp16, eval), from the wheel's own files."""

from __future__ import annotations

import argparse
import sys

from quantkit._io import ensure_writable_dir
from quantkit.cli.args import add_out_dir, out_dir
from quantkit.demo import CALIB, MODEL, PREPROCESS, VAL, VARIANTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_out_dir(p, "output folder", default="quantkit-demo")


def steps(out: str) -> list[list[str]]:
    """The demo's commands, each a quantkit command line (what a user would type)."""
    model, pp = str(MODEL), ["--preprocess-config", str(PREPROCESS)]
    ranges = f"{out}/ranges.json"
    return [
        ["calibrate", model, "--data", str(CALIB), *pp, "--method", "all", "--num-samples", "512", "--out-dir", out],
        ["quantize", model, "--ranges", ranges, "--method", "entropy", "--target", "tensorrt", "-o", f"{out}/demo_cnn.int8.tensorrt.onnx"],
        [
            "quantize",
            model,
            "--ranges",
            ranges,
            "--method",
            "entropy",
            "--target",
            "onnxruntime",
            "-o",
            f"{out}/demo_cnn.int8.onnxruntime.onnx",
        ],
        ["fp16", model, "--ranges", ranges, "-o", f"{out}/demo_cnn.fp16.onnx"],
        ["eval", model, "--data", str(VAL), "--ranges", ranges, *pp, "--variants", VARIANTS, "--max-drop", "1.0", "--out-dir", out],
    ]


def run(args: argparse.Namespace) -> int:
    from quantkit.cli import main

    out = str(ensure_writable_dir(out_dir(args)))
    for step in steps(out):
        if not args.quiet:
            print(f"\n$ quantkit {' '.join(step)}", file=sys.stderr)
        code = main([*step, "--quiet"] if args.quiet or args.json else step)
        if code != 0:
            print(f"quantkit demo: the step 'quantkit {step[0]}' failed (exit {code}); nothing after it ran", file=sys.stderr)
            return code
    print(f"demo outputs are in {out}/; open {out}/report.html")
    return 0
