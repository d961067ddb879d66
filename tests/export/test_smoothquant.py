"""SmoothQuant: the smoothed FP32 model computes the original function, outlier channels shrink,
and INT8 on the smoothed model is closer to FP32 than INT8 without it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float_model, save
from onnx import helper, numpy_helper

import quantkit
from quantkit.backends.ort import make_session
from quantkit.data import batches, open_source
from quantkit.evaluation.metrics import sqnr_db
from quantkit.export.qdq import quantize_model
from quantkit.export.smoothquant import smooth_model, smoothable

S, D, F = 16, 64, 32


def block(producer: str = "ln"):
    """x -> LayerNorm (or a gain Mul and Relu) with outlier channels -> three projections sharing it -> sum."""
    rng = np.random.default_rng(0)
    gamma = np.ones(D, np.float32)
    gamma[[3, 17, 40]] = 40.0  # outlier channels, as LayerNorm outputs of real transformers have
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.full(D, 0.1, np.float32), "beta")]
    inits += [numpy_helper.from_array(rng.normal(scale=0.2, size=(D, F)).astype(np.float32), f"w{k}") for k in range(3)]
    inits.append(numpy_helper.from_array(gamma, "channel_gain"))
    if producer == "ln":
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln")]
    else:
        nodes = [helper.make_node("Mul", ["x", "channel_gain"], ["g"], name="gain"), helper.make_node("Relu", ["g"], ["h"], name="relu")]
    nodes += [helper.make_node("MatMul", ["h", f"w{k}"], [f"p{k}"], name=f"proj{k}") for k in range(3)]
    nodes += [helper.make_node("Add", ["p0", "p1"], ["a"], name="sum0"), helper.make_node("Add", ["a", "p2"], ["y"], name="sum1")]
    return float_model(nodes, {"x": ["N", S, D]}, {"y": ["N", S, F]}, inits)


def gemm_block():
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.2, size=(F, D)).astype(np.float32)  # stored [N, K]: transB=1
    gain = np.ones(D, np.float32)
    gain[5] = 50.0
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(gain, "gain")]
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="scale_in"),
        helper.make_node("Gemm", ["h", "w"], ["y"], name="fc", transB=1),
    ]
    return float_model(nodes, {"x": ["N", D]}, {"y": ["N", F]}, inits)


def data(tmp_path, shape, name="x.npy"):
    np.save(tmp_path / name, np.random.default_rng(2).normal(size=shape).astype(np.float32))
    return tmp_path / name


@pytest.mark.parametrize(("producer", "folded"), [("ln", "LayerNormalization ln"), ("relu", "inserted Mul")])
def test_the_smoothed_model_computes_the_original_function(tmp_path, producer, folded):
    info = quantkit.load_model(save(block(producer), tmp_path / "b.onnx"))
    x = data(tmp_path, (32, S, D))
    smoothed, report = smooth_model(info, batches(open_source(x, info), info, 8), alpha=0.5)
    assert report.smoothed["h"] == ["proj0", "proj1", "proj2"] and report.folded_into["h"] == folded
    before, after = report.outlier_ratio["h"]
    assert after < before / 3  # the outlier channels shrink
    feeds = {"x": np.load(x)[:8]}
    ref, got = make_session(info.proto).run(None, feeds)[0], make_session(smoothed).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_weights_in_constant_nodes_are_smoothed_too(tmp_path):
    """Paddle2ONNX and opset-11 exports keep MatMul weights in Constant nodes (PP-OCRv4's recogniser)."""
    model = block("ln")
    weights = [i for i in model.graph.initializer if i.name.startswith("w")]
    constants = [helper.make_node("Constant", [], [w.name], value=w, name=f"const_{w.name}") for w in weights]
    for w in weights:
        model.graph.initializer.remove(w)
    nodes = [*constants, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    info = quantkit.load_model(save(model, tmp_path / "c.onnx"))
    x = data(tmp_path, (32, S, D))
    smoothed, report = smooth_model(info, batches(open_source(x, info), info, 8), alpha=0.5)
    assert report.smoothed["h"] == ["proj0", "proj1", "proj2"]
    feeds = {"x": np.load(x)[:8]}
    np.testing.assert_allclose(
        make_session(smoothed).run(None, feeds)[0], make_session(info.proto).run(None, feeds)[0], rtol=1e-4, atol=1e-5
    )


def test_a_weight_shared_across_activations_is_left_as_it_is():
    """An unrolled RNN's steps read one weight from different activations: smoothing each would copy
    the weight per step (a captcha CRNN's 80 Gemms grew its model 19 -> 69 MB), so none is smoothed,
    while an unshared weight beside them still is."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(D, D)).astype(np.float32), name) for name in ("w_step", "w_own")]
    nodes = [
        helper.make_node("MatMul", ["x", "w_step"], ["h1"], name="step1"),
        helper.make_node("MatMul", ["h1", "w_step"], ["h2"], name="step2"),
        helper.make_node("MatMul", ["h2", "w_own"], ["y"], name="head"),
    ]
    groups = smoothable(float_model(nodes, {"x": ["N", D]}, {"y": ["N", D]}, inits))
    assert {act: [m.name for m in mms] for act, mms in groups.items()} == {"h2": ["head"]}


def test_gemm_with_transposed_weight_and_a_folded_mul(tmp_path):
    info = quantkit.load_model(save(gemm_block(), tmp_path / "g.onnx"))
    x = data(tmp_path, (64, D))
    smoothed, report = smooth_model(info, batches(open_source(x, info), info, 16))
    assert report.folded_into["h"] == "Mul scale_in"
    feeds = {"x": np.load(x)[:16]}
    np.testing.assert_allclose(
        make_session(smoothed).run(None, feeds)[0], make_session(info.proto).run(None, feeds)[0], rtol=1e-4, atol=1e-5
    )


def test_int8_after_smoothing_is_closer_to_fp32(tmp_path):
    path = save(block("ln"), tmp_path / "b.onnx")
    info = quantkit.load_model(path)
    x = data(tmp_path, (64, S, D))
    smoothed, _ = smooth_model(info, batches(open_source(x, info), info, 8))
    smoothed_path = tmp_path / "b.sq.onnx"
    import onnx

    onnx.save(smoothed, str(smoothed_path))
    feeds = {"x": np.load(x)[:32]}
    ref = make_session(info.proto).run(None, feeds)[0]
    scores = {}
    for name, p in (("plain", path), ("smoothed", smoothed_path)):
        m = quantkit.load_model(p)
        ranges = quantkit.calibrate(p, x, quantkit.CalibrationOptions(methods="minmax")).ranges
        q, _ = quantize_model(m, ranges, method="minmax", target="tensorrt")
        scores[name] = sqnr_db(ref, make_session(q).run(None, feeds)[0])
    print(f"INT8 SQNR against FP32: {scores}")
    assert scores["smoothed"] > scores["plain"] + 3, scores


def test_quantize_cli_smoothquant(tmp_path, capsys):
    from quantkit.cli import main

    model = save(block("ln"), tmp_path / "b.onnx")
    x = data(tmp_path, (48, S, D))
    out = tmp_path / "b.sq.int8.onnx"
    assert main(["quantize", str(model), "--smoothquant", "--data", str(x), "--method", "minmax", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SmoothQuant (alpha auto): 3 MatMul/Gemm on 1 activation(s)" in text and "LayerNormalization ln" in text
    feeds = {"x": np.load(x)[:16]}
    ref = make_session(str(model)).run(None, feeds)[0]
    assert sqnr_db(ref, make_session(str(out)).run(None, feeds)[0]) > 30
    assert main(["quantize", str(model), "--smoothquant", "--ranges", str(x), "-o", str(out)]) == 2


def test_int8_sq_is_an_eval_variant(tmp_path):
    model = save(block("ln"), tmp_path / "b.onnx")
    x = data(tmp_path, (48, S, D))
    options = quantkit.EvalOptions(variants="fp32,int8-tensorrt:minmax,int8-sq:minmax", latency=False)
    report = quantkit.evaluate(model, x, options, calib=x)
    plain, smoothed = report.variant("int8-tensorrt:minmax"), report.variant("int8-sq:minmax")
    assert smoothed.error is None and report.metric_names == ["cosine"]
    assert smoothed.fidelity[0].sqnr_db > plain.fidelity[0].sqnr_db + 3


def test_the_search_error_is_what_the_quantized_model_computes(tmp_path):
    """``int8_matmul_error`` (no smoothing) equals the error of quantkit's own Q/DQ MatMul run by
    onnxruntime with max ranges: same activation scale, per-channel weights, rounding."""
    from quantkit.export.smoothquant import int8_matmul_error

    rng = np.random.default_rng(5)
    w = rng.normal(scale=0.2, size=(D, F)).astype(np.float32)
    model = float_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": ["N", D]}, {"y": ["N", F]}, [numpy_helper.from_array(w, "w")]
    )
    path = save(model, tmp_path / "mm.onnx")
    x = rng.normal(size=(256, D)).astype(np.float32) * np.where(np.arange(D) % 9 == 0, 20.0, 1.0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    info = quantkit.load_model(path)
    q, _ = quantize_model(
        info,
        quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax")).ranges,
        method="minmax",
        target="tensorrt",
    )
    got = make_session(q).run(None, {"x": x})[0].astype(np.float64)
    measured = float(np.sum((got - x.astype(np.float64) @ w.astype(np.float64)) ** 2))
    err, energy = int8_matmul_error(x, np.abs(x).max(axis=0), [w], None)
    assert err == pytest.approx(measured, rel=1e-3)
    assert energy == pytest.approx(float(np.sum((x.astype(np.float64) @ w) ** 2)), rel=1e-9)


def residual_block():
    """A post-LN encoder's pattern: the LayerNorm output feeds the projections and the residual Add."""
    model = block("ln")
    graph = model.graph
    graph.node.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
    graph.output.append(helper.make_tensor_value_info("r", graph.output[0].type.tensor_type.elem_type, ["N", S, D]))
    return model


def test_a_layernorm_output_also_read_by_a_residual_is_smoothed_through_an_inserted_mul(tmp_path):
    info = quantkit.load_model(save(residual_block(), tmp_path / "r.onnx"))
    x = data(tmp_path, (32, S, D))
    smoothed, report = smooth_model(info, batches(open_source(x, info), info, 8))
    assert report.folded_into["h"] == "inserted Mul" and report.smoothed["h"] == ["proj0", "proj1", "proj2"]
    before, after = report.matmul_sqnr["h"]
    assert report.chosen_alpha["h"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9) and after > before + 3
    feeds = {"x": np.load(x)[:8]}
    for ref, got in zip(make_session(info.proto).run(None, feeds), make_session(smoothed).run(None, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)  # the residual still reads the original h


def test_a_fixed_alpha_is_applied_as_given_and_bad_alphas_are_refused(tmp_path):
    from quantkit.export.smoothquant import check_alpha

    info = quantkit.load_model(save(block("ln"), tmp_path / "b.onnx"))
    x = data(tmp_path, (32, S, D))
    _, report = smooth_model(info, batches(open_source(x, info), info, 8), alpha=0.5)
    assert report.chosen_alpha == {"h": 0.5} and "alpha 0.5" in report.summary()
    assert check_alpha("AUTO") == "auto" and check_alpha("0.25") == 0.25
    for bad in ("1.5", "-0.1", "x", True, float("nan")):
        with pytest.raises(quantkit.QuantkitError, match="alpha must be"):
            check_alpha(bad)


def test_the_row_reservoir_is_bounded_uniform_and_repeatable():
    from quantkit.export.smoothquant import RowReservoir

    def sample():
        r = RowReservoir(capacity=512, seed=0)
        for start in range(0, 20000, 500):
            r.add(np.arange(start, start + 500, dtype=np.float64)[:, None])
        return r

    a, b = sample(), sample()
    assert a.rows.shape == (512, 1) and a.seen == 20000 and np.array_equal(a.rows, b.rows)
    assert len(np.unique(a.rows)) == 512
    # uniform over the stream: mean 9999.5, standard error 20000 / sqrt(12 * 512) ~ 255
    assert abs(a.rows.mean() - 9999.5) < 4 * 255
    small = RowReservoir(capacity=512)
    small.add(np.arange(10, dtype=np.float64)[:, None])
    assert np.array_equal(small.rows[:, 0], np.arange(10))


def test_without_a_method_the_smoothed_model_gets_the_method_the_check_finds_best(tmp_path, capsys):
    """As the default path does: every INT8 method calibrated in one pass, each one's model checked,
    the best kept (entropy alone is what collapsed PP-OCRv4's recogniser); the model written is the
    one --method names with that method."""
    from quantkit.cli import main

    model = save(block("ln"), tmp_path / "b.onnx")
    x = data(tmp_path, (48, S, D))
    assert main(["quantize", str(model), "--smoothquant", "--data", str(x), "-o", str(tmp_path / "auto.onnx")]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("method: ")]
    chosen = line.split()[1].rstrip(",")
    assert "the best of the calibrated methods" in line and all(m in line for m in ("entropy", "minmax", "percentile", "mse"))
    named = tmp_path / "named.onnx"
    assert main(["quantize", str(model), "--smoothquant", "--data", str(x), "--method", chosen, "-q", "-o", str(named)]) == 0
    assert (tmp_path / "auto.onnx").read_bytes() == named.read_bytes()
