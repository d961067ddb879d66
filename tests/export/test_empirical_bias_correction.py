"""The empirical bias correction against what defines it: after it, every corrected layer's mean
output over the calibration data, in the Q/DQ model itself, equals FP32's (per channel), though
the quantized activations upstream shift it (clipped tails), which the weights-only form cannot see;
and its passes, one per level, give the biases a pass per layer gives (a second implementation,
here: correct one layer, measure the next)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import helper, numpy_helper

from quantkit.backends.ort import make_session, with_outputs
from quantkit.cli import main
from quantkit.data import batches, open_source
from quantkit.export.bias_correction import correct_biases_empirically
from quantkit.export.statistics import layer_levels
from quantkit.model import load_model

#: conv1 -> Relu -> (conv2a, conv2b) -> Add -> conv3: two layers side by side, one after both
LAYERS = ("conv1", "conv2a", "conv2b", "conv3")


def branchy_model(rng: np.random.Generator) -> onnx.ModelProto:
    shapes = {"conv1": (6, 3, 3, 3), "conv2a": (6, 6, 1, 1), "conv2b": (6, 6, 3, 3), "conv3": (4, 6, 1, 1)}
    inits = [
        numpy_helper.from_array((rng.normal(size=s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), f"{n}_w") for n, s in shapes.items()
    ]
    inits += [numpy_helper.from_array(rng.normal(size=shapes[n][0]).astype(np.float32), f"{n}_b") for n in ("conv1", "conv2b")]
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2a_w"], ["c2a"], name="conv2a"),  # no bias: the correction adds one
        helper.make_node("Conv", ["r1", "conv2b_w", "conv2b_b"], ["c2b"], pads=[1, 1, 1, 1], name="conv2b"),
        helper.make_node("Add", ["c2a", "c2b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "conv3_w"], ["y"], name="conv3"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 8, 8]}, inits)


def quantized(model: onnx.ModelProto, clip: float) -> onnx.ModelProto:
    """Each Conv's input through a per-tensor int8 Q/DQ clipped at ``clip`` (a tight clip, so the
    clipped tail shifts the means) and its weight through a per-channel int8 DequantizeLinear."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type == "Conv":
            x, w = node.input[0], inits[node.input[1]]
            scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127).astype(np.float32)
            q = np.round(w / scale[:, None, None, None]).astype(np.int8)
            out.graph.initializer.extend([
                numpy_helper.from_array(q, f"{node.name}_wq"), numpy_helper.from_array(scale, f"{node.name}_ws"),
                numpy_helper.from_array(np.float32(clip / 127), f"{node.name}_xs"), numpy_helper.from_array(np.int8(0), f"{node.name}_xz"),
            ])  # fmt: skip
            nodes += [
                helper.make_node("QuantizeLinear", [x, f"{node.name}_xs", f"{node.name}_xz"], [f"{node.name}_xq"]),
                helper.make_node("DequantizeLinear", [f"{node.name}_xq", f"{node.name}_xs", f"{node.name}_xz"], [f"{node.name}_xd"]),
                helper.make_node("DequantizeLinear", [f"{node.name}_wq", f"{node.name}_ws"], [f"{node.name}_wd"], axis=0),
            ]
            node.input[0], node.input[1] = f"{node.name}_xd", f"{node.name}_wd"
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def output_means(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel mean of each layer's output, by a plain onnxruntime run."""
    tensors = {n.name: n.output[0] for n in model.graph.node if n.name in LAYERS}
    values = make_session(with_outputs(model, list(tensors.values()))).run(list(tensors.values()), {"x": x})
    return {name: v.astype(np.float64).mean(axis=(0, 2, 3)) for name, v in zip(tensors, values, strict=True)}


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(5)
    model = branchy_model(rng)
    info = load_model(save(model, tmp_path / "m.onnx"))
    x = (rng.normal(size=(24, 3, 8, 8)) * 1.5 + 0.5).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return model, info, x, lambda: batches(open_source(tmp_path / "x.npy", info), info, 8)


def test_levels_group_layers_by_their_longest_chain_of_layers():
    model = branchy_model(np.random.default_rng(0))
    levels = layer_levels(model.graph, set(LAYERS))
    assert [sorted(n.name for n in level) for level in levels] == [["conv1"], ["conv2a", "conv2b"], ["conv3"]]
    # a layer left out does not count towards the chain
    assert [[n.name for n in level] for level in layer_levels(model.graph, {"conv1", "conv3"})] == [["conv1"], ["conv3"]]


def test_every_layer_mean_matches_fp32_in_the_quantized_model(case):
    model, info, x, stream = case
    qdq = quantized(model, clip=1.0)  # far inside the activations' range: clipping shifts every mean
    corrected, report = correct_biases_empirically(qdq, info, stream)
    assert sorted(report.corrected) == sorted(LAYERS) and report.form == "empirical" and not report.stopped
    fp32, before, after = output_means(model, x), output_means(qdq, x), output_means(corrected, x)
    for name in LAYERS:
        gap = np.abs(before[name] - fp32[name]).max()
        assert gap > 0.05, name  # the clipped inputs shift every layer
        np.testing.assert_allclose(after[name], fp32[name], atol=1e-4 * max(gap, 1.0), err_msg=name)
    assert "empirical" in report.summary()


def test_one_pass_per_level_equals_one_pass_per_layer(case):
    """The second implementation: layer by layer in graph order, each bias set from the mean its
    output has once the layers before it are corrected."""
    model, info, x, stream = case
    qdq = quantized(model, clip=1.5)
    corrected, _ = correct_biases_empirically(qdq, info, stream)
    fp32 = output_means(model, x)
    by_layer = quantized(model, clip=1.5)
    inits = {i.name: i for i in by_layer.graph.initializer}
    for name in LAYERS:
        node = next(n for n in by_layer.graph.node if n.name == name)
        shift = output_means(by_layer, x)[name] - fp32[name]
        old = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 else 0.0
        bias = numpy_helper.from_array((old - shift).astype(np.float32), f"{name}_by_layer")
        by_layer.graph.initializer.append(bias)
        inits[bias.name] = bias
        node.input[2:] = [bias.name]
    for name in LAYERS:
        ours = next(n for n in corrected.graph.node if n.name == name).input[2]
        theirs = next(n for n in by_layer.graph.node if n.name == name).input[2]
        read = {i.name: numpy_helper.to_array(i) for i in (*corrected.graph.initializer, *by_layer.graph.initializer)}
        np.testing.assert_allclose(read[ours], read[theirs], rtol=1e-5, atol=1e-5, err_msg=name)


def test_out_of_time_it_stops_and_says_so(case):
    model, info, _, stream = case
    corrected, report = correct_biases_empirically(quantized(model, clip=1.0), info, stream, seconds=0.0)
    assert report.corrected == {} and "stopped after 0 of 3 levels" in report.summary()
    assert all(len(n.input) < 3 or not n.input[2].endswith("_bias_corrected") for n in corrected.graph.node)


def test_a_layer_whose_output_the_fp32_model_lacks_is_skipped(case):
    model, info, _, stream = case
    qdq = quantized(model, clip=1.0)
    node = next(n for n in qdq.graph.node if n.name == "conv3")
    node.output[0] = "renamed"  # as a placement's fold renames a Conv's output
    qdq.graph.output[0].name = "renamed"
    _, report = correct_biases_empirically(qdq, info, stream)
    assert "conv3" not in report.corrected and "not a tensor of the FP32 model" in report.skipped["conv3"]


def test_quantize_applies_it_by_name_and_records_it(tmp_path, capsys):
    """Through the pipeline, on real calibration ranges: the model's output (its last Conv's) has
    FP32's per-channel mean on the calibration data, where the uncorrected model is off."""
    model = branchy_model(np.random.default_rng(2))
    path = save(model, tmp_path / "m.onnx")
    x = (np.random.default_rng(3).normal(size=(32, 3, 8, 8)) * 2 + 1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert (
        main(["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--method", "percentile", "--out-dir", str(tmp_path / "r"), "-q"])
        == 0
    )
    base = ["quantize", str(path), "--ranges", str(tmp_path / "r" / "ranges.json"), "--high-precision", "fp32", "--force"]
    assert main([*base, "--algorithms", "none", "-q", "-o", str(tmp_path / "none.onnx")]) == 0
    capsys.readouterr()
    assert main([*base, "--algorithms", "empirical-bias-correction", "-o", str(tmp_path / "ebc.onnx")]) == 0
    assert "bias correction: 4 layer(s) corrected for the mean shift measured in the quantized model" in capsys.readouterr().out
    ebc = onnx.load(str(tmp_path / "ebc.onnx"))
    assert {p.key: p.value for p in ebc.metadata_props}["quantkit.algorithms"] == "empirical-bias-correction"
    fp32 = make_session(model).run(None, {"x": x})[0].mean(axis=(0, 2, 3))
    gaps = {
        k: np.abs(make_session(str(tmp_path / f"{k}.onnx")).run(None, {"x": x})[0].mean(axis=(0, 2, 3)) - fp32).max()
        for k in ("none", "ebc")
    }
    assert gaps["ebc"] < 1e-3 * max(1.0, np.abs(fp32).max()) < gaps["none"]
