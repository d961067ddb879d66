"""FP8 (E4M3) Q/DQ for TensorRT: scales of amax/448, values against ml_dtypes' E4M3 as the
reference, onnxruntime's CPU run of the model equal to the same arithmetic done by hand, and the
demo's fidelity."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, conv_model, save
from onnx import TensorProto, numpy_helper

import quantkit
from quantkit.backends.ort import make_session
from quantkit.evaluation.metrics import sqnr_db
from quantkit.export.qdq import quantize_model


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    path = save(conv_model(), tmp / "conv.onnx")
    np.save(tmp / "calib.npy", np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    return quantkit.load_model(path), quantkit.calibrate(path, tmp / "calib.npy", quantkit.CalibrationOptions(methods="minmax")).ranges


def test_fp8_scales_and_values(conv_case):
    info, ranges = conv_case
    q, report = quantize_model(info, ranges, method="minmax", fmt="fp8")
    assert report.format == "fp8" and q.opset_import[0].version >= 19
    for tensor, (scale, zp) in report.activation_params.items():
        assert scale == np.float32(ranges.tensors[tensor].amax["minmax"] / 448) and zp == 0
    inits = {i.name: i for i in q.graph.initializer}
    w1 = numpy_helper.to_array(next(i for i in info.proto.graph.initializer if i.name == "w1"))
    wq = inits["w1_quantized"]
    assert wq.data_type == TensorProto.FLOAT8E4M3FN and inits["x_zero_point"].data_type == TensorProto.FLOAT8E4M3FN
    scales = report.weight_scales["w1"]
    np.testing.assert_allclose(scales, np.abs(w1).reshape(4, -1).max(1) / 448, rtol=1e-6)
    back = numpy_helper.to_array(wq).astype(np.float32) * scales.reshape(-1, 1, 1, 1)
    # E4M3 keeps 3 mantissa bits: round to nearest is within 1/16 of each value (and exact at each channel's max)
    assert np.all(np.abs(back - w1) <= np.abs(w1) / 16 + 1e-7)
    assert np.allclose(np.abs(back).reshape(4, -1).max(1), np.abs(w1).reshape(4, -1).max(1), rtol=1e-6)


def test_onnxruntime_runs_fp8_qdq_as_the_arithmetic_by_hand(conv_case):
    info, ranges = conv_case
    q, report = quantize_model(info, ranges, method="minmax", fmt="fp8")
    x = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)
    got = make_session(q).run(None, {"x": x})[0]

    # the same model computed by hand: each quantized tensor rounded through E4M3, in float32
    def fake(a: np.ndarray, scale: float) -> np.ndarray:
        return (np.clip(a / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale).astype(np.float32)

    weights = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    hand = onnx.ModelProto()
    hand.CopyFrom(info.proto)
    for init in hand.graph.initializer:
        if init.name in report.weight_scales:
            w = weights[f"{init.name}_quantized"].astype(np.float32) * report.weight_scales[init.name].reshape(-1, 1, 1, 1)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    hand.graph.output.extend([onnx.helper.make_tensor_value_info("r1", TensorProto.FLOAT, None)])
    session = make_session(hand)
    x_scale = report.activation_params["x"][0]
    r1 = session.run(["r1"], {"x": fake(x, x_scale)})[0]
    # second conv on the rounded ReLU output, in float32 numpy
    r1q = fake(r1, report.activation_params["r1"][0])
    w2 = weights["w2_quantized"].astype(np.float32) * report.weight_scales["w2"].reshape(-1, 1, 1, 1)
    expected = np.einsum("nchw,oc->nohw", r1q, w2[:, :, 0, 0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fp8_demo_keeps_its_fidelity(demo_val, demo_preprocess):
    images, _ = demo_val
    ranges = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="percentile"),
        data_options=quantkit.DataOptions(num_samples=256, preprocess=demo_preprocess),
    ).ranges
    info = quantkit.load_model(DEMO_MODEL)
    fp32 = make_session(info.proto).run(None, {"image": images[:256]})[0]
    fp8, _ = quantize_model(info, ranges, method="percentile", fmt="fp8")
    got = make_session(fp8).run(None, {"image": images[:256]})[0]
    # E4M3 keeps 3 mantissa bits: about 19 dB here, where INT8 with the same ranges keeps about 34 dB
    print(f"fp8 demo: {sqnr_db(fp32, got):.1f} dB, agreement {np.mean(fp32.argmax(1) == got.argmax(1)):.4f}")
    assert sqnr_db(fp32, got) > 15 and np.mean(fp32.argmax(1) == got.argmax(1)) >= 0.97
    with pytest.raises(quantkit.QuantkitError, match="fp8 is a TensorRT format"):
        quantize_model(info, ranges, method="percentile", target="onnxruntime", fmt="fp8")


def test_fp8_is_an_eval_variant(tmp_path, demo_preprocess):
    from conftest import DEMO_VAL

    options = quantkit.EvalOptions(variants="fp32,fp8:percentile,int8-tensorrt:percentile", latency=False)
    data = quantkit.DataOptions(preprocess=demo_preprocess, num_samples=128)
    report = quantkit.evaluate(DEMO_MODEL, DEMO_VAL, options, data_options=data, calib=DEMO_CALIB)
    fp8, int8 = report.variant("fp8:percentile"), report.variant("int8-tensorrt:percentile")
    assert fp8.error is None and fp8.metrics["top1"] >= report.variant("fp32").metrics["top1"] - 0.02
    assert fp8.size_bytes < int8.size_bytes * 1.1  # one byte per weight, as int8
