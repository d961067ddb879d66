"""Transformer placement for TensorRT: the attention core stays float unless asked, node filters
choose what else is quantized, and a plan's entries win over both."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper

import quantkit
from quantkit.cli import main
from quantkit.export.qdq import quantize_model
from quantkit.plan import NodeFilter, PrecisionPlan

S, D = 8, 16
PROJECTIONS = {"proj_q", "proj_k", "proj_v", "proj_o"}
ATTENTION = {"scores", "context"}


def encoder_block():
    """LayerNorm -> Q/K/V projections -> Q.K^T / sqrt(d) + mask -> Softmax -> .V -> output projection -> residual."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(f"w_{n}", TensorProto.FLOAT, [D, D], rng.normal(scale=0.3, size=D * D)) for n in "qkvo"]
    inits += [
        helper.make_tensor("gamma", TensorProto.FLOAT, [D], np.ones(D)),
        helper.make_tensor("beta", TensorProto.FLOAT, [D], np.zeros(D)),
        helper.make_tensor("sqrt_d", TensorProto.FLOAT, [], [4.0]),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
        *[helper.make_node("MatMul", ["h", f"w_{n}"], [n], name=f"proj_{n}") for n in "qkv"],
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Div", ["s", "sqrt_d"], ["s_scaled"], name="scale"),
        helper.make_node("Add", ["s_scaled", "mask"], ["s_masked"], name="mask_add"),
        helper.make_node("Softmax", ["s_masked"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "w_o"], ["o"], name="proj_o"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    return float_model(nodes, {"x": ["N", S, D], "mask": ["N", 1, S]}, {"y": ["N", S, D]}, inits)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn")
    path = save(encoder_block(), tmp / "block.onnx")
    rng = np.random.default_rng(1)
    mask = np.where(rng.random((32, 1, S)) < 0.2, -1e4, 0.0).astype(np.float32)
    np.savez(tmp / "calib.npz", x=rng.normal(size=(32, S, D)).astype(np.float32), mask=mask)
    info = quantkit.load_model(path)
    return tmp, info, quantkit.calibrate(path, tmp / "calib.npz", quantkit.CalibrationOptions(methods="minmax")).ranges


def quantized(info, ranges, **kwargs):
    return set(quantize_model(info, ranges, target="tensorrt", **kwargs)[1].int8_nodes)


def test_the_attention_core_stays_float_and_the_projections_are_quantized(block):
    _, info, ranges = block
    q, report = quantize_model(info, ranges, target="tensorrt")
    assert set(report.int8_nodes) & {n for n in PROJECTIONS | ATTENTION} == PROJECTIONS
    assert all(report.kept_float[n].startswith("attention core") for n in ATTENTION)
    # LayerNorm, Softmax and the mask arithmetic read no Q/DQ
    dq_outputs = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for node in q.graph.node:
        if node.name in ("ln", "softmax", "mask_add", "scale"):
            assert not set(node.input) & dq_outputs, node.name
    assert ATTENTION <= quantized(info, ranges, quantize_attention=True)


def test_filters_choose_and_a_plan_wins_where_both_speak(block):
    _, info, ranges = block
    assert quantized(info, ranges, filters=NodeFilter(exclude_op_types=("MatMul",))) & PROJECTIONS == set()
    assert quantized(info, ranges, filters=NodeFilter(nodes=("proj_[qk]",))) & (PROJECTIONS | ATTENTION) == {"proj_q", "proj_k"}
    assert quantized(info, ranges, filters=NodeFilter(exclude_nodes=("_v$", "_o$"))) & PROJECTIONS == {"proj_q", "proj_k"}
    plan = PrecisionPlan(default="int8", nodes={"scores": "int8", "proj_q": "int8"})
    chosen = quantized(info, ranges, plan=plan, filters=NodeFilter(op_types=("Conv",)))
    assert chosen & (PROJECTIONS | ATTENTION) == {"scores", "proj_q"}  # named by the plan: quantized despite both rules
    with pytest.raises(quantkit.QuantkitError, match="not a valid regular expression"):
        NodeFilter(nodes=("proj_[",))


def test_quantize_cli_filters(block, tmp_path, capsys):
    tmp, info, _ = block
    assert (
        main(["calibrate", str(info.path), "--data", str(tmp / "calib.npz"), "--method", "minmax", "--out-dir", str(tmp_path), "-q"]) == 0
    )
    out = tmp_path / "q.onnx"
    args = ["quantize", str(info.path), "--ranges", str(tmp_path / "ranges.json"), "--exclude-nodes", "proj_o", "-o", str(out)]
    assert main([*args, "--data", str(tmp / "calib.npz")]) == 0
    text = capsys.readouterr().out
    assert "proj_o" in text and "filter: name matches --exclude-nodes" in text


def test_a_residual_add_after_a_matmul_stays_float_for_tensorrt(block):
    """TensorRT fuses a residual Add into a conv's int8 epilogue; a transformer's MatMul + residual
    is fused by Myelin with the residual stream in float, so its input gets no Q/DQ."""
    _, info, ranges = block
    _, report = quantize_model(info, ranges, target="tensorrt")
    assert report.kept_float["residual"] == "Add without a conv branch"


def test_onnxruntime_placement_of_an_encoder_block(block):
    """The onnxruntime target keeps the attention core and the transformer's Add/Mul in float, and
    quantizes no projection output that only float ops read (MatMulIntegerToFloat needs no Q)."""
    _, info, ranges = block
    q, report = quantize_model(info, ranges, target="onnxruntime")
    assert set(report.int8_nodes) == PROJECTIONS
    assert all(report.kept_float[n].startswith("attention core") for n in ATTENTION)
    assert report.kept_float["residual"].startswith("Add not fed by a Conv")
    quantized_tensors = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized_tensors == {"h", "ctx"}  # the projections' inputs only; q, k, v and o stay float
    assert ATTENTION <= set(quantize_model(info, ranges, target="onnxruntime", quantize_attention=True)[1].int8_nodes)


def decomposed_layernorm_block(axes=(-1,)):
    """torch.onnx's LayerNorm before opset 17: ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, * gamma, + beta."""
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12]),
        helper.make_tensor("gamma", TensorProto.FLOAT, [D], np.linspace(0.5, 8.0, D)),
        helper.make_tensor("beta", TensorProto.FLOAT, [D], np.zeros(D)),
        helper.make_tensor("w", TensorProto.FLOAT, [D, D], np.random.default_rng(3).normal(size=D * D)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=list(axes), name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
        helper.make_node("Pow", ["centred", "two"], ["square"], name="square"),
        helper.make_node("ReduceMean", ["square"], ["var"], axes=[-1], name="var"),
        helper.make_node("Add", ["var", "eps"], ["shifted"], name="eps_add"),
        helper.make_node("Sqrt", ["shifted"], ["std"], name="std"),
        helper.make_node("Div", ["centred", "std"], ["normed"], name="norm"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="gamma_mul"),
        helper.make_node("Add", ["scaled", "beta"], ["ln_out"], name="beta_add"),
        helper.make_node("MatMul", ["ln_out", "w"], ["y"], name="proj"),
    ]
    return float_model(nodes, {"x": ["N", S, D]}, {"y": ["N", S, D]}, inits, opset=13)


@pytest.mark.parametrize("decomposed", [False, True])
def test_a_layernorm_output_is_quantized_at_its_observed_max(tmp_path, decomposed):
    """Clipping calibrators cut a LayerNorm output's systematic outlier channels: its scale is the
    observed max / 127 whatever the method's amax, for the fused op and the decomposed form."""
    import dataclasses

    import onnx_graphsurgeon as gs

    from quantkit.export.qdq import layernorm_outputs

    model, ln_out = (decomposed_layernorm_block(), "ln_out") if decomposed else (encoder_block(), "h")
    path = save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    feeds = {"x": rng.normal(size=(16, S, D)).astype(np.float32)}
    if not decomposed:
        feeds["mask"] = np.zeros((16, 1, S), np.float32)
    np.savez(tmp_path / "x.npz", **feeds)
    info = quantkit.load_model(path)
    assert ln_out in layernorm_outputs(gs.import_onnx(model))
    assert not layernorm_outputs(gs.import_onnx(decomposed_layernorm_block(axes=(1,))))  # another axis: not a LayerNorm
    ranges = quantkit.calibrate(path, tmp_path / "x.npz", quantkit.CalibrationOptions(methods="minmax")).ranges
    t = ranges.tensors[ln_out]
    observed = max(abs(t.min), abs(t.max))
    clipped = dataclasses.replace(ranges, tensors={**ranges.tensors, ln_out: dataclasses.replace(t, amax={"minmax": observed / 4})})
    _, report = quantize_model(info, clipped, target="tensorrt", check_hash=False)
    assert report.layernorm_maxima == [ln_out]
    assert report.activation_params[ln_out][0] == pytest.approx(observed / 127, rel=1e-6)
    assert "1 LayerNorm output(s) quantized at their observed max" in report.summary()
