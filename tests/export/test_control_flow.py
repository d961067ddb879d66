"""Models with control flow (If): float16 conversion and quantization keep them runnable and exact
on both branches. VAD models and merged decoders put most of their network inside If branches,
which read tensors and weights from the enclosing scope without listing them as inputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODEL, if_model, save

from quantkit.backends.ort import with_outputs
from quantkit.calibration.collect import activation_bytes, select_calibration_tensors
from quantkit.cli import main
from quantkit.export.fp16 import convert_fp16
from quantkit.export.qdq import node_names, quantize_model
from quantkit.model import load_model, outer_scope_reads
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.tuning.sensitivity import quantized_nodes


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def inputs(sign):
    """A batch whose mean has the given sign: the If takes its then branch for +1, its else branch for -1."""
    x = np.random.default_rng(7).normal(size=(4, 3, 16, 16)).astype(np.float32)
    return x - x.mean() + sign * 0.5


def test_outer_scope_reads_cover_nested_branches():
    node = next(n for n in if_model(nested=True).graph.node if n.op_type == "If")
    # h, w2 and cond are the enclosing graph's; r_else is the else branch's own, read by the inner If
    assert sorted(outer_scope_reads(node)) == ["cond", "h", "w2"]


@pytest.mark.parametrize("nested", [False, True])
def test_fp16_converts_each_branch_and_the_if_keeps_float32_outputs(nested):
    model = if_model(nested)
    fp16, report = convert_fp16(model)
    inner = {"conv_inner", "conv_never"} if nested else {"conv2_else"}
    assert {"conv0", "conv_z", "conv_then", "conv2_then", "conv_else", *inner} <= set(report.fp16_nodes)
    inferred = onnx.shape_inference.infer_shapes(fp16).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.output]}
    assert types["y"] == onnx.TensorProto.FLOAT  # each branch casts its float16 result back
    assert types["h"] == onnx.TensorProto.FLOAT16  # and reads the enclosing graph's float16 tensors as they are
    branch = next(a.g for n in fp16.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert next(n for n in branch.node if n.name == "conv_then").input[0] == "h"
    for sign in (1, -1):
        want, got = run(model, inputs(sign)), run(fp16, inputs(sign))
        for a, b in zip(want, got, strict=True):
            assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_fp16_keeps_a_branch_the_data_never_took_in_float32(tmp_path):
    path = save(if_model(), tmp_path / "if.onnx")
    data = tmp_path / "positive.npz"
    np.savez(data, x=inputs(1))
    out = tmp_path / "if.fp16.onnx"
    assert main(["fp16", str(path), "-o", str(out), "--data", str(data), "--quiet"]) == 0
    converted = onnx.load(str(out))
    branches = {a.name: a.g for n in converted.graph.node if n.op_type == "If" for a in n.attribute}
    weights = {i.name: i.data_type for g in branches.values() for i in g.initializer}
    assert weights["w_then"] == onnx.TensorProto.FLOAT16 and weights["w_else"] == onnx.TensorProto.FLOAT
    for a, b in zip(run(onnx.load(str(path)), inputs(-1)), run(converted, inputs(-1)), strict=True):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_a_loop_body_stays_float32():
    body = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            onnx.helper.make_node("Conv", ["h", "w_loop"], ["step"], name="conv_loop"),
        ],
        "body",
        [
            onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            onnx.helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
        ],
        [onnx.helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []), onnx.helper.make_tensor_value_info("step", 1, None)],
        [onnx.numpy_helper.from_array(np.full((2, 8, 1, 1), 0.1, np.float32), "w_loop")],
    )
    model = if_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2, np.int64), "trips"))
    model.graph.node.append(onnx.helper.make_node("Loop", ["trips", ""], ["steps"], name="loop", body=body))
    model.graph.output.append(onnx.helper.make_tensor_value_info("steps", onnx.TensorProto.FLOAT, None))
    fp16, report = convert_fp16(model)
    assert report.kept_fp32["loop"].startswith("control flow (Loop)")
    loop_body = next(n for n in fp16.graph.node if n.op_type == "Loop").attribute[0].g
    assert next(n for n in loop_body.node if n.name == "conv_loop").input[0] == "h_cast_fp32"  # h is float16 outside
    np.testing.assert_allclose(run(fp16, inputs(1))[2], run(model, inputs(1))[2], rtol=1e-2, atol=1e-2)


def calibrate(tmp_path, model, signs, batch=4):
    """Ranges from batches of ``batch`` samples, one batch per sign (the If decides per batch)."""
    tmp_path.mkdir(exist_ok=True)
    path = save(model, tmp_path / "model.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([inputs(s) for s in signs]))
    out = tmp_path / "r"
    args = ["calibrate", str(path), "--data", str(data), "--out-dir", str(out), "--batch-size", str(batch), "--method", "minmax"]
    assert main([*args, "--quiet"]) == 0
    return path, data, RangeSet.load(out / "ranges.json")


def inlined(model, branch):
    """The same network with the If replaced by one branch's nodes: the reference without control flow."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == "If")
    body = next(a.g for a in node.attribute if a.name == branch)
    nodes = [*body.node, onnx.helper.make_node("Identity", [body.output[0].name], [node.output[0]])]
    at = list(out.graph.node).index(node)
    kept = [n for n in out.graph.node if n is not node]
    del out.graph.node[:]
    out.graph.node.extend(kept[:at] + nodes + kept[at:])
    out.graph.initializer.extend(body.initializer)
    return out


def test_calibration_reaches_into_branches_nested_ones_too():
    names = select_calibration_tensors(if_model(nested=True))
    assert {"r_then", "y_then", "r_else", "y_inner", "y_never"} <= set(names)
    assert not {"w_then", "w2"} & set(names)  # weights, in or out of a branch, are not activations


def test_lifted_outputs_leave_the_result_alone_and_are_empty_where_the_branch_did_not_run():
    model = if_model(nested=True)
    lifted = with_outputs(model, ["r_then", "r_else", "y_inner"])
    for sign in (1, -1):
        want = run(model, inputs(sign))
        got = dict(zip([o.name for o in lifted.graph.output], run(lifted, inputs(sign)), strict=True))
        np.testing.assert_array_equal(got["y"], want[0])
        taken, skipped = ("r_then", "r_else") if sign > 0 else ("r_else", "r_then")
        assert got[taken].shape == (4, 8, 16, 16) and got[skipped].size == 0
        assert (got["y_inner"].size > 0) == (sign < 0)


def test_branch_ranges_equal_those_of_the_network_without_control_flow(tmp_path):
    _, _, ranges = calibrate(tmp_path / "if", if_model(), [1, -1])
    for branch, sign, tensor in (("then_branch", 1, "r_then"), ("else_branch", -1, "r_else")):
        _, _, reference = calibrate(tmp_path / branch, inlined(if_model(), branch), [sign])
        got, want = ranges.tensors[tensor], reference.tensors[tensor]
        assert (got.min, got.max) == (want.min, want.max)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_branches_are_quantized_and_both_stay_accurate(tmp_path, target):
    path, data, _ = calibrate(tmp_path, if_model(nested=True), [1, -1] * 4)
    out = tmp_path / "if.int8.onnx"
    args = ["quantize", str(path), "--data", str(data), "--ranges", str(tmp_path / "r" / "ranges.json"), "-o", str(out)]
    assert main([*args, "--target", target, "--quiet", "--json"]) == 0
    quantized = onnx.load(str(out))
    convs = {n.name: n for n in (m for a in next(n for n in quantized.graph.node if n.name == "if").attribute for m in a.g.node)}
    for name in ("conv_then", "conv2_then", "conv_else"):  # each branch's Convs read dequantized activations
        assert all(i.endswith("_dequantized") for i in convs[name].input[:2]), name
    for sign in (1, -1):
        for a, b in zip(run(onnx.load(str(path)), inputs(sign)), run(quantized, inputs(sign)), strict=True):
            assert 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)) > 25


def test_a_branch_the_data_never_took_stays_float_and_says_why(tmp_path):
    path, data, ranges = calibrate(tmp_path, if_model(), [1, 1])
    assert "r_else" not in ranges.tensors
    out = tmp_path / "if.int8.onnx"
    args = ["quantize", str(path), "--data", str(data), "--ranges", str(tmp_path / "r" / "ranges.json"), "-o", str(out)]
    assert main([*args, "--algorithms", "none", "--method", "minmax", "--quiet"]) == 0
    else_branch = next(a.g for n in onnx.load(str(out)).graph.node if n.name == "if" for a in n.attribute if a.name == "else_branch")
    conv2 = next(n for n in else_branch.node if n.name == "conv2_else")
    assert conv2.input[0] == "r_else"  # float: no range for it
    for a, b in zip(run(onnx.load(str(path)), inputs(-1)), run(onnx.load(str(out)), inputs(-1)), strict=True):
        assert 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)) > 25


def in_an_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` run inside an If on a scalar int64 input ``sr``, as silero-vad switches its whole network
    on the sample rate: then (sr == 16000) the network itself, else a renamed copy of it."""
    graph, feed = model.graph, model.graph.input[0].name

    def branch(prefix: str) -> onnx.GraphProto:
        body = onnx.GraphProto()
        body.CopyFrom(graph)
        body.name = prefix

        def renamed(name: str) -> str:
            return name if name in (feed, "") else f"{prefix}/{name}"

        for node in body.node:
            node.input[:] = [renamed(i) for i in node.input]
            node.output[:] = [renamed(o) for o in node.output]
            node.name = f"{prefix}/{node.name}"
        for item in [*body.initializer, *body.output]:
            item.name = f"{prefix}/{item.name}"
        del body.input[:], body.value_info[:]
        return body

    nodes = [
        onnx.helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is16k"),
        onnx.helper.make_node(
            "If", ["is16k"], [o.name for o in graph.output], name="switch", then_branch=branch("t"), else_branch=branch("e")
        ),
    ]
    inputs = [graph.input[0], onnx.helper.make_tensor_value_info("sr", onnx.TensorProto.INT64, [])]
    wrapped = onnx.helper.make_graph(
        nodes, "switched", inputs, list(graph.output), [onnx.numpy_helper.from_array(np.array(16000), "sr16k")]
    )
    return onnx.helper.make_model(wrapped, opset_imports=model.opset_import)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("high", ["fp32", "fp16"])
def test_a_network_inside_an_if_is_quantized_exactly_as_outside(tmp_path, demo_val, target, high):
    """The independent reference: the same network quantized without the If. Every pass (BN folding,
    hard-swish gates, decision maxima, Q/DQ placement, float16 scales) reaches into the branch, so the
    branch the data takes computes what the plain model's quantization computes, bit for bit."""
    images = demo_val[0][:64]
    plain = onnx.load(str(DEMO_MODEL))
    outputs = []
    for name, model, feeds in (("plain", plain, {}), ("switched", in_an_if(plain), {"sr": np.array(16000)})):
        path = save(model, tmp_path / f"{name}.onnx")
        np.savez(tmp_path / f"{name}.npz", image=images, **feeds)
        data = ["--data", str(tmp_path / f"{name}.npz")]
        assert main(["calibrate", str(path), *data, "--method", "minmax", "--out-dir", str(tmp_path / name), "--quiet"]) == 0
        out = tmp_path / f"{name}.int8.onnx"
        args = ["--ranges", str(tmp_path / name / "ranges.json"), "--target", target, "--high-precision", high, "--algorithms", "none"]
        assert main(["quantize", str(path), *data, *args, "-o", str(out), "--quiet", "--force"]) == 0
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": images[:32], **feeds})[0])
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_calibration_sizes_its_batch_for_a_network_inside_an_if_as_for_the_network(demo_val):
    """Shape inference sizes a branch's tensors too, and only one branch of an If runs: the memory a
    sample needs is the plain network's (before, the branches' tensors counted for nothing, and a
    model run inside an If got an estimate of 0 MB a sample and every sample in one batch)."""
    plain = onnx.load(str(DEMO_MODEL))
    image = demo_val[0][:1]
    tensors = select_calibration_tensors(plain)
    switched = in_an_if(plain)
    inside = select_calibration_tensors(switched)
    want = activation_bytes(plain, {"image": image}, tensors)
    got = activation_bytes(switched, {"image": image, "sr": np.array(16000)}, inside)
    extra = 10 * 4 + 1  # the If's output (a copy of its branch's [1, 10] logits) and its condition
    assert want[0] > 100_000 and got == (want[0] + extra, want[1] + 10 * 4)


def test_branch_nodes_can_be_named_in_a_plan_and_ranked(tmp_path):
    """Plans, sensitivity and tune address a branch's nodes by name as any other node's."""
    model = if_model()
    names = node_names(model)
    assert {"conv_then", "conv2_else", "conv0"} <= set(names)
    path, _, ranges = calibrate(tmp_path, model, [1, -1] * 4)
    int8, ops, _ = quantized_nodes(load_model(path), ranges, method="minmax", target="tensorrt")
    assert {"conv_then", "conv2_then", "conv_else", "conv2_else"} <= set(int8) and ops["conv_then"] == "Conv"
    plan = PrecisionPlan(nodes={"conv_then": "fp32"})
    _, report = quantize_model(load_model(path), ranges, method="minmax", plan=plan, check_hash=False)
    assert report.kept_float["conv_then"] == "plan: fp32" and "conv2_then" in report.int8_nodes
