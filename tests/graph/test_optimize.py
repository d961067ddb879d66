import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, float_model, save
from onnx import TensorProto, helper

import quantkit
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.graph.optimize import optimize_model
from quantkit.model import load_model

RNG = np.random.default_rng(0)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def close(a, b, rtol=1e-5):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * max(1e-6, float(np.abs(x).max())))


def model_of(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def w(name, *shape):
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape), RNG.normal(size=shape).astype(np.float32).ravel())


def vi(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) if shape else None)


@pytest.mark.parametrize("opset", [11, 17])
def test_three_sibling_1x1_convs_with_different_widths_merge(opset):
    nodes = [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}") for i in range(3)]
    inits = [w(f"w{i}", c, 4, 1, 1) for i, c in enumerate((2, 5, 3))] + [w(f"b{i}", c) for i, c in enumerate((2, 5, 3))]
    model = model_of(nodes, [vi("x", 2, 4, 6, 6)], [vi(f"y{i}") for i in range(3)], inits, opset)
    out, report = optimize_model(model, ["horizontal"])
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == 1 and ops.count("Split") == 1
    assert [(f.kind, f.replaced) for f in report.fusions] == [("horizontal", ["conv0", "conv1", "conv2"])]
    x = {"x": RNG.normal(size=(2, 4, 6, 6)).astype(np.float32)}
    close(run(model, x), run(out, x))


@pytest.mark.parametrize("act", ["Relu", "Clip", "HardSwish"])
def test_shared_activation_moves_before_the_split_and_a_concat_reads_the_merged_tensor(act):
    """Conv+act per branch becomes one Conv+act (the fusion TensorRT makes) and one Split; a Concat
    of all the branches in order reads the merged tensor, inside a longer Concat too."""
    extra = ["lo", "hi"] if act == "Clip" else []
    nodes = [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}") for i in range(3)]
    nodes += [helper.make_node(act, [f"c{i}", *extra], [f"a{i}"], name=f"act{i}") for i in range(3)]
    nodes += [
        helper.make_node("Sigmoid", ["x"], ["s"], name="side"),
        helper.make_node("Concat", ["s", "a0", "a1", "a2", "s"], ["y"], axis=1, name="cat"),
    ]
    inits = [w(f"w{i}", c, 4, 1, 1) for i, c in enumerate((2, 5, 3))] + [w(f"b{i}", c) for i, c in enumerate((2, 5, 3))]
    inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0])]
    model = model_of(nodes, [vi("x", 2, 4, 6, 6)], [vi("y", 2, 18, 6, 6)], inits)
    out, report = optimize_model(model, ["horizontal", "concat"])
    ops = [n.op_type for n in out.graph.node]
    assert sorted(ops) == sorted(["Conv", act, "Sigmoid", "Concat"])  # no Split left: the Concat reads the merged tensor
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert next(n for n in out.graph.node if n.op_type == act).input[0] == conv.output[0]
    assert report.fusions[0].replaced == ["conv0", "conv1", "conv2", "act0", "act1", "act2"]
    x = {"x": RNG.normal(size=(2, 4, 6, 6)).astype(np.float32) * 3}
    close(run(model, x), run(out, x))


def test_different_activations_stay_behind_the_split():
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], name=f"conv{i}") for i in range(2)]
    nodes += [
        helper.make_node("LeakyRelu", ["c0"], ["y0"], alpha=0.1, name="l0"),
        helper.make_node("LeakyRelu", ["c1"], ["y1"], alpha=0.2, name="l1"),
    ]
    model = model_of(nodes, [vi("x", 1, 4, 5, 5)], [vi("y0"), vi("y1")], [w("w0", 3, 4, 1, 1), w("w1", 2, 4, 1, 1)])
    out, _ = optimize_model(model, ["horizontal"])
    assert sorted(n.op_type for n in out.graph.node) == ["Conv", "LeakyRelu", "LeakyRelu", "Split"]
    x = {"x": RNG.normal(size=(1, 4, 5, 5)).astype(np.float32)}
    close(run(model, x), run(out, x))


def test_nothing_merged_when_strides_or_kernels_differ():
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["y0"], name="s1"),
        helper.make_node("Conv", ["x", "w1"], ["y1"], name="s2", strides=[2, 2]),
        helper.make_node("Conv", ["x", "w2"], ["y2"], name="k3", pads=[1, 1, 1, 1]),
    ]
    model = model_of(
        nodes, [vi("x", 1, 4, 6, 6)], [vi("y0"), vi("y1"), vi("y2")], [w("w0", 2, 4, 1, 1), w("w1", 2, 4, 1, 1), w("w2", 2, 4, 3, 3)]
    )
    out, report = optimize_model(model, ["horizontal"])
    assert report.fusions == [] and [n.op_type for n in out.graph.node] == ["Conv"] * 3


def test_vertical_fusion_of_activations_and_residual_add():
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], name="relu6"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("LeakyRelu", ["c1"], ["r1"], alpha=0.2, name="leaky"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["r0", "c2"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    inits = [w("w0", 4, 4, 3, 3), w("w1", 4, 4, 3, 3), w("b1", 4), w("w2", 4, 4, 3, 3)]
    inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0])]
    model = model_of(nodes, [vi("x", 2, 4, 6, 6)], [vi("y", 2, 4, 6, 6)], inits)
    out, report = optimize_model(model, ["vertical"])
    assert [n.op_type for n in out.graph.node] == ["FusedConv"] * 3
    assert [f.replaced for f in report.fusions] == [["conv0", "relu6"], ["conv1", "leaky"], ["conv2", "residual", "relu"]]
    x = {"x": RNG.normal(size=(2, 4, 6, 6)).astype(np.float32)}
    close(run(model, x), run(out, x))


@pytest.mark.parametrize("scale_shape", [[1], [1, 4, 1, 1]])
def test_learnable_affine_after_a_conv_folds_into_it(scale_shape):
    """PP-LCNetV3's affine block, Conv -> BN -> Mul(a) -> Add(b) -> Relu: one Conv + Relu, same outputs."""
    size = int(np.prod(scale_shape))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
        helper.make_node("Mul", ["n", "a"], ["s"], name="lab_scale"),
        helper.make_node("Add", ["s", "b"], ["t"], name="lab_bias"),
        helper.make_node("Relu", ["t"], ["y"], name="relu"),
    ]
    inits = [w("w", 4, 3, 3, 3), w("g", 4), w("be", 4), w("m", 4)]
    inits += [helper.make_tensor("v", TensorProto.FLOAT, [4], np.abs(RNG.normal(size=4)).astype(np.float32) + 0.5)]
    inits += [helper.make_tensor("a", TensorProto.FLOAT, scale_shape, RNG.normal(size=size).astype(np.float32))]
    inits += [helper.make_tensor("b", TensorProto.FLOAT, [1], [0.3])]
    model = model_of(nodes, [vi("x", 2, 3, 6, 6)], [vi("y", 2, 4, 6, 6)], inits)
    out, report = optimize_model(model, ["fold-bn"])
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert [f.replaced for f in report.fusions] == [["conv", "bn"], ["conv", "lab_scale"], ["conv", "lab_bias"]]
    x = {"x": RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    close(run(model, x), run(out, x))


def test_a_scale_after_the_activation_is_not_folded():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "a"], ["y"], name="scale"),
    ]
    inits = [w("w", 4, 3, 1, 1), helper.make_tensor("a", TensorProto.FLOAT, [1], [-2.0])]
    out, report = optimize_model(model_of(nodes, [vi("x", 1, 3, 4, 4)], [vi("y", 1, 4, 4, 4)], inits), ["fold-bn"])
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Mul"] and report.fusions == []


def test_concat_chains_fold_and_split_concat_cancels():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ra"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="sb"),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="inner"),
        helper.make_node("Concat", ["x", "ab"], ["cat"], axis=1, name="outer"),
        helper.make_node("Split", ["cat", "sizes"], ["p", "q", "r"], axis=1, name="split"),
        helper.make_node("Concat", ["p", "q", "r"], ["joined"], axis=1, name="rejoin"),
        helper.make_node("Tanh", ["joined"], ["y"], name="tanh"),
    ]
    inits = [helper.make_tensor("sizes", TensorProto.INT64, [3], [1, 2, 3])]
    model = model_of(nodes, [vi("x", 2, 2, 3, 3)], [vi("y", 2, 6, 3, 3)], inits)
    out, report = optimize_model(model, ["concat"])
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Concat") == 1 and "Split" not in ops
    assert {f.kind for f in report.fusions} == {"concat"} and len(report.fusions) == 2
    x = {"x": RNG.normal(size=(2, 2, 3, 3)).astype(np.float32)}
    close(run(model, x), run(out, x))


def test_demo_layer_counts_and_exactness(demo_val):
    model = load_model(DEMO_MODEL)
    out, report = optimize_model(model)
    assert [(label, sum(c.values())) for label, c in report.steps] == [
        ("Original", 39),
        ("After scale fusion", 28),
        ("After vertical fusions", 16),
        ("After tensor merging", 15),
        ("After concat removal", 15),
    ]
    original = {"Conv": 11, "BatchNormalization": 11, "Relu": 11, "Add": 1, "MaxPool": 1}
    original.update({"Concat": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1})
    assert dict(report.steps[0][1]) == original
    assert dict(report.steps[-1][1]) == {
        "FusedConv": 9,
        "Split": 1,
        "MaxPool": 1,
        "Concat": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }
    assert report.inplace_concats == ["/features/features.3/Concat"]
    x = {"image": demo_val[0][:200]}
    close(run(model.proto, x), run(out, x))


def test_calibration_after_fusion_keeps_the_tensors_tensorrt_keeps(tmp_path, demo_preprocess):
    optimized, _ = optimize_model(load_model(DEMO_MODEL))
    path = save(optimized, tmp_path / "demo.opt.onnx")
    options = quantkit.CalibrationOptions(methods="minmax")
    data = quantkit.DataOptions(num_samples=128, preprocess=demo_preprocess)
    after = quantkit.calibrate(path, DEMO_CALIB, options, data_options=data, out=tmp_path / "out").ranges
    before = quantkit.calibrate(DEMO_MODEL, DEMO_CALIB, options, data_options=data).ranges
    split = next(n for n in optimized.graph.node if n.op_type == "Split")
    merged = split.input[0]  # the wider conv's output: new, like TensorRT's merged tensor
    assert set(after.tensors) - {merged} <= set(before.tensors)  # otherwise the original activations' names
    assert len(after.tensors) >= 12
    for name, t in after.tensors.items():
        if name != merged:
            assert t.amax["minmax"] == pytest.approx(before.tensors[name].amax["minmax"], rel=1e-5)
    branches = max(before.tensors[o].amax["minmax"] for o in split.output)
    assert after.tensors[merged].amax["minmax"] == pytest.approx(branches, rel=1e-5)
    assert (tmp_path / "out" / "demo.opt.minmax.cache").exists()


def test_cli_inspect_and_optimize(tmp_path, capsys):
    assert main(["inspect", str(DEMO_MODEL), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "inspect" and doc["exit_code"] == 0 and doc["outputs"] == []
    assert [s["layers"] for s in doc["result"]["steps"]] == [39, 28, 16, 15, 15]
    assert main(["optimize", str(DEMO_MODEL), "--skip", "vertical", "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    assert not any(n.op_type == "FusedConv" for n in onnx.load(str(tmp_path / "o.onnx")).graph.node)
    assert main(["inspect", str(DEMO_MODEL), "--passes", "fuse"]) == 2
    assert "unknown optimization pass" in capsys.readouterr().err


def test_quantized_model_refused(demo_preprocess):
    from quantkit.export.qdq import quantize_model

    ranges = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="minmax"),
        data_options=quantkit.DataOptions(num_samples=32, preprocess=demo_preprocess),
    ).ranges
    q, _ = quantize_model(load_model(DEMO_MODEL), ranges)
    with pytest.raises(QuantkitError, match="already quantized"):
        optimize_model(q)


def test_optimize_for_tensorrt_then_calibrate_and_quantize(tmp_path, demo_preprocess, demo_val):
    """The TensorRT flow: fuse what TensorRT fuses (no FusedConv), calibrate the fused graph, place Q/DQ."""
    from fakequant import top1

    from quantkit.export.qdq import quantize_model

    optimized, report = optimize_model(load_model(DEMO_MODEL), ["fold-bn", "horizontal", "concat"])
    # the branches' ReLUs run once, after the merged conv, so Conv+ReLU stays one TensorRT layer
    assert report.tensorrt_estimate == 14 and optimize_model(load_model(DEMO_MODEL), ["fold-bn"])[1].tensorrt_estimate == 15
    path = save(optimized, tmp_path / "demo.trt.onnx")
    ranges = quantkit.calibrate(
        path,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="entropy"),
        data_options=quantkit.DataOptions(num_samples=256, preprocess=demo_preprocess),
    ).ranges
    q, report = quantize_model(load_model(path), ranges)
    assert len(report.int8_nodes) == 11  # 9 convs left after the merge + the Gemm + the residual Add
    images, labels = demo_val
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    assert top1(sess, images, labels) >= 0.971


def test_tensorrt_layer_estimate_applies_its_documented_fusions():
    """Conv+BN+ReLU is one TensorRT layer, Conv+residual Add+ReLU another, Q/DQ fold away:
    a 9-node graph is an estimated 3 layers (two fused convs and the pooling)."""
    import onnx_graphsurgeon as gs
    from onnx import helper, numpy_helper

    from quantkit.graph.optimize import tensorrt_layer_estimate

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("g", "b", "m", "v")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("QuantizeLinear", ["r2", "sc", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["dq"], name="dq"),
        helper.make_node("GlobalAveragePool", ["dq"], ["y"], name="gap"),
    ]
    inits = [w, *bn, numpy_helper.from_array(np.array(0.1, np.float32), "sc"), numpy_helper.from_array(np.array(0, np.int8), "zp")]
    model = float_model(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 1, 1]}, inits, name="g")
    assert tensorrt_layer_estimate(gs.import_onnx(model)) == 3
