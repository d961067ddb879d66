"""Bias correction against its closed form: for a linear layer the corrected model's mean output
over the calibration data equals FP32's exactly (y = W x + b is linear, so E[W_q x + b'] - E[W x + b]
= dW E[x] - shift = 0), and a Conv's equals it away from the padded border."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.ort import make_session
from quantkit.data import batches, open_source
from quantkit.export.bias_correction import correct_biases, expected_shift
from quantkit.model import load_model


def weight_only_qdq(model: onnx.ModelProto, bits: int = 4) -> onnx.ModelProto:
    """The model with each Conv/Gemm weight through a per-channel symmetric DequantizeLinear (coarse
    on purpose: 4-bit levels in int8 storage make the weight error's mean shift plain to see)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    levels = 2 ** (bits - 1) - 1
    for node in [n for n in out.graph.node if n.op_type in ("Conv", "Gemm")]:
        w = inits[node.input[1]]
        scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / levels).astype(np.float32)
        q = np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int8)
        name = node.input[1]
        out.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")])
        dq = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [f"{name}_dq"], axis=0, name=f"{name}_DQ")
        out.graph.node.insert(0, dq)
        node.input[1] = f"{name}_dq"
    return out


def mean_gap(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    ya, yb = (make_session(m).run(None, {"x": x})[0].astype(np.float64) for m in (a, b))
    return np.moveaxis(ya - yb, 1, -1).reshape(-1, ya.shape[1]).mean(axis=0)


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(3)
    return rng, tmp_path


def test_a_linear_layer_is_corrected_exactly(data):
    rng, tmp = data
    w = rng.normal(size=(6, 10)).astype(np.float32)  # Gemm transB=1: [out, in]
    b = rng.normal(size=6).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")]
    model = float_model(nodes, {"x": ["N", 10]}, {"y": ["N", 6]}, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = save(model, tmp / "fc.onnx")
    x = (rng.normal(size=(64, 10)) + rng.uniform(-3, 3, size=10)).astype(np.float32)  # channel means far from 0
    np.save(tmp / "x.npy", x)
    info = load_model(path)
    qdq = weight_only_qdq(model)
    corrected, report = correct_biases(qdq, info, batches(open_source(tmp / "x.npy", info), info, 16))
    assert list(report.corrected) == ["fc"]
    before, after = mean_gap(qdq, model, x), mean_gap(corrected, model, x)
    assert np.abs(before).max() > 1e-2  # 4-bit weights shift the mean visibly
    np.testing.assert_allclose(after, 0.0, atol=2e-5 * np.abs(before).max() + 1e-6)
    # the closed form itself, against a direct computation
    dq = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "w_q")).astype(np.float64)
    scale = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "w_s")).astype(np.float64)
    dw = dq * scale[:, None] - w
    np.testing.assert_allclose(expected_shift(dw, x.mean(axis=0).astype(np.float64), "Gemm", trans_b=1), (x @ dw.T).mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("group", [1, 4])
def test_a_conv_is_corrected_exactly_without_padding(data, group):
    rng, tmp = data
    w = rng.normal(size=(8, 4 // group, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=group, name="conv")]  # no bias: one is added
    model = float_model(nodes, {"x": ["N", 4, 6, 6]}, {"y": ["N", 8, 4, 4]}, [numpy_helper.from_array(w, "w")])
    path = save(model, tmp / "conv.onnx")
    # constant over each image: every window then sees the image's mean, so E over the output
    # positions equals E over the input's (with spatial variation the two differ by sampling noise)
    x = np.broadcast_to(rng.normal(size=(32, 4, 1, 1)) + rng.uniform(-2, 2, size=(1, 4, 1, 1)), (32, 4, 6, 6)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    info = load_model(path)
    qdq = weight_only_qdq(model)
    corrected, report = correct_biases(qdq, info, batches(open_source(tmp / "x.npy", info), info, 8))
    assert list(report.corrected) == ["conv"] and len(next(n for n in corrected.graph.node if n.name == "conv").input) == 3
    before, after = mean_gap(qdq, model, x), mean_gap(corrected, model, x)
    assert np.abs(before).max() > 1e-2
    np.testing.assert_allclose(after, 0.0, atol=1e-4 * np.abs(before).max() + 1e-6)
    assert corrected.graph.initializer[-1].data_type == TensorProto.FLOAT


def test_a_weight_the_placement_changed_is_left_alone(data):
    """onnxruntime's placement folds BatchNorm into the Conv: its quantized weight is no longer the
    FP32 weight rounded, and a shift computed from the difference would be wrong."""
    rng, tmp = data
    w = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    model = float_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], {"x": ["N", 4, 2, 2]}, {"y": ["N", 4, 2, 2]},
                        [numpy_helper.from_array(w, "w")])  # fmt: skip
    info = load_model(save(model, tmp / "m.onnx"))
    qdq = weight_only_qdq(model)
    folded = next(i for i in qdq.graph.initializer if i.name == "w_s")
    folded.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(folded) * 1.7, "w_s"))
    np.save(tmp / "x.npy", rng.normal(size=(8, 4, 2, 2)).astype(np.float32))
    _, report = correct_biases(qdq, info, batches(open_source(tmp / "x.npy", info), info, 8))
    assert report.corrected == {} and "rounded" in report.skipped["conv"]
