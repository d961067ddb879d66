import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODEL, conv_model, encoder_model, save
from onnx import TensorProto, helper

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export.fp16 import convert_fp16, fp16_precisions
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet, TensorRange


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def elem_types(model):
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]})
    return types


def test_demo_fp16_matches_fp32_and_halves_the_file(tmp_path, demo_val):
    out = tmp_path / "demo.fp16.onnx"
    assert main(["fp16", str(DEMO_MODEL), "-o", str(out), "--quiet"]) == 0
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
    assert report.kept_fp32 == {"conv2": "plan: fp32", "relu1": "range exceeds float16 (65504)"}
    types = elem_types(out)
    assert types["w2"] == TensorProto.FLOAT and types["w1"] == TensorProto.FLOAT16
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x}), run(model, {"x": x}), rtol=1e-2, atol=1e-2)


def test_encoder_keeps_overflowing_mask_constants_and_requested_ops(tmp_path):
    model = encoder_model()
    out, report = convert_fp16(model, keep_op_types={"Softmax", "LayerNormalization"})
    reasons = set(report.kept_fp32.values())
    assert "weights exceed float16 (65504)" in reasons  # the -3.4e38 mask constant
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
