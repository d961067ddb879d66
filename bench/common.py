"""What the benchmarks share: the repository root, the real models of the rapidocr wheel, the CPU's int8 flags."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT_DIR = ROOT / "reports" / "bench"


def models_dir() -> Path:
    """The models folder of the rapidocr-onnxruntime wheel, found without importing the package (its __init__ needs OpenCV)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4 (make bench does)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def ocr_cls_model() -> Path:
    """PaddleOCR's text-line direction classifier."""
    return models_dir() / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def cpu_int8_flags() -> str:
    """Which int8 instruction sets this CPU has (speed ratios are comparable only within one run on one CPU)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)
