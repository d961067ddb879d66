"""``quantkit doctor``: what is available here (onnxruntime providers, TensorRT, CUDA devices)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from importlib import metadata

import onnxruntime as ort

from quantkit import __version__
from quantkit.backends.trt import INSTALL_HINT, tensorrt_version


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    return doctor()


#: onnxruntime's distributions: each installs the same ``onnxruntime`` package, so two of them overwrite each other
ORT_FLAVOURS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")


def installed_flavours() -> list[str]:
    found = []
    for name in ORT_FLAVOURS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def flavour_problem(found: list[str]) -> str:
    """A one-line diagnosis when several onnxruntime flavours are installed together ("" when fine)."""
    if len(found) < 2:
        return ""
    keep = next((f for f in found if f != "onnxruntime"), found[-1])
    return (
        f"problem: {' and '.join(found)} are installed together; they overwrite each other's files and which one runs "
        f"depends on install order. Keep one: pip uninstall -y {' '.join(found)} && pip install {keep}"
    )


def doctor() -> int:
    print(f"quantkit {__version__}")
    print(f"onnxruntime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    problem = flavour_problem(installed_flavours())
    if problem:
        print(problem)
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
