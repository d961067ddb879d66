"""``quantkit doctor``: what is available here (onnxruntime providers, TensorRT, CUDA devices)."""

from __future__ import annotations

import argparse
import re
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


def tensorrt_cuda_builds() -> list[int]:
    """CUDA majors of the TensorRT wheels installed (tensorrt-cu12, tensorrt-cu13 and their -libs)."""
    majors = set()
    for major in (11, 12, 13):
        for name in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs", f"tensorrt_cu{major}_libs"):
            try:
                metadata.version(name)
                majors.add(major)
            except metadata.PackageNotFoundError:
                pass
    return sorted(majors)


def driver_cuda(smi_header: str) -> tuple[int, int] | None:
    """The CUDA version the driver supports, from nvidia-smi's header ("CUDA Version: 12.4")."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_header)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_problem(trt_builds: list[int], driver: tuple[int, int] | None) -> str:
    """A one-line diagnosis of TensorRT wheels that this driver cannot run ("" when fine or unknown)."""
    if len(trt_builds) > 1:
        names = " ".join(f"tensorrt-cu{m} tensorrt-cu{m}-libs" for m in trt_builds)
        return f"problem: TensorRT is installed for CUDA {' and '.join(map(str, trt_builds))} together; keep one: pip uninstall -y {names}"
    if trt_builds and driver is not None and driver[0] < trt_builds[0]:
        major = trt_builds[0]
        return (
            f"problem: TensorRT is built for CUDA {major} but the driver supports CUDA {driver[0]}.{driver[1]}: engines fail to build; "
            f"pip uninstall -y tensorrt-cu{major} tensorrt-cu{major}-libs && pip install tensorrt-cu{driver[0]}, or update the driver"
        )
    return ""


def doctor() -> int:
    print(f"quantkit {__version__}")
    print(f"onnxruntime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    problems = [flavour_problem(installed_flavours())]
    version = tensorrt_version()
    print(f"TensorRT: {version}" if version else f"TensorRT: not installed ({INSTALL_HINT})")
    smi = shutil.which("nvidia-smi")
    driver = None
    if smi:
        try:
            gpus = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
            driver = driver_cuda(subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.TimeoutExpired):
            gpus = ""
        print("CUDA devices: " + (gpus.replace("\n", "; ") or "none reported by nvidia-smi"))
        if driver:
            print(f"CUDA driver: supports CUDA {driver[0]}.{driver[1]}")
    else:
        print("CUDA devices: none (nvidia-smi not found)")
    problems.append(cuda_problem(tensorrt_cuda_builds(), driver))
    for problem in filter(None, problems):
        print(problem)
    return 0
