"""One function per stage, doing exactly what its command does (the CLI parses, calls one, prints).

- ``calibrate``, ``analyze``, ``tune``: the stages with scale-out on Ray chosen by a ``ScaleOut``;
- ``quantize``: ranges or cache -> format defaults -> SmoothQuant -> placement -> fidelity check -> atomic write;
- ``fp16``: the range-safe float16 model, checked and written the same way;
- ``build``: a TensorRT engine, or an optimized onnxruntime model, with the trtexec lines of both TensorRT lines;
- ``evaluate`` (``quantkit.evaluation.run``) is already one function.

This package sits at the top of the flow, beside the CLI.
"""

from quantkit.api.build import BuildReport, EngineNotBuilt, build
from quantkit.api.fp16 import Fp16Result, fp16
from quantkit.api.quantize import QuantizeResult, quantize
from quantkit.api.scaled import analyze, calibrate, tune

__all__ = ["BuildReport", "EngineNotBuilt", "Fp16Result", "QuantizeResult", "analyze", "build", "calibrate", "fp16", "quantize", "tune"]
