"""Models with control flow (If): float16 conversion and quantization keep them runnable and exact
on both branches. VAD models and merged decoders put most of their network inside If branches,
which read tensors and weights from the enclosing scope without listing them as inputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import if_model, save

from quantkit.cli import main
from quantkit.export.fp16 import convert_fp16
from quantkit.model import outer_scope_reads


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
def test_fp16_keeps_branches_float32_and_runs_both(nested):
    model = if_model(nested)
    fp16, report = convert_fp16(model)
    assert report.kept_fp32["if"].startswith("control flow (If)")
    assert {"conv0", "conv_z"} <= set(report.fp16_nodes)
    # the branches read h (float16 now) through a float32 Cast; w2 stays float32, conv_z reads a float16 Cast of it
    inner = [n for a in next(n for n in fp16.graph.node if n.op_type == "If").attribute for n in a.g.node]
    assert "h" not in {i for n in inner for i in n.input} and "h_cast_fp32" in {i for n in inner for i in n.input}
    w2 = next(i for i in fp16.graph.initializer if i.name == "w2")
    assert w2.data_type == onnx.TensorProto.FLOAT
    assert next(n for n in fp16.graph.node if n.name == "conv_z").input[1] == "w2_cast_fp16"
    for sign in (1, -1):
        want, got = run(model, inputs(sign)), run(fp16, inputs(sign))
        for a, b in zip(want, got, strict=True):
            assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_quantize_default_path_writes_a_model_that_runs_both_branches(tmp_path):
    model = save(if_model(), tmp_path / "if.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([inputs(1), inputs(-1)] * 8))
    assert main(["calibrate", str(model), "--data", str(data), "--out-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = tmp_path / "if.int8.onnx"
    code = main(["quantize", str(model), "--data", str(data), "--ranges", str(tmp_path / "r" / "ranges.json"), "-o", str(out), "--quiet"])
    assert code == 0
    source, quantized = onnx.load(str(model)), onnx.load(str(out))
    for sign in (1, -1):
        for a, b in zip(run(source, inputs(sign)), run(quantized, inputs(sign)), strict=True):
            assert 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)) > 20
