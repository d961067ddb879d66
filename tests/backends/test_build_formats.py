"""The Q/DQ format is recorded where later steps read it: ranges.json names the format each
method was chosen for, plans their quantized format, Q/DQ models their own; ``build`` reads the
model's Q/DQ types and writes the trtexec lines that each TensorRT version documents for them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_model, save

import quantkit
from quantkit.backends.trtexec import qdq_facts
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export.qdq import quantize_model
from quantkit.plan import PrecisionPlan


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    model = conv_model()
    onnx.helper.set_model_props(model, {"producer.note": "kept"})
    path = save(model, tmp / "conv.onnx")
    np.save(tmp / "calib.npy", np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    assert (
        main(["calibrate", str(path), "--data", str(tmp / "calib.npy"), "--method", "entropy,minmax,mse-fp8", "--out-dir", str(tmp), "-q"])
        == 0
    )
    ranges = quantkit.RangeSet.load(tmp / "ranges.json")
    made = {}
    for name, kwargs in {
        "int8": {"method": "minmax"},
        "fp8": {"method": "minmax", "fmt": "fp8"},
        "ort": {"method": "minmax", "target": "onnxruntime"},
    }.items():
        q, _ = quantize_model(quantkit.load_model(path), ranges, **kwargs)
        made[name] = save(q, tmp / f"conv.{name}.onnx")
    return tmp, path, made


def test_ranges_record_the_format_each_method_was_chosen_for(case):
    tmp, _, _ = case
    doc = json.loads((tmp / "ranges.json").read_text())
    assert {m: p["for_format"] for m, p in doc["methods"].items()} == {"entropy": "int8", "minmax": "any", "mse-fp8": "fp8"}
    ranges = quantkit.RangeSet.load(tmp / "ranges.json")
    del ranges.methods["entropy"]["for_format"]  # a file from before the key: told by the name
    assert ranges.method_format("entropy") == "int8" and ranges.method_format("mse-fp8") == "fp8"


def test_quantize_warns_when_the_method_was_chosen_for_another_format(case, tmp_path, capsys):
    tmp, path, _ = case
    args = ["quantize", str(path), "--ranges", str(tmp / "ranges.json"), "--data", str(tmp / "calib.npy")]
    assert main([*args, "--method", "entropy", "--format", "fp8", "-o", str(tmp_path / "a.onnx")]) == 0
    assert "the entropy ranges were chosen for int8's grid, not fp8's: mse-fp8 or minmax fit fp8" in capsys.readouterr().out
    assert main([*args, "--method", "minmax", "--format", "fp8", "-o", str(tmp_path / "b.onnx")]) == 0
    assert "chosen for" not in capsys.readouterr().out


def test_qdq_models_record_how_they_were_quantized_and_keep_their_metadata(case):
    _, _, made = case
    props = {p.key: p.value for p in onnx.load(str(made["fp8"])).metadata_props}
    assert props == {"producer.note": "kept", "quantkit.format": "fp8", "quantkit.method": "minmax", "quantkit.target": "tensorrt"}
    assert qdq_facts(onnx.load(str(made["fp8"]))).types == ("fp8",)
    assert qdq_facts(onnx.load(str(made["int8"]))).types == ("int8",)
    ort = qdq_facts(onnx.load(str(made["ort"])))
    assert "uint8" in ort.types and ort.nonzero_zero_points > 0


def test_plans_record_their_quantized_format(case, tmp_path, capsys):
    tmp, path, _ = case
    plan = PrecisionPlan(default="int8", quantized_format="fp8")
    saved = plan.save(tmp_path / "plan.json")
    assert json.loads(saved.read_text())["quantized_format"] == "fp8"
    assert PrecisionPlan.load(saved).quantized_format == "fp8"
    assert PrecisionPlan.from_mapping({"default": "int8"}).quantized_format == "int8"  # older plans: int8
    with pytest.raises(QuantkitError, match="quantized_format must be one of int8, fp8"):
        PrecisionPlan.from_mapping({"default": "int8", "quantized_format": "int4"})
    args = ["quantize", str(path), "--ranges", str(tmp / "ranges.json"), "--method", "minmax", "--plan", str(saved)]
    assert main([*args, "--format", "int8", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "was made for fp8 (its quantized_format) but the format is int8" in err and err.rstrip().endswith("(--format)")
    assert main([*args, "-o", str(tmp_path / "y.onnx"), "-q"]) == 0  # no --format: the plan's
    assert qdq_facts(onnx.load(str(tmp_path / "y.onnx"))).types == ("fp8",)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("tensorrt") is not None, reason="TensorRT is installed: it builds")
def test_build_writes_each_versions_flags_for_the_models_qdq(case, tmp_path, capsys):
    made = case[2]
    assert main(["build", str(made["fp8"]), "-o", str(tmp_path / "fp8.engine")]) == 2  # no TensorRT here: the script only
    script = (tmp_path / "fp8.trtexec.sh").read_text().splitlines()
    assert "# FP8 (E4M3) Q/DQ: strongly typed, no --fp8 (10.x; 11.x removed the flag)" in script[1]
    cmd10 = script[script.index("# TensorRT 10.x") + 1]
    cmd11 = script[script.index("# TensorRT 11.x (strongly typed; precision comes from the ONNX)") + 1]
    assert "--stronglyTyped" in cmd10.split()  # detected from the model, without --qdq
    for flag in ("--fp8", "--int8", "--fp16", "--best", "--stronglyTyped"):
        assert flag not in cmd11.split()
    assert not {"--fp8", "--int8", "--fp16"} & set(cmd10.split())
    capsys.readouterr()


def test_build_refuses_what_tensorrt_would_not_build_as_asked(case, tmp_path, capsys):
    _, path, made = case
    out = str(tmp_path / "m.engine")
    assert main(["build", str(made["ort"]), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "asymmetric or unsigned Q/DQ (onnxruntime's format" in err and "--target tensorrt" in err
    assert main(["build", str(path), "--qdq", "-o", out]) == 2
    assert "has no QuantizeLinear/DequantizeLinear node" in capsys.readouterr().err
    cache = tmp_path / "c.cache"
    cache.write_text("TRT-100801-EntropyCalibration2\n")
    assert main(["build", str(made["int8"]), "--precision", "int8", "--cache", str(cache), "-o", out]) == 2
    assert "already carries Q/DQ scales" in capsys.readouterr().err
    plan = PrecisionPlan(default="int8", quantized_format="fp8").save(tmp_path / "p.json")
    assert main(["build", str(path), "--precision", "int8", "--cache", str(cache), "--plan", str(plan), "-o", out]) == 2
    assert "is an fp8 plan: TensorRT's calibration caches hold INT8 scales only" in capsys.readouterr().err


def test_fp8_without_a_method_takes_each_tensors_observed_max(tmp_path, capsys):
    """E4M3 needs no clipping: with entropy-only ranges, --format fp8 scales every activation by
    its observed max / 448 (the minmax amax, from the min/max each range records)."""
    path = save(conv_model(), tmp_path / "conv.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(path), "--data", str(tmp_path / "x.npy"), "--method", "entropy", "--out-dir", str(tmp_path), "-q"]) == 0
    out = tmp_path / "conv.fp8.onnx"
    args = ["--format", "fp8", "--high-precision", "fp32"]  # float32 scales: compared exactly below
    assert main(["quantize", str(path), "--ranges", str(tmp_path / "ranges.json"), *args, "-o", str(out)]) == 0
    assert "fp8: minmax ranges (E4M3's range needs no clipping" in capsys.readouterr().out
    ranges = quantkit.RangeSet.load(tmp_path / "ranges.json")
    model = onnx.load(str(out))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in ranges.tensors:
            t = ranges.tensors[node.input[0]]
            assert float(inits[node.input[1]]) == pytest.approx(max(abs(t.min), abs(t.max)) / 448, rel=1e-6)
            checked += 1
    assert checked and {p.key: p.value for p in model.metadata_props}["quantkit.method"] == "minmax"
