"""AMD Quark's ONNX PTQ in TensorRT's format, as its user would run it: the A8W8 preset (symmetric
int8 activations and weights, MinMax), per-channel weights, its CLE on (the preset's default), and
with ``adaround N`` its AdaRound fast fine-tuning at N iterations (the preset's 1000 ran over 600 s
on a small CNN, ../shared/README.md).

Usage: python quark_ptq.py MODEL CALIB.npz OUT.onnx cle|adaround [ITERATIONS]
"""

import sys

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from quark.onnx import ModelQuantizer
from quark.onnx.quantization.config.config import Config
from quark.onnx.quantization.config.legacy import QuantizationConfig

from bench.peers.common import at_least_opset_13, peak_rss, samples

model_path, calib, out, algorithm = sys.argv[1:5]
items = samples(calib)


class Reader(CalibrationDataReader):
    def __init__(self) -> None:
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(items)


extra = {"ActivationSymmetric": True, "ForceQuantizeNoInputCheck": True}
if algorithm == "adaround":
    extra["FastFinetune"] = {
        "DataSize": len(items), "FixedSeed": 1705472343, "BatchSize": 2, "NumIterations": int(sys.argv[5]),
        "LearningRate": 0.1, "OptimAlgorithm": "adaround", "OptimDevice": "cpu", "InferDevice": "cpu", "EarlyStop": True,
    }  # fmt: skip
config = QuantizationConfig(
    calibrate_method=CalibrationMethod.MinMax,
    quant_format=QuantFormat.QDQ,
    activation_type=QuantType.QInt8,
    weight_type=QuantType.QInt8,
    per_channel=True,
    include_cle=True,
    include_fast_ft=algorithm == "adaround",
    extra_options=extra,
)
ModelQuantizer(Config(global_quant_config=config)).quantize_model(at_least_opset_13(onnx.load(model_path)), out, Reader())
peak_rss()
