"""Optimized weight rounding against independent references: the exact small-row solver equals a
brute force over every floor/ceil choice measured on the samples themselves (not through H); GPTQ
is never worse than round-to-nearest per row and better on correlated inputs; the im2col patches
reproduce onnxruntime's Conv; the quantize pipeline's layer output error drops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import float_model, save
from onnx import helper, numpy_helper

from quantkit.backends.ort import make_session
from quantkit.export.rounding import conv_patches, round_rows


def correlated_inputs(rng, n: int, k: int) -> np.ndarray:
    mix = rng.normal(size=(k, k)) * 0.6 + np.eye(k)
    return rng.normal(size=(n, k)) @ mix + rng.normal(size=k)


def test_small_rows_are_rounded_to_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 500, 6)
    w = rng.normal(size=(5, 6))
    scale = np.abs(w).max(axis=1) / 127 * 40  # a coarse grid, so rounding choices matter
    q, _, _ = round_rows(w, scale, x.T @ x / len(x), 127)
    for r in range(len(w)):
        low = np.floor(w[r] / scale[r])
        candidates = [low + np.array(c) for c in itertools.product((0, 1), repeat=6)]
        errors = [np.sum((x @ (w[r] - c * scale[r])) ** 2) for c in candidates]  # on the samples, not through H
        # round-to-nearest is one of the candidates, so the optimum is never worse than it
        assert np.sum((x @ (w[r] - q[r] * scale[r])) ** 2) == pytest.approx(min(errors), rel=1e-9)


def test_gptq_is_never_worse_than_round_to_nearest_and_better_on_correlated_inputs():
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 2000, 48)
    w = rng.normal(size=(16, 48))
    scale = np.abs(w).max(axis=1) / 127 * 8
    h = x.T @ x / len(x)
    q, e_near, e_new = round_rows(w, scale, h, 127)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    per_row_new = np.einsum("ik,kl,il->i", w - q * scale[:, None], h, w - q * scale[:, None])
    per_row_near = np.einsum("ik,kl,il->i", w - nearest * scale[:, None], h, w - nearest * scale[:, None])
    assert np.all(per_row_new <= per_row_near + 1e-12)
    assert e_new < 0.7 * e_near  # the published gain of GPTQ over RTN on correlated inputs
    assert np.abs(q).max() <= 127


@pytest.mark.parametrize(("strides", "pads", "dilations", "group"), [((1, 1), (1, 1, 1, 1), (1, 1), 1), ((2, 1), (0, 1, 2, 0), (2, 1), 2)])
def test_conv_patches_reproduce_the_conv(strides, pads, dilations, group):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 9, 8)).astype(np.float32)
    w = rng.normal(size=(6, 4 // group, 3, 3)).astype(np.float32)
    attrs = {"strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group}
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = float_model([node], {"x": [2, 4, 9, 8]}, {"y": None}, [numpy_helper.from_array(w, "w")])
    ref = make_session(model).run(None, {"x": x})[0]
    patches = conv_patches(x, attrs, (3, 3))  # [rows, C, 9]
    cg = 4 // group
    outs = []
    for g in range(group):
        rows = patches[:, g * cg : (g + 1) * cg, :].reshape(len(patches), -1)
        outs.append(rows @ w[g * (6 // group) : (g + 1) * (6 // group)].reshape(6 // group, -1).T)
    got = np.concatenate(outs, axis=1).reshape(2, ref.shape[2], ref.shape[3], 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_quantize_with_gptq_lowers_the_output_error_on_its_samples_and_held_out(tmp_path):
    """The Q/DQ model's output error against FP32, through onnxruntime: GPTQ's (rounding the
    compensated weights on the quantized input) is at least 10% below round-to-nearest's on the
    calibration samples, and still below it on held-out samples of the same distribution (with
    GPTQ's 1% ridge the compensation fitted the samples: 0.79 of the error on them, 0.97 held out)."""
    from quantkit.cli import main

    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(32, 64)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["y"], transB=1, name="fc")]
    model = save(float_model(nodes, {"x": ["N", 64]}, {"y": ["N", 32]}, [numpy_helper.from_array(w1, "w1")]), tmp_path / "fc.onnx")
    x = correlated_inputs(rng, 1024, 64).astype(np.float32)
    calibration, held_out = x[:512], x[512:]
    np.save(tmp_path / "x.npy", calibration)
    calibrate = ["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--method", "minmax"]
    assert main([*calibrate, "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    base = ["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "--high-precision", "fp32", "-q"]
    assert main([*base, "-o", str(tmp_path / "plain.onnx")]) == 0
    assert main([*base, "--algorithms", "gptq", "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "gptq.onnx")]) == 0

    def error(name: str, xs: np.ndarray) -> float:
        return float(np.sum((make_session(tmp_path / f"{name}.onnx").run(None, {"x": xs})[0] - xs.astype(np.float64) @ w1.T) ** 2))

    assert error("gptq", calibration) < 0.9 * error("plain", calibration)
    assert error("gptq", held_out) < 0.97 * error("plain", held_out)


def test_int4_blocks_rounded_by_gptq_lower_the_output_error_on_the_samples(tmp_path):
    """Block-wise INT4 (blocks of 64 along K): each input row is rounded on its own block's scale.
    The output error is measured on the samples through onnxruntime (not through H): GPTQ's model is
    at least 30% below round-to-nearest's on correlated inputs, on the same scales."""
    from quantkit.data import batches, open_source
    from quantkit.export.int4 import quantize_int4_weights
    from quantkit.model import load_model

    rng = np.random.default_rng(3)
    k, n = 128, 24
    w = rng.normal(size=(k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    path = save(float_model(nodes, {"x": ["N", k]}, {"y": ["N", n]}, [numpy_helper.from_array(w, "w")]), tmp_path / "mm.onnx")
    x = correlated_inputs(rng, 1024, k).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    info = load_model(path)

    def data():
        return batches(open_source(tmp_path / "x.npy", info), info, 128)

    nearest, _ = quantize_int4_weights(info, block_size=64, calibration=data())
    rounded, report = quantize_int4_weights(info, block_size=64, calibration=data(), rounding=data())
    ref = x @ w
    errors = [float(np.sum((make_session(m).run(None, {"x": x})[0] - ref) ** 2)) for m in (nearest, rounded)]
    assert errors[1] < 0.7 * errors[0]
    before, after = report.rounding["mm"]
    assert after < before and "GPTQ" in report.summary()


def test_quantize_int4_with_gptq_records_it_and_refuses_the_other_algorithms(tmp_path, capsys):
    from quantkit.cli import main

    rng = np.random.default_rng(4)
    w = rng.normal(size=(128, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    path = save(float_model(nodes, {"x": ["N", 128]}, {"y": ["N", 8]}, [numpy_helper.from_array(w, "w")]), tmp_path / "mm.onnx")
    np.save(tmp_path / "x.npy", correlated_inputs(rng, 256, 128).astype(np.float32))
    base = ["quantize", str(path), "--format", "int4-weights", "--block-size", "64", "--data", str(tmp_path / "x.npy"), "-q"]
    assert main([*base, "--algorithms", "gptq", "-o", str(tmp_path / "q.onnx")]) == 0
    import onnx

    assert {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}["quantkit.algorithms"] == "gptq"
    assert main([*base, "--algorithms", "bias-correction", "-o", str(tmp_path / "b.onnx")]) == 2
    assert "int4-weights takes gptq" in capsys.readouterr().err and not (tmp_path / "b.onnx").exists()


def test_a_layer_out_of_time_keeps_round_to_nearest():
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 500, 48)
    w = rng.normal(size=(8, 48))
    scale = np.abs(w).max(axis=1) / 127 * 20
    q, before, after = round_rows(w, scale, x.T @ x / len(x), 127, seconds=-1.0)
    np.testing.assert_array_equal(q, np.clip(np.round(w / scale[:, None]), -127, 127))
    assert before == after


def test_sampled_conv_patches_are_rows_of_the_full_im2col():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    attrs = {"pads": [1, 0, 1, 2], "strides": [2, 1], "dilations": [1, 2]}
    full = conv_patches(x, attrs, (3, 3))
    sampled = conv_patches(x, attrs, (3, 3), rows=20, rng=np.random.default_rng(1))
    picked = np.random.default_rng(1).choice(len(full), 20, replace=False)
    np.testing.assert_array_equal(sampled, full[picked])


def test_a_weight_shared_by_two_layers_keeps_round_to_nearest(tmp_path, capsys):
    """An unrolled RNN's steps read one weight: one rounding cannot minimise each step's own error
    (and holding a copy per step cost a captcha CRNN 6 GB), so GPTQ leaves it and says so, while
    the unshared layer beside it is still rounded."""
    from quantkit.cli import main

    rng = np.random.default_rng(4)
    w, head = rng.normal(size=(64, 64)).astype(np.float32), rng.normal(size=(16, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h1"], transB=1, name="step1"),
        helper.make_node("Gemm", ["h1", "w"], ["h2"], transB=1, name="step2"),
        helper.make_node("Gemm", ["h2", "head"], ["y"], transB=1, name="head"),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head")]
    model = save(float_model(nodes, {"x": ["N", 64]}, {"y": ["N", 16]}, inits), tmp_path / "rnn.onnx")
    np.save(tmp_path / "x.npy", correlated_inputs(rng, 512, 64).astype(np.float32))
    assert main(["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    capsys.readouterr()
    quantize = ["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "--algorithms", "gptq"]
    assert main([*quantize, "--data", str(tmp_path / "x.npy"), "--force", "-o", str(tmp_path / "q.onnx")]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("optimized rounding (GPTQ)")]
    assert line.startswith("optimized rounding (GPTQ): 1 layer(s)")


def test_compensated_rows_are_the_ridge_regression_toward_the_fp32_weights():
    """A second implementation: least squares on the stacked system [x~; sqrt(damp) I] against
    [W x; sqrt(damp) W], damp as ``compensated`` takes it."""
    from quantkit.export.rounding import COMPENSATION_DAMP, compensated

    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, 400, 10)
    quantized = x + rng.normal(scale=0.3, size=x.shape)
    w = rng.normal(size=(4, 10))
    h, cross = quantized.T @ quantized / len(x), quantized.T @ x / len(x)
    damp = COMPENSATION_DAMP * np.mean(np.diag(h))
    stacked = np.vstack([quantized / np.sqrt(len(x)), np.sqrt(damp) * np.eye(10)])
    targets = np.vstack([x @ w.T / np.sqrt(len(x)), np.sqrt(damp) * w.T])
    np.testing.assert_allclose(compensated(w, h, cross), np.linalg.lstsq(stacked, targets, rcond=None)[0].T, rtol=1e-8, atol=1e-10)


def test_an_input_always_zero_in_the_quantized_model_keeps_its_weights():
    """A dead input (zero in H~ and C), or an all-zero input (H~ = 0: before, a singular matrix
    and an internal error on PP-OCRv4's detector), leaves those weights as they are."""
    from quantkit.export.rounding import compensated

    rng = np.random.default_rng(15)
    x = correlated_inputs(rng, 200, 6)
    quantized = x.copy()
    quantized[:, 2] = 0.0
    w = rng.normal(size=(3, 6))
    got = compensated(w, quantized.T @ quantized / 200, quantized.T @ x / 200)
    np.testing.assert_allclose(got[:, 2], w[:, 2])
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(compensated(w, np.zeros((6, 6)), np.zeros((6, 6))), w)


def test_a_layer_with_too_few_input_rows_for_its_weights_keeps_round_to_nearest(tmp_path, capsys):
    """Fewer than MIN_ROWS_PER_WEIGHT sampled rows per weight of a row: the fit would follow the
    samples (a transformer's MatMuls on 128 sentences lost 0.23 of embedding cosine held out), so
    the layer is left as rounded."""
    from quantkit.cli import main
    from quantkit.export.rounding import MIN_ROWS_PER_WEIGHT

    rng = np.random.default_rng(16)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    path = save(float_model(nodes, {"x": ["N", 64]}, {"y": ["N", 8]}, [numpy_helper.from_array(w, "w")]), tmp_path / "fc.onnx")
    np.save(tmp_path / "x.npy", correlated_inputs(rng, MIN_ROWS_PER_WEIGHT * 64 - 64, 64).astype(np.float32))
    assert main(["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    capsys.readouterr()
    quantize = ["quantize", str(path), "--ranges", str(tmp_path / "r" / "ranges.json"), "--algorithms", "gptq", "--force"]
    assert main([*quantize, "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "q.onnx")]) == 0
    assert "optimized rounding: no layer improved on round-to-nearest" in capsys.readouterr().out


def test_output_error_is_the_mean_squared_error_on_the_samples():
    from quantkit.export.rounding import output_error

    rng = np.random.default_rng(12)
    x = rng.normal(size=(300, 7))
    quantized = np.round(x * 4) / 4
    w, w_q = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    h, cross, power = quantized.T @ quantized / 300, quantized.T @ x / 300, np.mean((x @ w.T) ** 2, axis=0)
    direct = np.mean((x @ w.T - quantized @ w_q.T) ** 2, axis=0)
    np.testing.assert_allclose(output_error(w_q, w, h, cross, power), direct, rtol=1e-9)


def test_a_later_layer_is_rounded_on_its_input_in_the_rounded_model(tmp_path):
    """fc2's integers are those a second pass computes by hand: its input x~ taken from the final
    model (fc1 already rounded), its FP32 input from the FP32 model, then ``compensated``,
    ``round_rows`` and the keep-if-better rule; and the model's output error is below round-to-nearest's."""
    import onnx

    from quantkit.cli import main
    from quantkit.data import batches, open_source
    from quantkit.export.rounding import compensated, optimize_rounding, output_error
    from quantkit.model import load_model

    rng = np.random.default_rng(13)
    w1, w2 = rng.normal(size=(24, 16)).astype(np.float32), rng.normal(size=(8, 24)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="fc2"),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    path = save(float_model(nodes, {"x": ["N", 16]}, {"y": ["N", 8]}, inits), tmp_path / "mlp.onnx")
    x = correlated_inputs(rng, 256, 16).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    calibrate = ["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--method", "minmax", "--out-dir", str(tmp_path / "r")]
    assert main([*calibrate, "-q"]) == 0
    ranges = str(tmp_path / "r" / "ranges.json")
    quantize = ["quantize", str(path), "--ranges", ranges, "--algorithms", "none", "--high-precision", "fp32", "-q"]
    assert main([*quantize, "-o", str(tmp_path / "rtn.onnx")]) == 0
    info, rtn = load_model(path), onnx.load(str(tmp_path / "rtn.onnx"))
    rounded, report = optimize_rounding(rtn, info, lambda: batches(open_source(tmp_path / "x.npy", info), info, 64))
    assert set(report.improved) == {"fc1", "fc2"}

    consts = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
    fc2 = next(n for n in rounded.graph.node if n.name == "fc2")
    dq = next(n for n in rounded.graph.node if n.output[0] == fc2.input[1])
    with_inputs = onnx.ModelProto()
    with_inputs.CopyFrom(rounded)
    with_inputs.graph.output.append(helper.make_empty_tensor_value_info(fc2.input[0]))
    quantized = make_session(with_inputs).run([fc2.input[0]], {"x": x})[0].astype(np.float64)
    fp32 = np.maximum(x.astype(np.float64) @ w1.T, 0)
    h, cross, power = quantized.T @ quantized / len(x), quantized.T @ fp32 / len(x), np.mean((fp32 @ w2.T.astype(np.float64)) ** 2, axis=0)
    scale = consts[dq.input[1]].astype(np.float64)
    w = w2.astype(np.float64)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    found, _, _ = round_rows(compensated(w, h, cross), scale, h, 127)
    keep = output_error(found * scale[:, None], w, h, cross, power) < output_error(nearest * scale[:, None], w, h, cross, power)
    np.testing.assert_array_equal(consts[dq.input[0]], np.where(keep[:, None], found, nearest))

    ref = fp32 @ w2.T
    errors = [np.sum((make_session(m).run(None, {"x": x})[0] - ref) ** 2) for m in (rtn, rounded)]
    assert errors[1] < errors[0]


def test_a_matmul_weight_stored_in_by_out_is_rounded_per_output_column(tmp_path):
    """A MatMul's constant weight is [in, out], quantized per output column (axis 1): GPTQ rounds
    its transpose and writes it back as stored. Square, so only the axis tells the two apart (read
    the other way, the integers would not be FP32's rounded and the layer would be skipped): the
    model's output error through onnxruntime drops below round-to-nearest's."""
    import onnx

    from quantkit.cli import main

    rng = np.random.default_rng(14)
    w = (rng.normal(size=(32, 32)) * np.linspace(0.2, 3.0, 32)[None, :]).astype(np.float32)  # columns of different ranges
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    path = save(float_model(nodes, {"x": ["N", 32]}, {"y": ["N", 32]}, [numpy_helper.from_array(w, "w")]), tmp_path / "mm.onnx")
    x = correlated_inputs(rng, 512, 32).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    calibrate = ["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--method", "minmax", "--out-dir", str(tmp_path / "r")]
    assert main([*calibrate, "-q"]) == 0
    quantize = ["quantize", str(path), "--ranges", str(tmp_path / "r" / "ranges.json"), "--high-precision", "fp32", "-q"]
    assert main([*quantize, "--algorithms", "none", "-o", str(tmp_path / "rtn.onnx")]) == 0
    assert main([*quantize, "--algorithms", "gptq", "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "gptq.onnx")]) == 0
    model = onnx.load(str(tmp_path / "gptq.onnx"))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and consts.get(n.input[0], np.zeros(0)).ndim == 2)
    q, scale = consts[dq.input[0]].astype(np.float64), consts[dq.input[1]].astype(np.float64)
    assert q.shape == (32, 32) and np.any(q != np.round(w / scale[None, :]))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    errors = [np.sum((make_session(tmp_path / f"{m}.onnx").run(None, {"x": x})[0] - ref) ** 2) for m in ("rtn", "gptq")]
    assert errors[1] < 0.9 * errors[0]
