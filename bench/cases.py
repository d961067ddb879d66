"""The two models the tuning and distributed benchmarks run on, with their data."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT
from quantkit.data import PreprocessSpec


@contextmanager
def benchmark_cases() -> Iterator[list[tuple[str, Path, Path, Path, PreprocessSpec]]]:
    """(name, model, calibration data, validation data, preprocessing) for the demo CNN and the
    PP-OCR classifier, whose rendered text-line data lives in a temporary folder for the duration."""
    from bench import ppocr_cls_report as ppocr

    demo = (
        "demo_cnn",
        ROOT / "calib_data" / "demo_cnn.onnx",
        ROOT / "calib_data" / "mnist" / "calib",
        ROOT / "calib_data" / "mnist" / "val.parquet",
        PreprocessSpec.load(ROOT / "calib_data" / "mnist" / "preprocess.json"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        calib, val = ppocr.build_dataset(Path(tmp))
        yield [demo, ("ppocr_cls", ppocr.model_path(), calib, val, PreprocessSpec(**ppocr.PREPROCESS))]


@contextmanager
def detector_case() -> Iterator[tuple[str, Path, Path, Path, PreprocessSpec]]:
    """PP-OCRv4's text detector (rapidocr-onnxruntime wheel) on the scikit-image wheel's images."""
    from bench.common import models_dir
    from bench.trust import DET_PREPROCESS, skimage_images

    with tempfile.TemporaryDirectory() as tmp:
        calib, val = skimage_images(Path(tmp))
        yield ("ppocr_det", models_dir() / "ch_PP-OCRv4_det_infer.onnx", calib, val, PreprocessSpec.from_mapping(DET_PREPROCESS))
