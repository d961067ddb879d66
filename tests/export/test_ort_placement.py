"""The onnxruntime target follows onnxruntime's own QDQ fusion rules, checked on its optimized graph.

The oracle is onnxruntime itself: ``optimized_graph_check`` reads back the graph its CPU provider
builds (``optimized_model_filepath``), so every assertion about integer kernels is what
onnxruntime really made, not what quantkit meant to place. Speed is never timed here: the
measured-placement search is checked against a deterministic cost model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper

import quantkit
from quantkit.backends.ort import optimized_graph_check
from quantkit.cli import main
from quantkit.export.qdq import quantize_model
from quantkit.graph.passes import hardswish_as_gate
from quantkit.model import load_model
from quantkit.options import ExportOptions
from quantkit.tuning import speed

RNG = np.random.default_rng(7)


def run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def w(name, *shape, scale=0.3):
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape), (RNG.normal(size=shape) * scale).astype(np.float32).ravel())


def scalar(name, value):
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def hardswish_nodes(form: str, x: str, y: str) -> list[onnx.NodeProto]:
    if form == "op":
        return [helper.make_node("HardSwish", [x], [y], name=f"hs_{y}")]
    add = helper.make_node("Add", [x, "three"], [f"{y}_a"], name=f"add_{y}")
    clip = helper.make_node("Clip", [f"{y}_a", "zero", "six"], [f"{y}_c"], name=f"clip_{y}")
    if form == "gate-first":  # x * (relu6(x + 3) / 6)
        return [add, clip, helper.make_node("Div", [f"{y}_c", "six"], [f"{y}_g"], name=f"div_{y}"),
                helper.make_node("Mul", [x, f"{y}_g"], [y], name=f"mul_{y}")]  # fmt: skip
    return [
        add,
        clip,
        helper.make_node("Mul", [x, f"{y}_c"], [f"{y}_m"], name=f"mul_{y}"),
        helper.make_node("Div", [f"{y}_m", "six"], [y], name=f"div_{y}"),
    ]  # fmt: skip  (PaddlePaddle's form)


def hardswish_cnn(form: str) -> onnx.ModelProto:
    """conv -> hard-swish -> depthwise conv -> hard-swish -> maxpool -> conv, with an SE-style gate Mul."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    nodes += hardswish_nodes(form, "c1", "h1")
    nodes += [helper.make_node("Conv", ["h1", "wd"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dwconv")]
    nodes += hardswish_nodes(form, "c2", "h2")
    nodes += [
        helper.make_node("GlobalAveragePool", ["h2"], ["p"], name="gap"),
        helper.make_node("Conv", ["p", "wse"], ["s"], name="se_conv"),
        helper.make_node("Sigmoid", ["s"], ["g"], name="se_gate"),
        helper.make_node("Mul", ["h2", "g"], ["se"], name="se_mul"),
        helper.make_node("MaxPool", ["se"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["mp", "w3"], ["y"], name="conv3"),
    ]
    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("wd", 8, 1, 3, 3), w("wse", 8, 8, 1, 1), w("w3", 4, 8, 1, 1)]
    inits += [scalar("three", 3.0), scalar("zero", 0.0), scalar("six", 6.0)]
    return float_model(nodes, {"x": ["N", 3, 16, 16]}, {"y": ["N", 4, 8, 8]}, inits)


@pytest.mark.parametrize("form", ["op", "gate-first", "paddle"])
def test_hardswish_becomes_an_exact_hardsigmoid_gate(form):
    model = hardswish_cnn(form)
    graph = gs.import_onnx(model)
    derived = hardswish_as_gate(graph)
    rewritten = gs.export_onnx(graph)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("HardSigmoid") == 2 and not {"HardSwish", "Add", "Clip", "Div"} & set(ops)
    assert ops.count("Mul") == 3  # the two hard-swish products and the SE gate
    gates = [k for _, _, k in derived].count("hardsigmoid")
    assert gates == (0 if form == "gate-first" else 2)  # that form keeps its calibrated gate tensor
    x = RNG.normal(size=(2, 3, 16, 16)).astype(np.float32) * 2
    np.testing.assert_allclose(run(rewritten, x), run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["op", "paddle"])
def test_integer_kernels_run_where_onnxruntime_fuses_them(tmp_path, form):
    """Every conv, both hard-swish gates and products, the SE gate and Mul and the MaxPool run as
    integer kernels, nothing float between them (the HardSigmoid gates, which onnxruntime has no
    integer kernel for, run as QLinearAdd); the model stays close to FP32."""
    model = hardswish_cnn(form)
    path = save(model, tmp_path / "m.onnx")
    x = RNG.normal(size=(64, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "calib.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    check = optimized_graph_check(q)
    # the last conv writes the float graph output, so it has no QuantizeLinear to fuse with
    assert check.integer_kernels.get("QLinearConv") == 3
    assert check.integer_kernels.get("QLinearMul") == 3 and check.integer_kernels.get("QLinearSigmoid") == 1
    assert check.integer_kernels.get("QLinearAdd") == 2 and report.hardsigmoids_as_add and check.float_between == {}
    assert "HardSigmoid" not in report.float_op_counts and "2 HardSigmoid(s) written as an int8 Add" in report.summary()
    # MaxPool runs on uint8 because its output carries its input's scale (the selector drops the pair)
    assert "MaxPool" not in check.float_between
    assert report.activation_params["mp"] == report.activation_params["se"]
    y, ref = run(q, x[:8]), run(model, x[:8])
    sqnr = 10 * np.log10((ref**2).sum() / ((y - ref) ** 2).sum())
    assert sqnr > 25


def test_a_constant_mul_folds_into_the_conv_before_it_and_is_an_integer_mul_elsewhere(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "k"], ["m"], name="scale"),
        helper.make_node("Sigmoid", ["m"], ["s"], name="act"),
        helper.make_node("Mul", ["s", "k"], ["g"], name="gate_scale"),
        helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2"),
    ]
    model = float_model(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 2, 4, 4]}, [w("w1", 4, 3, 1, 1), w("w2", 2, 4, 1, 1), scalar("k", 0.5)])
    path = save(model, tmp_path / "m.onnx")
    x = RNG.normal(size=(8, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    assert ("conv", "scale") in report.folded_batchnorms and "conv" in report.int8_nodes
    # the Sigmoid's output was not calibrated: the scalar Mul after it stays float, as it always did
    assert report.kept_float["gate_scale"] == "Mul with a constant operand, no range for its input"
    assert optimized_graph_check(q).integer_kernels.get("QLinearConv") == 1  # conv2 writes the float output
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), rtol=0.1, atol=0.1)
    # with its input calibrated, x * 0.5 runs as QLinearMul, the 0.5 an exact uint8 constant (255 steps of 0.5/255)
    everything = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax", all_tensors=True)).ranges
    q, report = quantize_model(load_model(path), everything, target="onnxruntime")
    assert "gate_scale" in report.int8_nodes and optimized_graph_check(q).integer_kernels.get("QLinearMul") == 1
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and consts.get(n.input[0], np.zeros(2)).ndim == 0
              and consts[n.input[0]].dtype == np.uint8 and n.input[0].startswith("k"))  # fmt: skip
    value = (consts[dq.input[0]].astype(np.float64) - consts[dq.input[2]]) * consts[dq.input[1]]
    assert value == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), rtol=0.1, atol=0.1)


def test_optimized_graph_check_names_the_float_op_between_integer_kernels():
    """A hand-built Q/DQ graph: two convs around a Tanh, which onnxruntime has no integer kernel for."""
    q = []

    def qdq(t, scale):
        q.extend([
            helper.make_node("QuantizeLinear", [t, f"{t}_s", f"{t}_z"], [f"{t}_q"]),
            helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_s", f"{t}_z"], [f"{t}_dq"]),
        ])  # fmt: skip
        return [helper.make_tensor(f"{t}_s", TensorProto.FLOAT, [], [scale]), helper.make_tensor(f"{t}_z", TensorProto.UINT8, [], [128])]

    inits = qdq("x", 0.02) + qdq("c1", 0.05) + qdq("t", 0.01)
    for name, shape in (("w1", (4, 3, 1, 1)), ("w2", (2, 4, 1, 1))):
        inits += [
            helper.make_tensor(f"{name}_i8", TensorProto.INT8, shape, RNG.integers(-60, 60, size=shape).ravel()),
            helper.make_tensor(f"{name}_s", TensorProto.FLOAT, [], [0.01]),
            helper.make_tensor(f"{name}_z", TensorProto.INT8, [], [0]),
        ]
        q.append(helper.make_node("DequantizeLinear", [f"{name}_i8", f"{name}_s", f"{name}_z"], [name]))
    q += [
        helper.make_node("Conv", ["x_dq", "w1"], ["c1"]),
        helper.make_node("Tanh", ["c1_dq"], ["t"]),
        helper.make_node("Conv", ["t_dq", "w2"], ["y"]),
    ]
    model = float_model(q, {"x": [1, 3, 4, 4]}, {"y": [1, 2, 4, 4]}, inits)
    check = optimized_graph_check(model)
    assert check.integer_kernels == {"QLinearConv": 1} or check.integer_kernels.get("QLinearConv") == 1
    assert check.float_between == {"Tanh": 1}
    assert "Tanh x1" in check.summary()


def test_kernel_groups_tell_depthwise_from_dense(tmp_path):
    model = load_model(save(hardswish_cnn("op"), tmp_path / "m.onnx"))
    groups = speed.kernel_groups(model, ["conv1", "dwconv", "se_conv", "conv3", "se_mul", "pool"])
    assert groups == {
        "1x1 Conv": ["se_conv", "conv3"],
        "Conv": ["conv1"],
        "MaxPool": ["pool"],
        "Mul": ["se_mul"],
        "depthwise Conv": ["dwconv"],
    }


def test_measured_placement_keeps_float_exactly_the_groups_whose_int8_is_slower(tmp_path, monkeypatch):
    """With a cost model in place of the clock (int8 depthwise slower than float, everything
    else faster), the search keeps the depthwise conv alone in float and says int8 pays."""
    path = save(hardswish_cnn("paddle"), tmp_path / "m.onnx")
    x = RNG.normal(size=(32, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    group_of_weight = {"w1": "Conv", "wd": "depthwise Conv", "wse": "1x1 Conv", "w3": "1x1 Conv"}
    cost = {"int8": {"Conv": 1.0, "depthwise Conv": 5.0, "1x1 Conv": 0.5}, "float": {"Conv": 2.0, "depthwise Conv": 1.0, "1x1 Conv": 1.0}}

    def fake_compare(models, sample, batches, **_):
        out = []
        for m in models:
            total = 0.0
            for n in m.graph.node:
                if n.op_type == "Conv":
                    kind = "int8" if n.input[1].endswith("_dequantized") else "float"
                    total += cost[kind][group_of_weight[n.input[1].removesuffix("_dequantized")]]
            out.append({b: total * b for b in batches})
        return out

    monkeypatch.setattr(speed, "compare_ms", fake_compare)
    choice = speed.fastest_placement(load_model(path), ranges, ExportOptions("minmax", "onnxruntime"), {"x": x[:1]}, (1, 32))
    assert list(choice.kept_float) == ["depthwise Conv"] and choice.kept_float["depthwise Conv"] == ["dwconv"]
    assert choice.plan.precision_of("dwconv") == "fp32" and choice.plan.precision_of("conv1") == "int8"
    assert choice.all_int8_ms == {1: 7.0, 32: 224.0} and choice.chosen_ms == {1: 3.0, 32: 96.0}
    assert choice.fp32_ms == {1: 5.0, 32: 160.0} and choice.int8_pays


def test_cli_prints_the_optimized_graph_and_refuses_measuring_other_targets(tmp_path, capsys):
    path = save(hardswish_cnn("op"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(size=(16, 3, 16, 16)).astype(np.float32))
    assert (
        main(["calibrate", str(path), "--data", str(tmp_path / "c.npz"), "--method", "minmax", "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    )
    ranges = str(tmp_path / "r" / "ranges.json")
    assert main(["quantize", str(path), "--ranges", ranges, "--target", "onnxruntime", "-o", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime's optimized CPU graph:" in out and "QLinearMul x3" in out
    wrong = (
        ["--measure-speed", "1"],
        ["--target", "onnxruntime", "--measure-speed", "0,x"],
        ["--target", "onnxruntime", "--measure-speed", "nan"],
        ["--target", "onnxruntime", "--format", "int4-weights", "--measure-speed", "1"],
        ["--target", "onnxruntime", "--smoothquant", "--data", str(tmp_path / "c.npz"), "--measure-speed", "1"],
    )
    for extra in wrong:
        assert main(["quantize", str(path), "--ranges", ranges, *extra, "-o", str(tmp_path / "bad.onnx")]) == 2
        assert "--measure-speed" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    before = path.read_bytes()
    assert main(["quantize", str(path), "--ranges", ranges, "--target", "onnxruntime", "--measure-speed", "1", "-o", str(path)]) == 2
    assert path.read_bytes() == before and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(("lo", "hi"), [(-5.0, 4.0), (-1.0, 2.0), (-6.0, -2.0), (0.5, 9.0)])
def test_hardswish_range_from_its_input_range_matches_dense_sampling(lo, hi):
    from quantkit.export.qdq import _hardswish_bounds

    v = np.linspace(lo, hi, 200_001)
    y = v * np.clip(v + 3, 0, 6) / 6
    assert _hardswish_bounds(lo, hi) == pytest.approx((y.min(), y.max()), abs=1e-6)


def test_kernel_groups_read_weights_held_in_constant_nodes(tmp_path):
    """PaddlePaddle's exports hold conv weights in Constant nodes, not initializers."""
    model = hardswish_cnn("op")
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in inits]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    groups = speed.kernel_groups(load_model(save(model, tmp_path / "m.onnx")), ["conv1", "dwconv", "se_conv", "conv3"])
    assert groups == {"1x1 Conv": ["se_conv", "conv3"], "Conv": ["conv1"], "depthwise Conv": ["dwconv"]}


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_a_classifier_head_runs_as_an_integer_kernel(tmp_path, op):
    """Conv -> pool -> Flatten -> Gemm, or MatMul + bias Add (PaddlePaddle's export) -> Softmax.
    Both need the Q on their output: onnxruntime fuses the 2-D MatMul and its bias into a Gemm,
    and DQ -> Gemm -> Q into QGemm (DQ -> Gemm without the Q stays float)."""
    head = (
        [helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1)]
        if op == "Gemm"
        else [helper.make_node("MatMul", ["f", "wf"], ["mm"], name="fc"), helper.make_node("Add", ["mm", "bf"], ["logits"], name="bias")]
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        *head,
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    wf = w("wf", 5, 16) if op == "Gemm" else w("wf", 16, 5)
    model = float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 5]}, [w("w1", 16, 3, 3, 3), wf, w("bf", 5)])  # M = N: not a GEMV
    path = save(model, tmp_path / "head.onnx")
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    assert "fc" in report.int8_nodes
    assert optimized_graph_check(q).integer_kernels.get("QGemm") == 1
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), atol=0.05)


def _gate_model(alpha: float, beta: float, x_scale: float, x_zp: int, out_scale: float, out_zp: int, identity: bool) -> onnx.ModelProto:
    """x -> Q -> DQ [-> Identity] -> HardSigmoid -> Q -> DQ -> y, the pattern quantkit's placement leaves."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd"),
    ]
    gate_in = "xd"
    if identity:
        nodes.append(helper.make_node("Identity", ["xd"], ["xi"], name="ident"))
        gate_in = "xi"
    nodes += [
        helper.make_node("HardSigmoid", [gate_in], ["g"], alpha=alpha, beta=beta, name="gate"),
        helper.make_node("QuantizeLinear", ["g", "gs", "gz"], ["gq"], name="gq"),
        helper.make_node("DequantizeLinear", ["gq", "gs", "gz"], ["y"], name="gd"),
    ]
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [x_scale]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [x_zp]),
        helper.make_tensor("gs", TensorProto.FLOAT, [], [out_scale]),
        helper.make_tensor("gz", TensorProto.UINT8, [], [out_zp]),
    ]
    return float_model(nodes, {"x": [1, 256]}, {"y": [1, 256]}, inits)


def _rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    from quantkit.export import qdq

    graph = gs.import_onnx(model)
    done = qdq._hardsigmoids_as_add(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.opset_import[0].version = model.opset_import[0].version
    return out, done


@pytest.mark.parametrize("alpha,beta,identity", [(1 / 6, 0.5, False), (0.2, 0.5, True), (0.25, 0.3, False)])
def test_hardsigmoid_as_integer_add_is_exact(alpha, beta, identity):
    """Every uint8 input level, both clips reached: the rewritten gate, run by onnxruntime's fused
    QLinearAdd and by plain Q/DQ semantics, gives the quantized levels that NumPy computes from
    HardSigmoid's definition, clip(alpha * x + beta, 0, 1), quantized at the output's scale."""
    x_scale, x_zp, out_scale = 0.06, 128, 1 / 255  # x in [-7.7, 7.6]: past both corners (-3 and 3 for 1/6)
    model = _gate_model(alpha, beta, x_scale, x_zp, out_scale, 0, identity)
    rewritten, done = _rewrite(model)
    assert done == ["gate"] and "HardSigmoid" not in [n.op_type for n in rewritten.graph.node]
    levels = np.arange(256, dtype=np.float64)
    x = ((levels - x_zp) * np.float32(x_scale)).astype(np.float32)[None]
    reference = np.clip(np.round(np.clip(alpha * x.astype(np.float64) + beta, 0, 1) / np.float32(out_scale)), 0, 255)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = np.round(run(rewritten, x, level) / np.float32(out_scale))
        assert np.abs(got - reference).max() <= 1  # fixed-point requantization: a rounding tie may go either way
        assert (got == reference).mean() >= 0.98
    assert optimized_graph_check(rewritten).integer_kernels.get("QLinearAdd") == 1


@pytest.mark.parametrize("out_scale,out_zp,alpha", [(2 / 255, 0, 1 / 6), (1 / 255, 10, 1 / 6), (1 / 255, 0, -0.2)])
def test_hardsigmoid_keeps_float_where_the_output_range_would_not_clip_like_it(out_scale, out_zp, alpha):
    """An output Q that can hold values above 1 (or below 0), or a negative slope: the Q's saturation
    is not HardSigmoid's clip, so the gate stays a float HardSigmoid."""
    _, done = _rewrite(_gate_model(alpha, 0.5, 0.06, 128, out_scale, out_zp, False))
    assert done == []


def test_identity_is_absorbed_and_a_hardswish_read_by_no_int8_op_gets_its_range(tmp_path):
    """PaddlePaddle's exports: conv -> bias Add -> Identity -> Relu (one requantization, after the
    Relu), and a last HardSwish read only by x * k (its range follows from its input's)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "b1"], ["cb"], name="bias"),
        helper.make_node("Identity", ["cb"], ["ci"], name="ident"),
        helper.make_node("Relu", ["ci"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("HardSwish", ["c2"], ["h"], name="hswish"),
        helper.make_node("Mul", ["h", "k"], ["m"], name="dropout_scale"),
        helper.make_node("Conv", ["m", "w3"], ["y"], name="conv3"),
    ]
    inits = [w("w1", 4, 3, 1, 1), w("b1", 1, 4, 1, 1), w("w2", 4, 4, 1, 1), w("w3", 2, 4, 1, 1), scalar("k", 0.9)]
    model = float_model(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 2, 4, 4]}, inits)
    path = save(model, tmp_path / "m.onnx")
    x = RNG.normal(size=(16, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    assert "r" in ranges.tensors and "cb" not in ranges.tensors and "h" not in ranges.tensors
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    assert {"conv", "conv2", "dropout_scale", "conv3"} <= set(report.int8_nodes) and report.hardsigmoids_as_add
    grid = np.linspace(ranges.tensors["c2"].min, ranges.tensors["c2"].max, 100001)
    hswish = grid * np.clip(grid / 6 + 0.5, 0, 1)  # the range by dense sampling of the definition
    scale, zp = report.activation_params["h"]
    assert scale * 255 == pytest.approx(hswish.max() - min(hswish.min(), 0), rel=1e-4) and zp == round(-hswish.min() / scale)
    check = optimized_graph_check(q)
    assert check.float_between == {} and check.quantize == 1, check.summary()  # the input's Q, nothing requantized twice
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), rtol=0.1, atol=0.1)


def test_a_gemm_writing_the_graph_output_stays_float(tmp_path):
    """Conv -> pool -> Flatten -> Gemm -> logits (the output): graph outputs stay float, and without
    a Q after it onnxruntime runs DQ -> Gemm in float, dequantizing the weights at every run. The
    Gemm keeps its float weights, so its output is FP32's Gemm of the dequantized pool output."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    model = float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 5]}, [w("w1", 16, 3, 3, 3), w("wf", 5, 16), w("bf", 5)])
    path = save(model, tmp_path / "head.onnx")
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    assert "fc" not in report.int8_nodes and report.kept_float["fc"].startswith("Gemm writing a graph output")
    check = optimized_graph_check(q)
    assert check.integer_kernels.get("QLinearConv") == 1 and check.dequantize == 1  # the pool output's, no weight DQ
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    np.testing.assert_array_equal(weights["wf"], onnx.numpy_helper.to_array(model.graph.initializer[1]))
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), atol=0.05)


def test_convtranspose_stays_float_for_onnxruntime_and_is_quantized_for_tensorrt(tmp_path):
    """A segmentation head's upsampling ConvTranspose: onnxruntime's CPU provider fuses no Q/DQ
    around it (its optimized graph keeps a float ConvTranspose between DQ and Q), so the onnxruntime
    target leaves it float with its float weights; TensorRT fuses it, so its target quantizes it."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "wt"], ["u"], name="up", strides=[2, 2]),
        helper.make_node("Sigmoid", ["u"], ["y"], name="prob"),
    ]
    model = float_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 1, 16, 16]}, [w("w1", 8, 3, 3, 3), w("wt", 8, 1, 2, 2)])
    path = save(model, tmp_path / "seg.onnx")
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    assert "up" not in report.int8_nodes and "no integer kernel" in report.kept_float["up"]
    weights = {i.name: i for i in q.graph.initializer}
    assert weights["wt"].data_type == TensorProto.FLOAT
    check = optimized_graph_check(q)
    assert check.integer_kernels.get("QLinearConv") == 1 and check.float_between == {}, check.summary()
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), atol=0.05)
    _, trt = quantize_model(load_model(path), ranges, target="tensorrt")
    assert "up" in trt.int8_nodes and "wt" in trt.weight_scales


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_runs_on_uint8_with_its_input_scale(tmp_path, mode):
    """An FPN's upsampling: a nearest Resize's output takes its input's scale whatever the method's
    ranges, so onnxruntime drops the Q/DQ pair and resizes the uint8 tensor (a copy never leaves
    the input's range); the result is FP32's within quantization error."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["u"], name="up", mode=mode),
        helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2"),
    ]
    inits = [w("w1", 4, 3, 3, 3), w("w2", 2, 4, 1, 1), helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])]
    model = float_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 2, 16, 16]}, inits)
    path = save(model, tmp_path / "fpn.onnx")
    x = RNG.normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    ranges = quantkit.calibrate(path, tmp_path / "c.npz", quantkit.CalibrationOptions(methods="percentile")).ranges
    q, report = quantize_model(load_model(path), ranges, target="onnxruntime")
    check = optimized_graph_check(q)
    if mode == "nearest":
        assert "up" in report.int8_nodes and report.activation_params["u"] == report.activation_params["c"]
        assert check.float_between == {} and check.integer_kernels.get("QLinearConv") == 1, check.summary()
    else:  # onnxruntime keeps a linear Resize float between DQ and Q: quantkit does not pretend otherwise
        assert "up" not in report.int8_nodes and "interpolates it in float" in report.kept_float["up"]
        assert check.float_between == {"Resize": 1}
    np.testing.assert_allclose(run(q, x[:1]), run(model, x[:1]), atol=0.1)
