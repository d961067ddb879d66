"""The onnxruntime backend: one session factory, and TensorRT-format Q/DQ run as exact fake quantization."""

import numpy as np
import onnx
import pytest
from conftest import float_model
from onnx import helper, numpy_helper

from quantkit.backends.ort import has_signed_activation_qdq, make_session, with_outputs
from quantkit.errors import QuantkitError


def qdq_gemm(act_dtype=np.int8, trans_b=1, seed=0, weight_levels=127):
    """x -> Q/DQ (per tensor) -> Gemm with a per-channel int8 weight; returns model, x, weight pieces."""
    rng = np.random.default_rng(seed)
    k, n = 8, 10
    w = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    axis = 0 if trans_b else 1
    ws = (np.abs(w).max(axis=1 - axis) / weight_levels).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    wq = np.clip(np.round(w / ws.reshape(shape)), -weight_levels, weight_levels).astype(np.int8)
    xs = np.float32(0.2 / 127)
    zp = np.array(0 if act_dtype == np.int8 else 128, act_dtype)
    inits = [
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(ws, "ws"),
        numpy_helper.from_array(np.zeros(ws.shape, np.int8), "wz"),
        numpy_helper.from_array(np.array(xs), "xs"),
        numpy_helper.from_array(zp, "xz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
        helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=trans_b),
    ]
    model = float_model(nodes, {"x": [4, k]}, {"y": [4, n]}, inits, name="g")
    x = rng.uniform(-0.2, 0.2, size=(4, k)).astype(np.float32)
    # the independent reference: numpy fake quantization, exactly as TensorRT defines Q/DQ
    xq = np.clip(np.round(x / xs) + int(zp), np.iinfo(act_dtype).min, np.iinfo(act_dtype).max)
    xd = (xq - int(zp)) * xs
    wd = wq.astype(np.float32) * ws.reshape(shape)
    ref = xd @ (wd.T if trans_b else wd)
    return model, x, ref


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensorrt_format_qdq_runs_as_exact_fake_quantization(trans_b, seed):
    model, x, ref = qdq_gemm(np.int8, trans_b, seed)
    assert has_signed_activation_qdq(model)
    got = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uint8_qdq_keeps_onnxruntimes_integer_kernels(seed):
    """uint8 models keep onnxruntime's integer kernels. Their u8 x s8 products are summed in pairs
    into int16 on CPUs without VNNI, which saturates for 8-bit weights (255 * 127 * 2 > 32767);
    with 7-bit weights (onnxruntime's reduce_range) they equal fake quantization."""
    model, x, ref = qdq_gemm(np.uint8, seed=seed, weight_levels=63)
    assert not has_signed_activation_qdq(model)
    got = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_with_outputs_adds_intermediate_tensors_without_touching_the_input():
    model, x, _ = qdq_gemm()
    before = model.SerializeToString()
    augmented = with_outputs(model, ["xd", "xd", "y"])
    assert model.SerializeToString() == before
    assert [o.name for o in augmented.graph.output] == ["y", "xd"]
    out = dict(zip([o.name for o in augmented.graph.output], make_session(augmented).run(None, {"x": x}), strict=True))
    assert out["xd"].shape == x.shape


def test_a_model_onnxruntime_cannot_load_is_one_line(tmp_path):
    bad = onnx.ModelProto()
    bad.ir_version = 8
    with pytest.raises(QuantkitError, match=r"onnxruntime cannot load bad\.onnx"):
        make_session(bad, source="bad.onnx")
