import numpy as np
import onnx
import onnxruntime as ort
from conftest import DEMO_MODEL
from onnx import TensorProto, helper

from quantkit.graph.passes import fold_batchnorm


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_batchnorm_folding_on_the_demo_is_exact(demo_val):
    model = onnx.load(str(DEMO_MODEL))
    folded, pairs = fold_batchnorm(model)
    assert len(pairs) == 11 and not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    # the folded Conv produces the BN's output tensor, so ranges keyed by name stay valid
    bn_outputs = {n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"}
    assert bn_outputs <= {o for n in folded.graph.node for o in n.output}
    x = demo_val[0][:64]
    a, b = run(model, {"image": x}), run(folded, {"image": x})
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_per_channel_bias_add_is_folded_and_others_are_not():
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(size=108).astype(np.float32)),
        helper.make_tensor("bias", TensorProto.FLOAT, [1, 4, 1, 1], rng.normal(size=4).astype(np.float32)),
        helper.make_tensor("plane", TensorProto.FLOAT, [1, 1, 8, 8], rng.normal(size=64).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Add", ["c", "bias"], ["biased"], name="bias_add"),  # per channel: folds
        helper.make_node("Conv", ["biased", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "plane"], ["y"], name="plane_add"),  # spatial: must not fold
    ]
    inits.append(helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 1, 1], rng.normal(size=16).astype(np.float32)))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded, pairs = fold_batchnorm(model)
    assert pairs == [("conv", "bias_add")]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(folded, {"x": x}), run(model, {"x": x}), rtol=1e-5, atol=1e-5)
