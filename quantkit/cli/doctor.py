"""``quantkit doctor``: what is available here (onnxruntime providers, TensorRT, CUDA devices)."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import onnxruntime as ort

from quantkit import __version__
from quantkit.backends.trt import INSTALL_HINT, tensorrt_version


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    return doctor()


def doctor() -> int:
    print(f"quantkit {__version__}")
    print(f"onnxruntime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    version = tensorrt_version()
    print(f"TensorRT: {version}" if version else f"TensorRT: not installed ({INSTALL_HINT})")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            gpus = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            gpus = ""
        print("CUDA devices: " + (gpus.replace("\n", "; ") or "none reported by nvidia-smi"))
    else:
        print("CUDA devices: none (nvidia-smi not found)")
    return 0
