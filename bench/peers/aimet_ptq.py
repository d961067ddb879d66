"""aimet-onnx's PTQ in TensorRT's format: its batch-norm folding and cross-layer equalization
(``equalize_model``), then a QuantizationSimModel with symmetric int8 activations and symmetric
per-channel int8 weights (its default config is asymmetric uint8, per-tensor), the tf_enhanced
(SQNR-based) ranges, exported as Q/DQ with signed activations.

Its export fails on dynamic input sizes (../shared/README.md): the sizes are fixed to the data's
for AIMET, and the written model gets the original's inputs and outputs back (the Q/DQ graph does
not depend on them).

Usage: python aimet_ptq.py MODEL CALIB.npz OUT.onnx
"""

import json
import sys
import tempfile

import onnx
from aimet_onnx.cross_layer_equalization import equalize_model
from aimet_onnx.quantsim import QuantizationSimModel

from bench.peers.common import at_least_opset_13, peak_rss, samples

model_path, calib, out = sys.argv[1:4]
items = samples(calib)
model = at_least_opset_13(onnx.load(model_path))
io = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in [*model.graph.input, *model.graph.output]]
for value in model.graph.input:
    if value.name in items[0]:
        for dim, size in zip(value.type.tensor_type.shape.dim, items[0][value.name].shape, strict=True):
            dim.Clear()
            dim.dim_value = size
del model.graph.value_info[:]
config = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False", "unsigned_symmetric": "False", "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}}, "op_type": {}, "supergroups": [],
    "model_input": {"is_input_quantized": "True"}, "model_output": {},
}  # fmt: skip
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(config, f)
equalize_model(model)  # folds BatchNorm, then equalizes (in place)
sim = QuantizationSimModel(
    model, param_type="int8", activation_type="int8", quant_scheme="tf_enhanced", config_file=f.name,
    dummy_input=items[0], providers=["CPUExecutionProvider"],
)  # fmt: skip
sim.compute_encodings(items)
qdq = sim.to_onnx_qdq(force_activation_as="signed")
original = {v.name: v for v in io}
for value in [*qdq.graph.input, *qdq.graph.output]:
    if value.name in original:
        value.CopyFrom(original[value.name])
del qdq.graph.value_info[:]
onnx.save(qdq, out)
peak_rss()
