"""INT4 weight-only, block-wise: scales and rounding in closed form, the clip search never worse
than rounding, activation weighting lowering the output error, and onnxruntime's run equal to
the dequantized weights applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.backends.ort import make_session
from quantkit.cli import main
from quantkit.data import batches, open_source
from quantkit.export.int4 import quantize_blocks, quantize_int4_weights
from quantkit.plan import NodeFilter

K, H, N = 256, 128, 32


def mlp(trans_b: bool = False):
    rng = np.random.default_rng(0)
    w1 = rng.standard_t(3, size=(K, H)).astype(np.float32) * 0.05  # heavy tails: outliers that clipping can trade away
    w2 = rng.normal(scale=0.1, size=(H, N)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.T.copy() if trans_b else w2, "w2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1 if trans_b else 0),
    ]
    return float_model(nodes, {"x": ["N", K]}, {"y": ["N", N]}, inits), w1, w2


def test_round_to_nearest_in_closed_form():
    w = np.random.default_rng(1).normal(size=(256, 8)).astype(np.float32)
    q, scales = quantize_blocks(w, 128, None, clip_search=False)
    assert scales.shape == (2, 8) and q.min() >= -8 and q.max() <= 7
    np.testing.assert_allclose(scales, np.abs(w.reshape(2, 128, 8)).max(1) / 7, rtol=1e-6)
    back = q.reshape(2, 128, 8) * scales[:, None, :]
    assert np.all(np.abs(back - w.reshape(2, 128, 8)) <= scales[:, None, :] / 2 + 1e-6)


def test_clip_search_is_never_worse_and_activation_weighting_lowers_the_output_error():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(256, 16)).astype(np.float32)
    x = rng.normal(size=(4096, 256))
    x[:, :8] *= 20  # outlier input channels, as in transformer activations
    moments = np.mean(x**2, axis=0)

    def weight_error(q, s, m):
        back = (q.reshape(2, 128, 16) * s[:, None, :]).reshape(256, 16)
        return float(np.sum(m[:, None] * (back - w) ** 2))

    def output_error(q, s):
        back = (q.reshape(2, 128, 16) * s[:, None, :]).reshape(256, 16)
        return float(np.mean((x @ back - x @ w) ** 2))

    plain = quantize_blocks(w, 128, None, clip_search=False)
    searched = quantize_blocks(w, 128, None, clip_search=True)
    weighted = quantize_blocks(w, 128, moments, clip_search=True)
    ones = np.ones(256)
    assert weight_error(*searched, ones) <= weight_error(*plain, ones)
    assert weight_error(*weighted, moments) <= weight_error(*searched, moments)
    assert output_error(*weighted) < output_error(*plain)


@pytest.mark.parametrize("trans_b", [False, True])
def test_onnxruntime_runs_the_int4_model_as_its_dequantized_weights(tmp_path, trans_b):
    proto, w1, w2 = mlp(trans_b)
    info = quantkit.load_model(save(proto, tmp_path / "mlp.onnx"))
    q, report = quantize_int4_weights(info, block_size=64, clip_search=False)
    assert set(report.quantized) == {"fc1", "fc2"} and q.opset_import[0].version >= 21
    inits = {i.name: i for i in q.graph.initializer}
    values = next(i for n, i in inits.items() if n.startswith("w1") and n.endswith("_values"))
    assert values.data_type == TensorProto.INT4
    x = np.random.default_rng(3).normal(size=(5, K)).astype(np.float32)
    got = make_session(q).run(None, {"x": x})[0]
    d1 = quantize_blocks(w1, 64, None, False)
    d2 = quantize_blocks(w2, 64, None, False)
    back1 = (d1[0].reshape(-1, 64, H) * d1[1][:, None, :]).reshape(K, H)
    back2 = (d2[0].reshape(-1, 64, N) * d2[1][:, None, :]).reshape(H, N)
    np.testing.assert_allclose(got, np.maximum(x @ back1, 0) @ back2, rtol=1e-4, atol=1e-5)
    assert report.bytes_after < report.bytes_before / 6  # 4 bits a weight, plus a float32 scale per 64


def test_quantize_cli_int4_weights_with_data(tmp_path, capsys):
    proto, _, _ = mlp()
    model = save(proto, tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(4).normal(size=(64, K)).astype(np.float32))
    out = tmp_path / "mlp.int4.onnx"
    assert (
        main(["quantize", str(model), "--format", "int4-weights", "--block-size", "64", "--data", str(tmp_path / "x.npy"), "-o", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "clip search weighted by activations" in text and out.stat().st_size < model.stat().st_size / 4
    info = quantkit.load_model(model)
    feeds = next(iter(batches(open_source(tmp_path / "x.npy", info), info, 64))).feeds
    ref, got = make_session(info.proto).run(None, feeds)[0], make_session(str(out)).run(None, feeds)[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 15
    assert main(["quantize", str(model), "--format", "int4-weights", "--block-size", "48", "-o", str(out)]) == 2


def test_int4_honours_the_node_filters_and_refuses_attention(tmp_path):
    """--exclude-nodes keeps a MatMul float in int4 as in int8; excluding every node leaves nothing
    to quantize (exit 2, not an unchanged model with exit 0); --quantize-attention has no meaning."""
    proto, _, _ = mlp()
    model = save(proto, tmp_path / "mlp.onnx")
    names = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    info = quantkit.load_model(model)
    _, report = quantize_int4_weights(info, block_size=64, clip_search=False, filters=NodeFilter(exclude_nodes=(names[0],)))
    assert list(report.quantized) == names[1:] and "exclude-nodes" in report.kept_float[names[0]]
    out = tmp_path / "o.onnx"
    base = ["quantize", str(model), "--format", "int4-weights", "--block-size", "64", "-o", str(out)]
    assert main([*base, "--exclude-nodes", ".*"]) == 2 and not out.exists()
    assert main([*base, "--quantize-attention"]) == 2 and not out.exists()
