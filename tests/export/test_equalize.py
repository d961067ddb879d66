"""Cross-layer equalization (Nagel et al., 2019): the equalized model computes what the original
computes (float rounding aside), each equalized pair ends with equal per-channel ranges, and
per-tensor INT8 weights lose less."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_model
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.ort import make_session
from quantkit.export.equalize import equalize

C = 8


def chain_model(act2: str = "LeakyRelu") -> onnx.ModelProto:
    """Conv -> BN -> Relu -> depthwise Conv -> act2 -> Conv -> Relu6 (Clip) -> Conv, with channel
    ranges spread over four decades (what makes per-tensor INT8 weights lose the small channels)."""
    rng = np.random.default_rng(0)
    spread = 10.0 ** rng.uniform(-2, 2, size=C)
    w1 = (rng.normal(size=(C, 3, 3, 3)) * spread[:, None, None, None]).astype(np.float32)
    w2 = rng.normal(size=(C, 1, 3, 3)).astype(np.float32)
    w3 = (rng.normal(size=(C, C, 1, 1)) / spread[None, :, None, None]).astype(np.float32)
    w4 = rng.normal(size=(4, C, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (w4, "w4"))]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("b1", rng.normal(size=C)), ("gamma", rng.uniform(0.5, 2, C)), ("beta", rng.normal(size=C)),
        ("mean", rng.normal(size=C)), ("var", rng.uniform(0.5, 2, C)), ("b3", rng.normal(size=C)),
        ("lo", np.array(0.0)), ("hi", np.array(6.0)),
    )]  # fmt: skip
    act = helper.make_node(act2, ["d"], ["e"], name="act2", **({"alpha": 0.1} if act2 == "LeakyRelu" else {}))
    if act2 == "PRelu":
        inits.append(numpy_helper.from_array(rng.uniform(0, 0.3, size=(C, 1, 1)).astype(np.float32), "slope"))
        act = helper.make_node("PRelu", ["d", "slope"], ["e"], name="act2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["c"], name="relu1"),
        helper.make_node("Conv", ["c", "w2"], ["d"], pads=[1, 1, 1, 1], group=C, name="dw"),
        act,
        helper.make_node("Conv", ["e", "w3", "b3"], ["f"], name="pw"),
        helper.make_node("Clip", ["f", "lo", "hi"], ["g"], name="relu6"),
        helper.make_node("Conv", ["g", "w4"], ["y"], name="head"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 8, 8]}, inits)


@pytest.mark.parametrize("act2", ["LeakyRelu", "PRelu", "Relu"])
def test_the_equalized_model_computes_the_same_function(act2):
    model = chain_model(act2)
    equalized, report = equalize(model)
    assert report.folded == 1 and report.pairs == [("conv1", "dw"), ("dw", "pw")]
    assert "relu6" in {*report.skipped.values(), *report.skipped} or "pw" in report.skipped  # Clip is not homogeneous
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref = make_session(model).run(None, {"x": x})[0]
    got = make_session(equalized).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_equalized_pairs_have_equal_ranges_and_per_tensor_int8_loses_less():
    equalized, _ = equalize(chain_model())
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in equalized.graph.initializer}
    conv1_w = next(n for n in equalized.graph.node if n.name == "conv1").input[1]
    r_out = np.abs(w["w2"]).reshape(C, -1).max(axis=1)  # the depthwise Conv: output ranges ...
    r_next = np.abs(w["w3"]).transpose(1, 0, 2, 3).reshape(C, -1).max(axis=1)  # ... equal the next Conv's input ranges
    np.testing.assert_allclose(r_out, r_next, rtol=1e-3)
    r1 = np.abs(w[conv1_w]).reshape(C, -1).max(axis=1)
    r_in = np.abs(w["w2"]).reshape(C, -1).max(axis=1)
    np.testing.assert_allclose(r1, r_in, rtol=1e-3)

    def worst_input_channel_sqnr(a: np.ndarray) -> float:
        """Per-tensor INT8 (one scale for the tensor): the SQNR of its worst input channel."""
        scale = np.abs(a).max() / 127
        err = np.round(a / scale) * scale - a
        return min(10 * np.log10(np.sum(a[:, i] ** 2) / max(np.sum(err[:, i] ** 2), 1e-30)) for i in range(a.shape[1]))

    original = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in chain_model().graph.initializer}
    # before, the channels scaled down by the spread were lost in the tensor's one scale
    assert worst_input_channel_sqnr(w["w3"]) > worst_input_channel_sqnr(original["w3"]) + 10


def test_pairs_that_are_not_exact_are_left_alone():
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(size=(C, 3, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w2")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="sig"),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="c2"),
    ]
    model = float_model(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", C, 4, 4]}, inits)
    equalized, report = equalize(model)
    assert report.pairs == [] and "Sigmoid" in report.skipped["c1"]
    assert [i.raw_data for i in equalized.graph.initializer] == [i.raw_data for i in model.graph.initializer]
    assert TensorProto.FLOAT == equalized.graph.initializer[0].data_type


def test_quantize_with_cle_and_bias_correction(tmp_path, capsys):
    """The pipeline: --algorithms cle calibrates the equalized model on the data; bias correction
    rewrites the Q/DQ model's biases; both are recorded in the model's metadata, and per-tensor-like
    channel spreads that all-INT8 loses are recovered (SQNR against FP32 on the same data)."""
    from conftest import save

    from quantkit.cli import main

    model = save(chain_model(), tmp_path / "chain.onnx")
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    calibrate = ["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--method", "all"]
    assert main([*calibrate, "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    base = ["quantize", str(model), "--method", "minmax", "--high-precision", "fp32", "-q"]
    plain, tuned = tmp_path / "plain.onnx", tmp_path / "tuned.onnx"
    # all-INT8 collapses: per-tensor activation scales lose the channels four decades below the others
    # (without algorithms: auto's empirical bias correction already rescues this chain)
    plain_args = [*base, "--ranges", str(tmp_path / "r" / "ranges.json"), "--algorithms", "none"]
    assert main([*plain_args, "-o", str(plain)]) == 3
    assert main([*plain_args, "--force", "-o", str(plain)]) == 0
    algorithms = ["--algorithms", "cle,bias-correction", "--data", str(tmp_path / "x.npy")]
    assert main([*base, *algorithms, "-o", str(tuned)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tuned)).metadata_props}
    assert meta["quantkit.algorithms"] == "cle,bias-correction"
    ref = make_session(model).run(None, {"x": x})[0]

    def sqnr(path) -> float:
        got = make_session(str(path)).run(None, {"x": x})[0]
        return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))

    assert sqnr(tuned) > sqnr(plain) + 10
    assert main([*base, "--ranges", str(tmp_path / "r" / "ranges.json"), "--algorithms", "cle", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "cle rewrites the model" in capsys.readouterr().err


def test_weights_in_constant_nodes_are_equalized_too():
    """Opset-11 exports (PaddlePaddle's) keep Conv weights in Constant nodes, not initializers."""
    model = chain_model("Relu")
    for init in list(model.graph.initializer):
        model.graph.node.insert(0, helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}"))
    del model.graph.initializer[:]
    equalized, report = equalize(model)
    assert report.pairs == [("conv1", "dw"), ("dw", "pw")]
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref, got = (make_session(m).run(None, {"x": x})[0] for m in (model, equalized))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def high_bias_model(pads: int = 0) -> onnx.ModelProto:
    """Conv(1x1) -> BN -> Relu -> Conv: BN's beta puts half the channels far above zero (5 to 8),
    with gamma 0.5; inputs within +-1 keep BN's outputs within beta +- 0.3, above beta - 3 gamma,
    the paper's bound. The weights' ranges are equal already (0.1 both sides once BN is folded), so
    the equalization leaves the scales at 1 and the absorption is seen alone."""
    rng = np.random.default_rng(4)
    beta = np.array([5.0, 0.2, 8.0, -1.0, 6.0, 0.0, 7.0, 0.5])
    w1 = 0.2 * np.sqrt(1 + 1e-5) * np.sign(rng.normal(size=(C, 3, 1, 1)))  # x0.5 by the folded BN: 0.1
    w2 = 0.1 * np.sign(rng.normal(size=(4, C, 1 + 2 * pads, 1 + 2 * pads)))
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("w1", w1), ("b1", np.zeros(C)), ("gamma", np.full(C, 0.5)),
        ("beta", beta), ("mean", np.zeros(C)), ("var", np.ones(C)), ("w2", w2),
    )]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1"),
        helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[pads] * 4, name="conv2"),
    ]
    return float_model(nodes, {"x": ["N", 3, 6, 6]}, {"y": ["N", 4, 6, 6]}, inits)


def test_high_bias_absorption_moves_the_bound_into_the_next_conv_and_keeps_the_function():
    """Nagel et al. 2019, section 4.1: c = max(0, beta - 3 gamma) leaves the ReLU's channels and
    reaches the next Conv's bias as W2 c; the network's outputs stay the same where the channels
    stay above c, and the ReLU output's range (what its activation Q/DQ spans) shrinks by c."""
    model = high_bias_model()
    equalized, report = equalize(model)
    assert report.absorbed == {"conv1": 4}  # beta 5, 8, 6 and 7 exceed 3 gamma = 1.5
    x = np.random.default_rng(1).uniform(-1, 1, size=(8, 3, 6, 6)).astype(np.float32)
    ref = make_session(model).run(None, {"x": x})[0]
    got = make_session(equalized).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    def relu_max(m: onnx.ModelProto) -> float:
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
        return float(make_session(probe).run(["r"], {"x": x})[0].max())

    # the per-tensor range was set by the channel at beta 8 (8.3 at most); less its c = 6.5, the
    # channels top out at 1.8 (beta - 3 gamma = 1.5, plus the data's 0.3)
    assert relu_max(model) == pytest.approx(8.3, abs=0.05) and relu_max(equalized) == pytest.approx(1.8, abs=0.05)


def test_a_padded_next_conv_takes_no_absorbed_bias():
    """Its border would read zeros where the ReLU's channel read c."""
    _, report = equalize(high_bias_model(pads=1))
    assert report.absorbed == {}


def depthwise_model() -> onnx.ModelProto:
    """Conv(1x1) -> HardSwish -> depthwise Conv(3x3, padded) -> Conv(1x1): the HardSwish (not
    homogeneous: CLE cannot pass it) carries channels four decades apart into the depthwise Conv."""
    rng = np.random.default_rng(6)
    spread = 10.0 ** rng.uniform(-2, 2, size=C)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("w1", rng.normal(size=(C, 3, 1, 1)) * spread[:, None, None, None]), ("b1", rng.normal(size=C)),
        ("wd", rng.normal(size=(C, 1, 3, 3))), ("bd", rng.normal(size=C)), ("w3", rng.normal(size=(4, C, 1, 1))),
    )]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1"),
        helper.make_node("HardSwish", ["a"], ["h"], name="hswish"),
        helper.make_node("Conv", ["h", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=C, name="dw"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="pw"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 8, 8]}, inits)


def test_depthwise_equalization_keeps_the_function_and_gives_every_input_channel_the_full_range(tmp_path):
    """The depthwise Conv reads x * t (t_c = M / m_c) with its weights / t: exact in FP32; every
    input channel then spans the widest one's range, and a per-tensor INT8 input with per-channel
    INT8 weights loses far less of the depthwise output (its output channel c sees only input c)."""
    from conftest import save

    from quantkit.data import batches, open_source
    from quantkit.export.equalize import equalize_depthwise_inputs
    from quantkit.model import load_model

    path = save(depthwise_model(), tmp_path / "dw.onnx")
    x = np.random.default_rng(7).normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    info = load_model(path)
    equalized, report = equalize_depthwise_inputs(info, batches(open_source(tmp_path / "x.npy", info), info, 8))
    assert list(report.spread) == ["dw"] and report.spread["dw"] > 10
    ref = make_session(info.proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(equalized).run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    def dw_io(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dw = next(n for n in model.graph.node if n.name == "dw")
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in (dw.input[0], "d")])
        inputs, out = make_session(probe).run([dw.input[0], "d"], {"x": x})
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[dw.input[1]]
        return inputs, weights, out

    before, after = dw_io(info.proto), dw_io(equalized)
    from quantkit.export.equalize import MAX_GAIN

    # every channel at the widest's range, but for a gain of at most MAX_GAIN (this model spreads four decades)
    was = np.abs(before[0]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(np.abs(after[0]).max(axis=(0, 2, 3)), np.minimum(was.max(), was * MAX_GAIN), rtol=1e-5)

    def int8_dw_sqnr(inputs: np.ndarray, weights: np.ndarray, out: np.ndarray) -> float:
        step = np.abs(inputs).max() / 127
        wstep = np.abs(weights).reshape(C, -1).max(axis=1).reshape(-1, 1, 1, 1) / 127
        bias = {i.name: numpy_helper.to_array(i) for i in info.proto.graph.initializer}["bd"]
        node = helper.make_node("Conv", ["i", "w", "b"], ["o"], pads=[1, 1, 1, 1], group=C)
        conv = float_model([node], {"i": ["N", C, 8, 8]}, {"o": ["N", C, 8, 8]}, [numpy_helper.from_array(bias, "b")])
        conv.graph.initializer.append(numpy_helper.from_array((np.round(weights / wstep) * wstep).astype(np.float32), "w"))
        got = make_session(conv).run(None, {"i": (np.round(inputs / step) * step).astype(np.float32)})[0]
        per_channel = np.sum(out**2, axis=(0, 2, 3)) / np.sum((got - out) ** 2, axis=(0, 2, 3))
        return float(10 * np.log10(per_channel.min()))  # the worst output channel: the quiet channels' loss

    assert int8_dw_sqnr(*after) > int8_dw_sqnr(*before) + 20


def test_quantize_with_depthwise_equalization(tmp_path, capsys):
    from conftest import save

    from quantkit.cli import main

    model = save(depthwise_model(), tmp_path / "dw.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(8).normal(size=(32, 3, 8, 8)).astype(np.float32))
    args = ["quantize", str(model), "--algorithms", "depthwise-equalization", "--high-precision", "fp32", "--force", "-q"]
    assert main([*args, "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "q.onnx")]) == 0
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}["quantkit.algorithms"] == "depthwise-equalization"
    assert main([*args, "--ranges", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.onnx")]) == 2
    assert "depthwise-equalization rewrites the model" in capsys.readouterr().err
