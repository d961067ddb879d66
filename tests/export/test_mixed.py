"""The TensorRT target's mixed precision (issue 28): under strong typing (TensorRT 11 always, 10
with --stronglyTyped) the ONNX types decide each layer's precision, so what quantize leaves
unquantized is written in FP16, except what float16 cannot hold (the same rules as quantkit fp16),
as ModelOpt's ONNX quantization does by default (high_precision_dtype="fp16",
TensorRT-Model-Optimizer modelopt/onnx/quantization/quantize.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_model, save
from onnx import TensorProto, numpy_helper

import quantkit
from quantkit.cli import main
from quantkit.evaluation.variants import layer_precisions
from quantkit.export.fp16 import FP16_SAFE_MAX
from quantkit.options import CheckOptions, QuantizeOptions

QDQ = {"QuantizeLinear", "DequantizeLinear", "Cast"}


def encoder_case(tmp_path):
    from test_attention import S, encoder_block

    path = save(encoder_block(), tmp_path / "block.onnx")
    rng = np.random.default_rng(1)
    # a Hugging Face style mask (finfo(float32).min / 1e34 ~ -3.4e4): beyond float16's safe range
    mask = np.where(rng.random((64, 1, S)) < 0.2, -3.4e4, 0.0).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(64, S, 16)).astype(np.float32), mask=mask)
    return path, tmp_path / "data.npz"


def cnn_case(tmp_path):
    path = save(conv_model(channels=3), tmp_path / "cnn.onnx")
    np.save(tmp_path / "data.npy", np.random.default_rng(2).normal(size=(64, 3, 8, 8)).astype(np.float32))
    return path, tmp_path / "data.npy"


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("case", [cnn_case, encoder_case])
def test_the_tensorrt_target_is_fp16_outside_the_qdq_except_what_fp16_cannot_hold(tmp_path, case, fmt):
    path, data = case(tmp_path)
    ranges = quantkit.calibrate(path, data, quantkit.CalibrationOptions(methods="minmax"), out=tmp_path / "r").ranges
    out = tmp_path / f"{fmt}.onnx"
    options = QuantizeOptions(ranges=tmp_path / "r" / "ranges.json", format=fmt, method="minmax")
    result = quantkit.quantize(path, out, options, data=data, check=CheckOptions())
    assert result.fidelity.ok and result.fp16 is not None  # the check ran on the whole mixed model
    written = onnx.load(str(out))
    types = float_types(written)
    unsafe = {n for n, t in ranges.tensors.items() if max(abs(t.min), abs(t.max)) > FP16_SAFE_MAX}
    for node in written.graph.node:
        if node.op_type in QDQ:
            continue
        floats = [types[t] for t in node.output if types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        if node.name in result.fp16.kept_fp32:
            assert floats and all(t == TensorProto.FLOAT for t in floats)
            touched = {*node.input, *node.output}
            assert "range" in result.fp16.kept_fp32[node.name] and touched & unsafe, (node.name, result.fp16.kept_fp32[node.name])
        else:
            assert all(t == TensorProto.FLOAT16 for t in floats), (node.name, node.op_type, floats)
    # the graph's own inputs and outputs stay float32 (Casts at the edges), as quantkit fp16 writes them
    assert all(types[v.name] == TensorProto.FLOAT for v in [*written.graph.input, *written.graph.output] if v.name != "mask")
    if case is encoder_case:
        assert result.fp16.kept_fp32, "the -3.4e4 mask Add must stay float32"
    # eval's per-layer report reads the same from the types: quantized nodes in int8/fp8, the rest fp16 or kept fp32
    precisions = layer_precisions(written)
    assert {n for n, p in precisions.items() if p == fmt} == set(result.report.int8_nodes)
    assert {n for n, p in precisions.items() if p == "fp32"} == set(result.fp16.kept_fp32) - set(result.report.int8_nodes)
    # the build: strongly typed on 10.x, no precision flag on 11.x (TensorRT is not installed here: exit 2)
    assert main(["build", str(out), "--shapes", _shapes(path), "-o", str(tmp_path / "e.engine")]) == 2
    lines = (tmp_path / "e.trtexec.sh").read_text().splitlines()
    v10, v11 = (lines[i + 1] for i, line in enumerate(lines) if line.startswith("# TensorRT 1"))
    assert "--stronglyTyped" in v10 and not {"--fp16", "--int8", "--best"} & set(v10.split())
    assert v11.startswith("trtexec ") and not {"--stronglyTyped", "--fp16", "--int8"} & set(v11.split())


def _shapes(path) -> str:
    info = quantkit.load_model(path)
    profile = []
    for spec in info.inputs:
        dims = [1 if not isinstance(d, int) else d for d in spec.shape]
        profile.append(f"{spec.name}:" + "/".join("x".join(map(str, [b, *dims[1:]])) for b in (1, 4, 8)))
    return ",".join(profile)


def test_high_precision_fp32_and_the_onnxruntime_target_stay_float32(tmp_path):
    path, data = cnn_case(tmp_path)
    quantkit.calibrate(path, data, quantkit.CalibrationOptions(methods="minmax"), out=tmp_path / "r")
    ranges = tmp_path / "r" / "ranges.json"
    for options in (
        QuantizeOptions(ranges=ranges, high_precision="fp32"),
        QuantizeOptions(ranges=ranges, target="onnxruntime"),
    ):
        result = quantkit.quantize(path, tmp_path / "o.onnx", options, data=data)
        assert result.fp16 is None
        assert not any(i.data_type == TensorProto.FLOAT16 for i in onnx.load(str(tmp_path / "o.onnx")).graph.initializer)


def test_an_fp16_model_builds_strongly_typed_unless_weak_typing_is_asked(tmp_path, capsys):
    """TensorRT 10 reads an FP16 model's types as hints under --fp16 (a layer kept in FP32 against
    overflow may then run in FP16): quantkit builds it --stronglyTyped, and weakly only on request,
    with a warning; 11.x builds it as it is (NVIDIA's TensorRT 11 migration guide: networks are
    always strongly typed, and --fp16 was removed)."""
    path, data = cnn_case(tmp_path)
    assert main(["fp16", str(path), "--data", str(data), "-o", str(tmp_path / "h.onnx"), "-q"]) == 0
    shapes = _shapes(path)
    assert main(["build", str(tmp_path / "h.onnx"), "--shapes", shapes, "-o", str(tmp_path / "h.engine")]) == 2
    strong = capsys.readouterr().out
    assert "--stronglyTyped" in strong and "--fp16" not in strong and "not expressible" not in strong
    assert main(["build", str(tmp_path / "h.onnx"), "--shapes", shapes, "--weak-typing", "-o", str(tmp_path / "h.engine")]) == 2
    weak = capsys.readouterr().out
    assert "--fp16" in weak and "may run in FP16" in weak
    v11 = weak.split("# TensorRT 11")[1].splitlines()[1]
    assert v11.startswith("trtexec ") and "--fp16" not in v11


def test_scales_below_float16s_normal_range_stay_float32(tmp_path):
    """A quiet weight channel (|w| ~ 1e-4, scale ~ 1e-6) has a float16 scale in the subnormal range,
    off by several percent: that Q/DQ keeps float32 scales, so the mixed model is as accurate as
    the one with float32 outside (measured on saral's DB detector: 15.7 dB before, 26.7 dB after)."""
    proto = conv_model(channels=3)
    w1 = next(i for i in proto.graph.initializer if i.name == "w1")
    values = numpy_helper.to_array(w1).copy()
    values[1] *= 3e-4  # one quiet output channel
    w1.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "w1"))
    path = save(proto, tmp_path / "quiet.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(64, 3, 8, 8)).astype(np.float32))
    quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax"), out=tmp_path / "r")
    options = QuantizeOptions(ranges=tmp_path / "r" / "ranges.json", method="minmax")
    result = quantkit.quantize(path, tmp_path / "m.onnx", options, data=tmp_path / "x.npy")
    assert any("keep float32 scales" in n for n in result.fp16.notes)
    written = onnx.load(str(tmp_path / "m.onnx"))
    scales = {i.name: i.data_type for i in written.graph.initializer}
    dq = next(n for n in written.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w1"))
    assert scales[dq.input[1]] == TensorProto.FLOAT
