import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_PREPROCESS, conv_model, encoder_model, float_model, save
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export.fp16 import convert_fp16, fp16_precisions
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet, TensorRange

DEMO_DATA = ["--data", str(DEMO_CALIB), "--preprocess-config", str(DEMO_PREPROCESS), "--num-samples", "64"]


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def elem_types(model):
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]})
    return types


def test_demo_fp16_matches_fp32_and_halves_the_file(tmp_path, demo_val):
    out = tmp_path / "demo.fp16.onnx"
    assert main(["fp16", str(DEMO_MODEL), "-o", str(out), "--quiet", *DEMO_DATA]) == 0
    fp32, fp16 = onnx.load(str(DEMO_MODEL)), onnx.load(str(out))
    images = demo_val[0][:200]
    a, b = run(fp32, {"image": images}), run(fp16, {"image": images})
    assert b.dtype == np.float32  # float32 I/O kept
    assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert 0.45 < out.stat().st_size / DEMO_MODEL.stat().st_size < 0.6
    types = elem_types(fp16)
    assert all(types[i.name] == TensorProto.FLOAT16 for i in fp16.graph.initializer if i.name.endswith("weight"))
    assert types["image"] == TensorProto.FLOAT and types["logits"] == TensorProto.FLOAT


def test_every_op_sees_one_float_type(demo_val):
    """Strongly typed: strict shape inference passes and no node mixes float16 and float32 inputs."""
    fp16, _ = convert_fp16(onnx.load(str(DEMO_MODEL)))
    onnx.shape_inference.infer_shapes(fp16, strict_mode=True)
    types = elem_types(fp16)
    for node in fp16.graph.node:
        if node.op_type == "Cast":
            continue
        floats = {types[i] for i in node.input if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        assert len(floats) <= 1, node.name


def test_plan_and_ranges_keep_nodes_in_fp32(tmp_path):
    model = conv_model()
    names = [n.name for n in model.graph.node]
    precisions = fp16_precisions(PrecisionPlan(nodes={"conv2": "fp32"}), names)
    ranges = RangeSet(
        tensors={"r1": TensorRange("r1", 0.0, 1e6, 10)}, methods={"minmax": {}}, model={}, calibration={}
    )  # relu1's output exceeds float16
    out, report = convert_fp16(model, precisions=precisions, ranges=ranges)
    assert report.kept_fp32 == {"conv2": "plan: fp32", "relu1": "range exceeds float16's safe range (8192)"}
    types = elem_types(out)
    assert types["w2"] == TensorProto.FLOAT and types["w1"] == TensorProto.FLOAT16
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x}), run(model, {"x": x}), rtol=1e-2, atol=1e-2)


def test_encoder_keeps_overflowing_mask_constants_and_requested_ops(tmp_path):
    model = encoder_model()
    out, report = convert_fp16(model, keep_op_types={"Softmax", "LayerNormalization"})
    reasons = set(report.kept_fp32.values())
    assert any(r.startswith("constant exceeds float16's safe range (3.4e+38") for r in reasons)  # the -3.4e38 mask constant
    assert "Softmax kept in float32" in reasons and "LayerNormalization kept in float32" in reasons
    rng = np.random.default_rng(0)
    mask = np.ones((2, 6), np.int64)
    mask[:, 4:] = 0
    feeds = {"input_ids": rng.integers(0, 20, size=(2, 6)), "attention_mask": mask}
    a, b = run(model, feeds), run(out, feeds)
    assert np.isfinite(b).all() and np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_reductions_stay_fp32_and_resize_scales_stay_float32():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest", name="resize"),
        helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0, name="sum"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [scales]), opset_imports=[helper.make_opsetid("", 13)])
    out, report = convert_fp16(model)
    assert report.kept_fp32 == {"sum": "ReduceSum kept in float32 (may overflow float16)"}
    assert elem_types(out)["scales"] == TensorProto.FLOAT
    xv = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": xv}), run(model, {"x": xv}), rtol=2e-3, atol=2e-3)


def test_fp16_model_refused(tmp_path):
    fp16, _ = convert_fp16(onnx.load(str(DEMO_MODEL)))
    with pytest.raises(QuantkitError, match="already holds float16"):
        convert_fp16(fp16)
    path = save(conv_model(), tmp_path / "m.onnx")
    assert path.exists()


def bn_model_with_constant_variance(variance: float = 9.8e7) -> onnx.ModelProto:
    """Conv -> BatchNormalization whose variance is a Constant node (as in PP-OCRv4's detector)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 1000
    nodes = [
        helper.make_node("Constant", [], ["var"], value=numpy_helper.from_array(np.full(4, variance, np.float32), "var"), name="var_const"),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "var"], ["y"], name="bn"),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.zeros(4, np.float32), "m"),
    ]
    return float_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, inits, name="bn")


def test_a_constant_node_beyond_float16_keeps_its_consumer_in_fp32():
    model = bn_model_with_constant_variance()
    out, report = convert_fp16(model)
    assert report.kept_fp32["bn"].startswith("constant exceeds float16's safe range")
    assert report.kept_fp32["var_const"].startswith("constant exceeds float16's safe range")
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    a, b = run(model, {"x": x}), run(out, {"x": x})
    assert np.isfinite(b).all() and np.abs(b).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2 * np.abs(a).max())


def test_the_plain_conversion_of_that_model_would_zero_it():
    """The failure the rule prevents: 9.8e7 becomes inf in float16, and BN divides by it."""
    var = np.float16(9.8e7)
    assert np.isinf(var)
    assert np.all(np.float16(1.0) / np.sqrt(var + np.float16(1e-5)) == 0)


def test_constants_that_flush_to_zero_stay_fp32():
    from quantkit.export.fp16 import constant_problem

    assert constant_problem(np.array([1e-9], np.float32)).startswith("constant values flush to zero")
    assert constant_problem(np.array([1e-5], np.float32)) == ""  # an epsilon float16 holds
    weights = np.full(1000, 0.1, np.float32)
    weights[:3] = 1e-9  # a few tiny weights among many flush harmlessly
    assert constant_problem(weights) == ""


def test_missing_ranges_are_reported():
    model = conv_model()
    ranges = RangeSet(tensors={"r1": TensorRange("r1", 0.0, 1.0, 10)}, methods={"minmax": {}}, model={}, calibration={})
    _, report = convert_fp16(model, ranges=ranges)
    assert "r1" not in report.unranged and "x" in report.unranged


def overflowing_model() -> onnx.ModelProto:
    """Conv whose activations reach ~1e5: beyond float16, they become inf."""
    w = np.full((2, 1, 1, 1), 2000.0, np.float32)
    return float_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")],
        {"x": [4, 1, 4, 4]},
        {"y": [4, 2, 4, 4]},
        [numpy_helper.from_array(w, "w")],
        name="big",
    )


def test_fp16_without_ranges_is_refused_and_no_ranges_is_explicit(tmp_path, capsys):
    path = save(overflowing_model(), tmp_path / "big.onnx")
    out = tmp_path / "big.fp16.onnx"
    assert main(["fp16", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fp16 needs the tensors' ranges" in err and "--no-ranges" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fidelity_check_refuses_an_overflowing_fp16_model_and_writes_nothing(tmp_path, capsys):
    path = save(overflowing_model(), tmp_path / "big.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(20, 40, size=(8, 1, 4, 4)).astype(np.float32))
    out = tmp_path / "big.fp16.onnx"
    before = path.read_bytes()
    code = main(["fp16", str(path), "--no-ranges", "--data", str(tmp_path / "x.npy"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite" in err and "--force" in err and not out.exists()
    assert path.read_bytes() == before
    assert main(["fp16", str(path), "--no-ranges", "--data", str(tmp_path / "x.npy"), "-o", str(out), "--force", "--quiet"]) == 0
    assert out.exists()
    # with ranges from the same data, the overflowing nodes stay in float32 and the check passes
    assert main(["fp16", str(path), "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "ok.onnx"), "--quiet"]) == 0
    np.testing.assert_allclose(
        run(onnx.load(str(tmp_path / "ok.onnx")), {"x": np.load(tmp_path / "x.npy")[:4]}),
        run(overflowing_model(), {"x": np.load(tmp_path / "x.npy")[:4]}),
        rtol=1e-3,
    )


def test_constant_bn_model_through_the_cli_passes_the_check(tmp_path, capsys):
    path = save(bn_model_with_constant_variance(), tmp_path / "bn.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "bn.fp16.onnx"
    assert main(["fp16", str(path), "--data", str(tmp_path / "x.npy"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fidelity vs FP32" in printed and "constant exceeds float16's safe range" in printed


def test_fp16_of_a_qdq_model_keeps_dequantize_to_op_edges_free_of_casts(demo_preprocess):
    """As ModelOpt writes it: float16 scales (opset 19), so TensorRT's Q/DQ fusion sees DQ -> Conv."""
    import quantkit
    from quantkit.backends.ort import make_session
    from quantkit.export.qdq import quantize_model
    from quantkit.model import load_model

    model = load_model(DEMO_MODEL)
    ranges = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="entropy"),
        data_options=quantkit.DataOptions(num_samples=64, preprocess=demo_preprocess),
    ).ranges
    q, _ = quantize_model(model, ranges)
    fp16, report = convert_fp16(q)
    assert report.qdq_fp16 > 0 and fp16.opset_import[0].version >= 19
    producer = {o: n for n in fp16.graph.node for o in n.output}
    for node in fp16.graph.node:
        if node.op_type == "Cast":
            assert producer.get(node.input[0]) is None or producer[node.input[0]].op_type != "DequantizeLinear", node.name
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    a, b = make_session(q).run(None, {"image": x})[0], make_session(fp16).run(None, {"image": x})[0]
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()


def test_tensors_computed_from_constants_need_no_range(tmp_path):
    """A weight passed through Identity or reshaped at run time is a parameter, not an activation:
    calibration leaves it out, and fp16 must not ask for its range (a CRNN's LSTM bias, PP-OCR's SE offsets)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 0.25])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    nodes = [
        helper.make_node("Identity", ["w"], ["w_alias"], name="alias"),
        helper.make_node("Reshape", ["w_alias", "shape"], ["w_row"], name="row"),
        helper.make_node("Add", ["x", "w_row"], ["y"], name="add"),
    ]
    path = save(float_model(nodes, {"x": ["N", 4]}, {"y": ["N", 4]}, [w, shape]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    assert (
        main(["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--method", "minmax", "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    )
    ranges = RangeSet.load(tmp_path / "r" / "ranges.json")
    assert "w_row" not in ranges.tensors  # not an activation: never calibrated
    _, report = convert_fp16(onnx.load(str(path)), ranges=ranges)
    assert report.unranged == []
