import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, conv_model, encoder_model, float_model, save
from fakequant import top1
from onnx import TensorProto, helper, numpy_helper

import quantkit
from quantkit.backends.ort import make_session
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.evaluation.metrics import sqnr_db
from quantkit.export.qdq import quantize_model, ranges_from_qdq
from quantkit.model import load_model
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.trt_cache import format_trt_cache, parse_trt_cache, ranges_from_trt_cache


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return make_session(model)  # TensorRT-format models run as exact fake quantization


def consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def quantized_inputs(model: onnx.ModelProto, node_name: str) -> list[bool]:
    """For each input of a node: does it come from a DequantizeLinear?"""
    prod = producers(model)
    node = next(n for n in model.graph.node if n.name == node_name)
    return [i in prod and prod[i].op_type == "DequantizeLinear" for i in node.input]


@pytest.fixture(scope="module")
def demo_ranges():
    return quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="all"),
        data_options=quantkit.DataOptions(
            num_samples=256, preprocess=quantkit.PreprocessSpec.load(DEMO_MODEL.parent / "mnist" / "preprocess.json")
        ),
    ).ranges


@pytest.fixture(scope="module")
def demo_model():
    return load_model(DEMO_MODEL)


def synthetic_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path, all_tensors: bool = True) -> RangeSet:
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **feeds)
    return quantkit.calibrate(
        path, tmp_path / "calib.npz", quantkit.CalibrationOptions(methods="minmax", all_tensors=all_tensors)
    ).ranges, load_model(path)


# ---- scales are exactly what the ranges and weights say --------------------------------------
@pytest.mark.parametrize("method", ["entropy", "minmax", "percentile", "mse"])
def test_tensorrt_scales_are_exact(demo_model, demo_ranges, method):
    q, report = quantize_model(demo_model, demo_ranges, method=method)
    onnx.checker.check_model(q, full_check=True)
    c = consts(q)
    originals = consts(demo_model.proto)
    q_nodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and len(q_nodes) == len(report.activation_params)
    # a max pooling's output takes its input's scale (max commutes with quantization: no requantize)
    pooled = {n.output[0]: n.input[0] for n in demo_model.proto.graph.node if n.op_type == "MaxPool"}
    for n in q_nodes:
        source = pooled.get(n.input[0], n.input[0])
        assert c[n.input[1]].dtype == np.float32 and c[n.input[2]].dtype == np.int8 and c[n.input[2]] == 0
        assert (
            float(c[n.input[1]]) == demo_ranges.tensors[source].scale(method) == float(np.float32(demo_ranges.amax(source, method) / 127))
        )
    assert pooled and all(demo_ranges.tensors[k].max <= demo_ranges.tensors[v].max for k, v in pooled.items())  # never clips more
    weight_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and c.get(n.input[0]) is not None and c[n.input[0]].ndim > 1]
    assert len(weight_dqs) == 12  # 11 Conv + 1 Gemm
    for n in weight_dqs:
        w = originals[n.input[0][: -len("_quantized")]]
        axis = next(a.i for a in n.attribute if a.name == "axis")
        expected = (np.abs(w.astype(np.float64)).max(axis=tuple(i for i in range(w.ndim) if i != axis)) / 127).astype(np.float32)
        np.testing.assert_array_equal(c[n.input[1]], expected)
        assert c[n.input[0]].dtype == np.int8 and np.abs(c[n.input[0]]).max() == 127


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_demo_int8_accuracy_within_one_point(demo_model, demo_ranges, demo_val, target):
    images, labels = demo_val
    fp32 = top1(session(demo_model.proto), images, labels)
    q, _ = quantize_model(demo_model, demo_ranges, method="entropy", target=target)
    assert top1(session(q), images, labels) >= fp32 - 0.01


def test_onnxruntime_target_uses_uint8_activations_and_folds_bn(demo_model, demo_ranges):
    q, report = quantize_model(demo_model, demo_ranges, method="minmax", target="onnxruntime")
    c = consts(q)
    assert len(report.folded_batchnorms) == 11 and not any(n.op_type == "BatchNormalization" for n in q.graph.node)
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            scale, zp = float(c[n.input[1]]), c[n.input[2]]
            assert zp.dtype == np.uint8
            t = demo_ranges.tensors[n.input[0]]
            lo, hi = min(0.0, t.min), max(0.0, t.max)
            assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
            assert int(zp) == round(-lo / scale)


# ---- placement on small graphs -----------------------------------------------------------------
def test_conv_chain_inputs_quantized_outputs_not(tmp_path):
    model = conv_model()
    ranges, info = synthetic_ranges(model, {"x": np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)}, tmp_path)
    q, _ = quantize_model(info, ranges)
    assert quantized_inputs(q, "conv1") == [True, True] and quantized_inputs(q, "conv2") == [True, True]
    assert quantized_inputs(q, "relu1") == [False]  # Relu reads the raw Conv output: no Q/DQ on weighted-op outputs
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("c1", "y") for n in q.graph.node)


def residual_model():
    rng = np.random.default_rng(3)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4, 3, 3], rng.normal(size=144).astype(np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["skip"], name="relu_in"),
        helper.make_node("Conv", ["skip", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Add", ["c", "skip"], ["sum"], name="residual_add"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu_out"),
    ]
    g = helper.make_graph(
        nodes,
        "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_add_quantizes_the_skip_input(tmp_path):
    ranges, info = synthetic_ranges(
        residual_model(), {"x": np.random.default_rng(0).normal(size=(4, 4, 8, 8)).astype(np.float32)}, tmp_path
    )
    q, report = quantize_model(info, ranges)
    assert quantized_inputs(q, "residual_add") == [False, True]  # conv branch left for Conv+Add fusion
    assert "residual_add" in report.int8_nodes


def concat_model(head: bool):
    """Two convs concatenated; feeding a conv (Inception-like) or the graph output (detector head)."""
    rng = np.random.default_rng(4)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [2, 3, 1, 1], rng.normal(size=6).astype(np.float32)) for n in ("wa", "wb")]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["boxes_raw"], name="conv_a"),
        helper.make_node("Mul", ["boxes_raw", "big"], ["boxes"], name="scale_boxes"),
        helper.make_node("Conv", ["x", "wb"], ["logits"], name="conv_b"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1, name="concat"),
    ]
    inits.append(helper.make_tensor("big", TensorProto.FLOAT, [], [300.0]))
    out = "cat"
    if not head:
        inits.append(helper.make_tensor("wc", TensorProto.FLOAT, [2, 4, 1, 1], rng.normal(size=8).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["cat", "wc"], ["y"], name="conv_c"))
        out = "y"
    channels = 4 if head else 2
    g = helper.make_graph(
        nodes,
        "cat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", channels, 4, 4])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_feeding_a_conv_gets_one_shared_scale(tmp_path):
    ranges, info = synthetic_ranges(
        concat_model(head=False), {"x": np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)}, tmp_path
    )
    q, _ = quantize_model(info, ranges)
    assert quantized_inputs(q, "concat") == [False, False]  # one Q/DQ after the Concat: TensorRT moves it back with one scale
    assert quantized_inputs(q, "conv_c")[0]


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_detection_head_concat_slices_keep_their_own_precision(tmp_path, target):
    x = np.random.default_rng(0).normal(size=(16, 3, 4, 4)).astype(np.float32)
    ranges, info = synthetic_ranges(concat_model(head=True), {"x": x}, tmp_path)
    q, _ = quantize_model(info, ranges, target=target)
    ref = session(info.proto).run(None, {"x": x})[0]
    got = session(q).run(None, {"x": x})[0]
    scores_ref, scores = ref[:, 2:], got[:, 2:]
    # the 0..1 scores must not be quantized with the +-hundreds scale of the boxes
    sqnr = 10 * np.log10(np.sum(scores_ref**2) / np.sum((scores - scores_ref) ** 2))
    assert sqnr > 30


def matmul_model(gemv: bool):
    rng = np.random.default_rng(5)
    n = 1 if gemv else 6
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, n], rng.normal(size=8 * n).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm_weight"), helper.make_node("MatMul", ["h", "hT"], ["y"], name="mm_act")]
    nodes.insert(1, helper.make_node("Transpose", ["h"], ["hT"], perm=[0, 2, 1], name="t"))
    g = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 5])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_matmul_weights_per_channel_on_the_output_axis_and_gemv_left_alone(tmp_path):
    x = {"x": np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)}
    ranges, info = synthetic_ranges(matmul_model(gemv=False), x, tmp_path)
    q, report = quantize_model(info, ranges)
    assert quantized_inputs(q, "mm_weight") == [True, True] and quantized_inputs(q, "mm_act") == [True, True]
    assert report.weight_scales["w"].shape == (6,)  # per output column of the [K, N] weight
    (tmp_path / "g").mkdir()
    ranges, info = synthetic_ranges(matmul_model(gemv=True), x, tmp_path / "g")
    q, report = quantize_model(info, ranges)
    assert quantized_inputs(q, "mm_weight") == [False, False]
    assert "GEMV" in report.kept_float["mm_weight"]


def test_transformer_encoder_quantizes_matmuls_only(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.ones((12, 6), np.int64)
    mask[:, 4:] = 0
    feeds = {"input_ids": rng.integers(0, 20, size=(12, 6)), "attention_mask": mask}
    ranges, info = synthetic_ranges(encoder_model(), feeds, tmp_path, all_tensors=False)
    q, report = quantize_model(info, ranges)
    ops_after_dq = {n.op_type for n in q.graph.node if any(quantized_inputs(q, n.name))}
    assert ops_after_dq == {"MatMul"}  # Softmax, LayerNorm and the mask Add stay in float
    for scale, _ in report.activation_params.values():
        assert np.isfinite(scale) and scale > 0
    ref = session(info.proto).run(None, feeds)[0]
    got = session(q).run(None, feeds)[0]
    cos = np.sum(ref * got) / np.sqrt(np.sum(ref**2) * np.sum(got**2))
    assert cos > 0.99


# ---- plans, migration, bad input ---------------------------------------------------------------
def test_plan_keeps_a_node_in_fp32(demo_model, demo_ranges):
    first_conv = "/features/features.0/features.0.0/Conv"
    plan = PrecisionPlan(nodes={first_conv: "fp32", "re:.*/b4/.*": "fp32"})
    q, report = quantize_model(demo_model, demo_ranges, plan=plan)
    assert quantized_inputs(q, first_conv) == [False, False, False]
    assert report.kept_float[first_conv] == "plan: fp32"
    assert any(n.name == first_conv and n.input[1] == "features.0.0.weight" for n in q.graph.node)  # FP32 weight kept
    assert "/features/features.1/features.1.0/Conv" in report.int8_nodes
    assert not [n for n in report.int8_nodes if "/b4/" in n]


def test_plan_with_a_typo_names_close_matches(demo_model, demo_ranges):
    plan = PrecisionPlan(nodes={"/features/features.0/features.0.0/Con": "fp32"})
    with pytest.raises(QuantkitError, match=r"does not exist \(did you mean '/features/features.0/features.0.0/Conv'"):
        quantize_model(demo_model, demo_ranges, plan=plan)
    with pytest.raises(QuantkitError, match="matches no node"):
        quantize_model(demo_model, demo_ranges, plan=PrecisionPlan(nodes={"re:/head/.*": "fp16"}))


def test_mixed_int8_fp16_fp32_in_one_model(tmp_path, demo_ranges, demo_val, capsys):
    ranges_path = tmp_path / "ranges.json"
    demo_ranges.save(ranges_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text("default: int8\nfallback: fp16\nnodes:\n  /features/features.4/features.4.0/Conv: fp32\n  /fc/Gemm: fp16\n")
    out = tmp_path / "mixed.onnx"
    assert main(["quantize", str(DEMO_MODEL), "--ranges", str(ranges_path), "--plan", str(plan), "-o", str(out)]) == 0
    m = onnx.load(str(out))
    gemm = next(n for n in m.graph.node if n.name == "/fc/Gemm")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    types.update({i.name: i.data_type for i in m.graph.initializer})
    assert types[gemm.input[1]] == TensorProto.FLOAT16
    conv4 = next(n for n in m.graph.node if n.name == "/features/features.4/features.4.0/Conv")
    assert types[conv4.input[1]] == TensorProto.FLOAT and not quantized_inputs(m, conv4.name)[1]
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    assert types[relu.output[0]] == TensorProto.FLOAT16  # non-quantized ops fall back to fp16
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    images, labels = demo_val
    assert top1(session(m), images, labels) >= 0.97


def test_cache_to_qdq_to_cache_round_trip(demo_model, demo_ranges, tmp_path):
    cache_bytes = format_trt_cache(demo_ranges.scales("entropy"))
    from_cache = ranges_from_trt_cache(parse_trt_cache(cache_bytes.decode()))
    assert format_trt_cache(from_cache.scales("cache")) == cache_bytes  # cache -> ranges -> cache is exact
    q, report = quantize_model(demo_model, from_cache)
    back = ranges_from_qdq(q).scales()
    original = demo_ranges.scales("entropy")
    assert back and set(back) == set(report.activation_params)
    assert all(back[name] == original[name] for name in back)  # bit-exact scales after the round trip


def test_cli_from_cache_warns_about_version_and_missing_tensors(tmp_path, demo_ranges, capsys):
    scales = demo_ranges.scales("entropy")
    del scales["/features/features.1/features.1.2/Relu_output_0"]
    cache = tmp_path / "m.cache"
    cache.write_bytes(format_trt_cache(scales, "8.6.1"))
    assert main(["quantize", str(DEMO_MODEL), "--from-cache", str(cache), "--trt-version", "10.14.1", "-o", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    assert "written for TensorRT 8.6.1, not 10.14.1" in out and "no entry in the cache" in out
    assert main(["cache", "--from-qdq", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "back.cache")]) == 0
    back = parse_trt_cache((tmp_path / "back.cache").read_text())
    assert "/features/features.1/features.1.2/Relu_output_0" not in back.scales


def test_bad_inputs(demo_model, demo_ranges, tmp_path, capsys):
    q, _ = quantize_model(demo_model, demo_ranges)
    with pytest.raises(QuantkitError, match="already quantized"):
        quantize_model(q, demo_ranges)
    doc = json.loads(demo_ranges.dumps())
    del doc["tensors"]["/features/features.1/features.1.2/Relu_output_0"]
    (tmp_path / "partial.json").write_text(json.dumps(doc))
    partial = RangeSet.load(tmp_path / "partial.json")
    with pytest.raises(QuantkitError, match=r"no entry for 1 tensor.*features.1.2/Relu_output_0") as refused:
        quantize_model(demo_model, partial)
    assert refused.value.option == "allow_missing"  # the CLI shows it as --allow-missing (below)
    q, report = quantize_model(demo_model, partial, allow_missing=True)
    assert report.kept_float["/features/features.2/a/a.0/Conv"] == "no range for an input"
    other = load_model(save(conv_model(), tmp_path / "other.onnx"))
    with pytest.raises(QuantkitError, match="calibrated on another model"):
        quantize_model(other, demo_ranges)
    code = main(["quantize", str(DEMO_MODEL), "--ranges", str(tmp_path / "partial.json"), "-o", str(tmp_path / "x.onnx")])
    assert code == 2 and "--allow-missing" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_low_opset_model_is_converted(tmp_path):
    model = conv_model()
    model.opset_import[0].version = 11
    ranges, info = synthetic_ranges(model, {"x": np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)}, tmp_path)
    q, report = quantize_model(info, ranges)
    assert report.opset_converted_from == 11 and q.opset_import[0].version == 13
    session(q)


def test_concat_input_also_read_by_a_conv_shares_the_concat_scale(tmp_path):
    """CSP/Inception pattern: a branch output feeds the Concat and another conv."""
    model = concat_model(head=False)
    rng = np.random.default_rng(6)
    model.graph.initializer.append(helper.make_tensor("wd", TensorProto.FLOAT, [2, 2, 1, 1], rng.normal(size=4).astype(np.float32)))
    model.graph.node.append(helper.make_node("Conv", ["scores", "wd"], ["side"], name="conv_side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["n", 2, 4, 4]))
    ranges, info = synthetic_ranges(model, {"x": rng.normal(size=(8, 3, 4, 4)).astype(np.float32)}, tmp_path)
    _, report = quantize_model(info, ranges)
    assert report.activation_params["scores"] == report.activation_params["cat"]
    assert report.activation_params["cat"][0] == ranges.tensors["cat"].scale("minmax")
    _, ort_report = quantize_model(info, ranges, target="onnxruntime")
    assert ort_report.activation_params["scores"] != ort_report.activation_params["cat"]  # onnxruntime requantizes itself


def test_onnxruntime_target_runs_on_integer_kernels_as_it_does_in_fake_quantization(demo_preprocess, demo_val):
    """7-bit weights: onnxruntime's u8 x s8 kernels give the fake-quantized result on any x86 CPU
    (8-bit weights saturate int16 sums on CPUs without VNNI)."""
    import onnxruntime as ort

    ranges = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_MODEL.parent / "mnist" / "calib",
        quantkit.CalibrationOptions(methods="minmax"),
        data_options=quantkit.DataOptions(num_samples=128, preprocess=demo_preprocess),
    ).ranges
    q, report = quantize_model(load_model(DEMO_MODEL), ranges, target="onnxruntime")
    assert report.weight_bits == 7
    assert all(np.abs(onnx.numpy_helper.to_array(i)).max() <= 63 for i in q.graph.initializer if i.name.endswith("_quantized"))
    images, _ = demo_val
    x = {"image": images[:64]}
    fake = ort.SessionOptions()
    fake.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    simulated = ort.InferenceSession(q.SerializeToString(), fake, providers=["CPUExecutionProvider"]).run(None, x)[0]
    kernels = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert sqnr_db(simulated, kernels) > 30  # the same model, whatever the CPU: only requantization rounding differs


def projection_block(swap: bool) -> onnx.ModelProto:
    """ResNet downsample block: main path conv-relu-conv, shortcut one projection conv; Add of both."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), n) for n in ("w1", "w2", "wp")]
    add_inputs = ["proj", "main"] if swap else ["main", "proj"]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["main"], name="conv2"),
        helper.make_node("Conv", ["x", "wp"], ["proj"], name="downsample"),
        helper.make_node("Add", add_inputs, ["y"], name="add"),
    ]
    return float_model(nodes, {"x": [2, 4, 8, 8]}, {"y": [2, 4, 8, 8]}, inits, name="block")


@pytest.mark.parametrize("swap", [False, True])
def test_residual_with_two_conv_branches_quantizes_the_shortcut(tmp_path, swap):
    x = {"x": np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)}
    ranges, info = synthetic_ranges(projection_block(swap), x, tmp_path)
    q, _ = quantize_model(info, ranges)
    # the projection conv's output is quantized; the main path's conv2 is left to fuse with the Add
    assert quantized_inputs(q, "add") == ([True, False] if swap else [False, True])
