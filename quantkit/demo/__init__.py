"""The bundled demo: a small MNIST CNN with calibration and validation images, shipped in the wheel.

``quantkit demo`` runs calibrate -> quantize (TensorRT and onnxruntime placements) -> fp16 ->
eval on these files, from an installed wheel, anywhere.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL = DEMO_DIR / "demo_cnn.onnx"
CALIB = DEMO_DIR / "calib.parquet"  # 600 training images, 60 per digit
VAL = DEMO_DIR / "val.parquet"  # 1,000 held-out images with labels
PREPROCESS = DEMO_DIR / "preprocess.json"
VARIANTS = "fp32,fp16,int8:entropy,int8:minmax,int8:percentile,int8:mse,int8-tensorrt:entropy,int8-mixed:entropy"
