"""quantkit: calibrate FP32 ONNX models and produce what TensorRT and onnxruntime deploy in INT8/FP16."""

__version__ = "0.1.0"

from quantkit.calibration import (
    CalibrationResult,
    CalibrationStats,
    calibrate,
    collect_statistics,
    compute_ranges,
    write_outputs,
)
from quantkit.data import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.histogram import TensorHistogram
from quantkit.methods import (
    EntropyCalibrator,
    MinMaxCalibrator,
    MseCalibrator,
    PercentileCalibrator,
    make_calibrators,
)
from quantkit.model import load_model
from quantkit.ranges import RangeSet, TensorRange
from quantkit.trt_cache import read_trt_cache, write_trt_cache

__all__ = [
    "CalibrationResult",
    "CalibrationStats",
    "EntropyCalibrator",
    "MinMaxCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "PreprocessSpec",
    "QuantkitError",
    "RangeSet",
    "TensorHistogram",
    "TensorRange",
    "__version__",
    "calibrate",
    "collect_statistics",
    "compute_ranges",
    "load_model",
    "make_calibrators",
    "read_trt_cache",
    "write_outputs",
    "write_trt_cache",
]
