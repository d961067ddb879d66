import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODEL

import quantkit
from quantkit.backends.ort import build_ort
from quantkit.backends.trt import layer_precisions_from_inspector
from quantkit.backends.trtexec import parse_shapes, shell, trtexec_command
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.plan import PrecisionPlan


def test_onnxruntime_build_is_numerically_the_source(tmp_path, demo_val):
    built = build_ort(DEMO_MODEL, tmp_path / "demo.ort.onnx", "ort-cpu")
    settings = json.loads(built.settings.read_text())
    assert settings["providers"] == ["CPUExecutionProvider"] and settings["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    optimized = onnx.load(str(built.model))
    assert len(optimized.graph.node) < len(onnx.load(str(DEMO_MODEL)).graph.node)  # BN folded, Conv+ReLU fused
    x = {"image": demo_val[0][:64]}
    a = ort.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(built.model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_trtexec_10x_implicit_int8_from_a_cache():
    cmd = trtexec_command(
        "m.onnx", "m.engine", trt_major=10, precision="int8", calib_cache="m.cache", workspace_mib=2048, timing_cache="t.cache"
    )
    assert cmd == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16", "--calib=m.cache",
        "--memPoolSize=workspace:2048M", "--timingCacheFile=t.cache", "--skipInference",
    ]  # fmt: skip


def test_trtexec_10x_plan_and_dynamic_shapes():
    plan = PrecisionPlan(default="int8", nodes={"/head/Conv": "fp16", "re:.*/stem/.*": "fp32"})
    shapes = parse_shapes("images:1x3x640x640/8x3x640x640/16x3x640x640")
    cmd = trtexec_command(
        "m.onnx",
        "m.engine",
        trt_major=10,
        precision="int8",
        calib_cache="c",
        plan=plan,
        layer_names=["/stem/Conv", "/body/Conv", "/head/Conv"],
        shapes=shapes,
    )
    assert "--precisionConstraints=obey" in cmd
    # int8 entries stay unconstrained (OBEY on a layer without an INT8 kernel fails); output types say the same
    assert "--layerPrecisions=/stem/Conv:fp32,/head/Conv:fp16" in cmd
    assert "--layerOutputTypes=/stem/Conv:fp32,/head/Conv:fp16" in cmd
    assert "--minShapes=images:1x3x640x640" in cmd and "--optShapes=images:8x3x640x640" in cmd and "--maxShapes=images:16x3x640x640" in cmd


def test_trtexec_qdq_for_10x_and_11x():
    assert trtexec_command("q.onnx", "q.engine", trt_major=10, typed=True) == [
        "trtexec",
        "--onnx=q.onnx",
        "--saveEngine=q.engine",
        "--stronglyTyped",
        "--skipInference",
    ]
    # 11.x is always strongly typed and has no precision flags at all
    assert trtexec_command("q.onnx", "q.engine", trt_major=11, typed=True, precision="int8") == [
        "trtexec",
        "--onnx=q.onnx",
        "--saveEngine=q.engine",
        "--skipInference",
    ]
    assert shell(["trtexec", "--onnx=my model.onnx"]) == "trtexec '--onnx=my model.onnx'"


def test_trtexec_11x_refuses_what_it_removed():
    with pytest.raises(QuantkitError, match="reads no calibration cache.*--from-cache"):
        trtexec_command("m.onnx", "m.engine", trt_major=11, precision="int8", calib_cache="m.cache")
    with pytest.raises(QuantkitError, match="removed --fp16"):
        trtexec_command("m.onnx", "m.engine", trt_major=11, precision="fp16")
    with pytest.raises(QuantkitError, match="no per-layer precision flags"):
        trtexec_command("m.onnx", "m.engine", trt_major=11, typed=True, plan=PrecisionPlan())
    with pytest.raises(QuantkitError, match="min <= opt <= max"):
        parse_shapes("x:8x3/1x3/16x3")


def test_inspector_report_maps_fused_layers_back_to_onnx_nodes():
    info = {
        "Layers": [
            {"Name": "/conv1/Conv + /relu1/Relu", "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
            {"Name": "/head/Gemm", "Outputs": [{"Format/Datatype": "Half format"}]},
            {"Name": "/out/Softmax", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        ]
    }
    assert layer_precisions_from_inspector(info) == {
        "/conv1/Conv": "int8",
        "/relu1/Relu": "int8",
        "/head/Gemm": "fp16",
        "/out/Softmax": "fp32",
    }


def test_build_without_tensorrt_says_what_is_missing(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the engine would be built")
    except ImportError:
        pass
    cache = tmp_path / "m.cache"
    cache.write_text("TRT-100801-EntropyCalibration2\nimage: 3c010204\n")
    code = main(["build", str(DEMO_MODEL), "--precision", "int8", "--cache", str(cache), "-o", str(tmp_path / "demo.engine")])
    captured = capsys.readouterr()
    assert (
        code == 2 and "TensorRT is not installed" in captured.err and "pip install tensorrt (the quantkit-onnx[gpu] extra" in captured.err
    )
    assert "trtexec --onnx=" in captured.out and f"--calib={cache}" in captured.out
    script = (tmp_path / "demo.trtexec.sh").read_text()
    assert script.startswith("#!/bin/sh") and "is stamped for TensorRT 10.8.1 (TRT-100801-EntropyCalibration2)" in script
    assert not (tmp_path / "demo.engine").exists()
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out and "TensorRT: not installed" in out


def _qdq_conv(tmp_path):
    """A small TensorRT-format Q/DQ model (quantkit's placement of conftest's conv model)."""
    from conftest import conv_model, save

    import quantkit
    from quantkit.export.qdq import quantize_model

    path = save(conv_model(), tmp_path / "conv.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    q, _ = quantize_model(
        quantkit.load_model(path), quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax")).ranges
    )
    return save(q, tmp_path / "conv.qdq.onnx")


def test_a_plan_with_a_qdq_model_is_refused_before_tensorrt_is_needed(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"default": "int8"}')
    assert main(["build", str(_qdq_conv(tmp_path)), "--plan", str(plan), "-o", str(tmp_path / "q.engine")]) == 2
    assert "a precision plan with a typed (Q/DQ or float16) model" in capsys.readouterr().err


# ---- the TensorRT path itself: runs where TensorRT and a GPU exist ------------------------------
@pytest.mark.tensorrt
def test_tensorrt_builds_fp16_int8_from_cache_and_qdq(tmp_path, demo_preprocess):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install tensorrt on a GPU machine")
    import quantkit
    from quantkit.backends.trt import build_engine, capabilities
    from quantkit.export.qdq import quantize_model

    caps = capabilities(trt)
    shapes = parse_shapes("image:1x1x28x28/8x1x28x28/32x1x28x28")
    result = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_MODEL.parent / "mnist" / "calib",
        quantkit.CalibrationOptions(methods="entropy"),
        out=tmp_path,
        data_options=quantkit.DataOptions(num_samples=64, preprocess=demo_preprocess),
    )
    q, _ = quantize_model(quantkit.load_model(DEMO_MODEL), result.ranges)
    onnx.save(q, str(tmp_path / "q.onnx"))
    built = build_engine(tmp_path / "q.onnx", tmp_path / "q.engine", typed=True, shapes=shapes)
    assert built.engine.stat().st_size > 0 and "int8" in built.layer_precisions.values()
    if caps.implicit_int8:
        cached = build_engine(
            DEMO_MODEL, tmp_path / "c.engine", precision="int8", calib_cache=tmp_path / "demo_cnn.entropy.cache", shapes=shapes
        )
        assert cached.engine.stat().st_size > 0
        fp16 = build_engine(DEMO_MODEL, tmp_path / "f.engine", precision="fp16", shapes=shapes, timing_cache=tmp_path / "timing.cache")
        assert fp16.engine.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0


def test_builds_that_would_silently_differ_are_refused(tmp_path, capsys):
    out = str(tmp_path / "demo.engine")
    plan = tmp_path / "plan.json"
    plan.write_text('{"default": "int8"}')
    qdq_model = _qdq_conv(tmp_path)
    assert main(["build", str(qdq_model), "--plan", str(plan), "-o", out]) == 2
    assert "a precision plan with a typed (Q/DQ or float16) model" in capsys.readouterr().err
    assert main(["build", str(DEMO_MODEL), "--precision", "int8", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "placeholder scales" in err and "--placeholder-ranges" in err
    main(["build", str(DEMO_MODEL), "--precision", "int8", "--placeholder-ranges", "-o", out])  # opted in: gets as far as TensorRT
    assert "--int8" in (tmp_path / "demo.trtexec.sh").read_text()


def test_a_cache_for_another_tensorrt_is_refused_or_restamped(tmp_path):
    import dataclasses

    from quantkit.api.build import _cache_for
    from quantkit.trt_cache import read_trt_cache

    cache = tmp_path / "m.cache"
    cache.write_text("TRT-100801-EntropyCalibration2\nimage: 3c010204\n")
    args = quantkit.BuildOptions(cache=str(cache), restamp=False)
    assert _cache_for(args, "10.8.1.5", tmp_path / "e.engine")[0] == str(cache)  # same version: used as is
    with pytest.raises(QuantkitError, match="TensorRT would ignore it"):
        _cache_for(args, "10.14.1", tmp_path / "e.engine")
    args = dataclasses.replace(args, restamp=True)
    used, note = _cache_for(args, "10.14.1", tmp_path / "e.engine")
    restamped = read_trt_cache(used)
    assert restamped.version == 101401 and restamped.scales == read_trt_cache(cache).scales and "restamped" in note[0]


def test_the_python_build_and_trtexec_apply_the_same_constraints():
    """One description of the plan; the Python build's per-layer decisions are trtexec's (sampleEngines.cpp)."""
    from quantkit.backends.trtexec import LayerFacts, constraint_for, plan_constraints

    plan = PrecisionPlan(default="fp16", nodes={"/head/Conv": "fp32"})
    layers = [
        LayerFacts("/stem/Conv"),  # float: takes the default
        LayerFacts("/head/Conv"),  # named: always
        LayerFacts("/Shape", precision="int32"),  # INT32 default precision: skipped
        LayerFacts("/mask/Not", precision="bool"),  # Bool: skipped
        LayerFacts("/Constant_3", constant_weights="int64"),  # constant of non-activation weights: skipped
        LayerFacts("/Reshape", input_is_shape=True),  # operates on a shape tensor: skipped
        LayerFacts("/Cast", input_type="int32", output_type="int64"),  # non-activation in and out: skipped
    ]
    constraints = plan_constraints(plan, [layer.name for layer in layers])
    cmd = trtexec_command("m.onnx", "m.engine", trt_major=10, precision="fp16", plan=plan, layer_names=[layer.name for layer in layers])
    printed = dict(item.rsplit(":", 1) for item in next(c for c in cmd if c.startswith("--layerPrecisions=")).split("=", 1)[1].split(","))
    assert printed == constraints == {"*": "fp16", "/head/Conv": "fp32"}
    decided = {layer.name: constraint_for(constraints, layer) for layer in layers}
    assert decided == {
        "/stem/Conv": "fp16", "/head/Conv": "fp32", "/Shape": None, "/mask/Not": None, "/Constant_3": None, "/Reshape": None, "/Cast": None,
    }  # fmt: skip


def test_int8_nodes_under_another_default_and_int8_plans_without_int8_are_refused():
    from quantkit.backends.trtexec import check_build_request, plan_constraints

    with pytest.raises(QuantkitError, match="cannot leave them to INT8"):
        plan_constraints(PrecisionPlan(default="fp16", nodes={"a": "int8"}), ["a", "b"])
    with pytest.raises(QuantkitError, match="INT8 is not enabled"):
        check_build_request(precision="fp16", calib_cache=None, typed=False, plan=PrecisionPlan(default="int8"))


def test_inspector_reads_the_10x_and_11x_schemas_and_compute_precision():
    """10.x: one "Format/Datatype" string per tensor (the Developer Guide's example); 11.x: a
    "DataType" field beside "Format" (the IEngineInspector migration page's I/O tensors)."""
    v10 = {
        "Layers": [
            {
                "Name": "node_of_gpu_0/res4_0_branch2a_1 + node_of_gpu_0/res4_0_branch2a_bn_1 + node_of_gpu_0/res4_0_branch2a_bn_2",
                "LayerType": "CaskConvolution",
                "Inputs": [{"Name": "a", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
                "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32 format"}],  # INT8 compute, float output
                "Weights": {"Type": "Int8", "Count": 131072},
            },
            {"Name": "Reformatting CopyNode for Input Tensor 0 to x", "LayerType": "Reformat", "Inputs": [], "Outputs": []},
        ]
    }
    assert layer_precisions_from_inspector(v10) == dict.fromkeys(
        ["node_of_gpu_0/res4_0_branch2a_1", "node_of_gpu_0/res4_0_branch2a_bn_1", "node_of_gpu_0/res4_0_branch2a_bn_2"], "int8"
    )
    v11 = {
        "Layers": [
            {
                "Name": "{ForeignNode[/attn/MatMul.../attn/Softmax]}",
                "LayerType": "Myelin",
                "Inputs": [{"Name": "q", "DataType": "Half", "Format": "Row major linear FP16 format (kLINEAR)"}],
                "Outputs": [{"Name": "o", "DataType": "Half", "Format": "Row major linear FP16 format (kLINEAR)"}],
                "Metadata": "[ONNX Layer: /attn/MatMul]\x1f[ONNX Layer: /attn/Div]\x1f[ONNX Layer: /attn/Softmax]",
            },
            {"Name": "/head/Gemm", "Inputs": [{"DataType": "Float"}], "Outputs": [{"DataType": "Float"}]},
            # "Datatype" beside "Format", as NVIDIA's 11.1 trt-engine-explorer reads it; kgen type words
            # ("Half", "Float", "Int8") as trex's activations.py maps them
            {"Name": "/neck/Conv", "Inputs": [{"Datatype": "Int8", "Format": "Channel major"}], "Outputs": [{"Datatype": "Half"}]},
            {"Name": "{ForeignNode[/x/A.../x/B]}", "Inputs": [{"DataType": "Int8"}], "Outputs": []},  # no metadata: no names
        ]
    }
    assert layer_precisions_from_inspector(v11) == {
        "/attn/MatMul": "fp16",
        "/attn/Div": "fp16",
        "/attn/Softmax": "fp16",
        "/head/Gemm": "fp32",
        "/neck/Conv": "int8",
    }
    assert layer_precisions_from_inspector({"Layers": ["/a/Conv + /a/Relu"]}) == {"/a/Conv": "unknown", "/a/Relu": "unknown"}


def test_doctor_names_two_onnxruntime_flavours_installed_together():
    from quantkit.cli.doctor import flavour_problem, installed_flavours

    assert "onnxruntime" in installed_flavours()
    assert flavour_problem(["onnxruntime"]) == ""
    problem = flavour_problem(["onnxruntime", "onnxruntime-gpu"])
    assert "installed together" in problem and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in problem


def test_doctor_names_tensorrt_wheels_the_driver_cannot_run():
    from quantkit.cli.doctor import cuda_problem, driver_cuda

    header = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |"
    assert driver_cuda(header) == (12, 4) and driver_cuda("no GPU here") is None
    assert cuda_problem([12], (12, 4)) == "" and cuda_problem([], (12, 4)) == "" and cuda_problem([13], None) == ""
    problem = cuda_problem([13], (12, 4))
    assert "built for CUDA 13 but the driver supports CUDA 12.4" in problem and "pip install tensorrt-cu12" in problem
    assert "installed for CUDA 12 and 13 together" in cuda_problem([12, 13], (13, 0))


def test_a_cache_of_another_algorithm_is_refused_before_any_build(tmp_path, capsys):
    """trtexec's --calib hands the cache to an IInt8EntropyCalibrator2 (TensorRT
    samples/common/sampleEngines.cpp), and a calibrator reads a cache only when the header names its
    own algorithm: a MinMaxCalibration cache would be ignored, also after --restamp (which keeps the
    algorithm). The Python build pairs each algorithm with its calibrator class."""
    from conftest import conv_model, save

    from quantkit.backends.trt import cache_calibrator

    model = save(conv_model(), tmp_path / "m.onnx")
    cache = tmp_path / "mm.cache"
    cache.write_text("TRT-101401-MinMaxCalibration\nc1: 3c010204\n")
    for extra in ([], ["--restamp"]):
        argv = ["build", str(model), "--precision", "int8", "--cache", str(cache), *extra, "-o", str(tmp_path / "e.engine")]
        assert main(argv) == 2
        assert "IInt8EntropyCalibrator2" in capsys.readouterr().err
    assert not (tmp_path / "e.trtexec.sh").exists()

    class Base:
        def __init__(self) -> None:
            pass

    classes = ("IInt8EntropyCalibrator2", "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator")
    fake = type("trt", (), {n: type(n, (Base,), {}) for n in classes})
    for algorithm, base in (("EntropyCalibration2", "IInt8EntropyCalibrator2"), ("MinMaxCalibration", "IInt8MinMaxCalibrator")):
        calibrator = cache_calibrator(fake, f"TRT-101401-{algorithm}\nc1: 3c010204\n".encode())
        assert isinstance(calibrator, getattr(fake, base)) and calibrator.read_calibration_cache().startswith(b"TRT-")
    with pytest.raises(QuantkitError, match="IInt8LegacyCalibrator"):
        cache_calibrator(fake, b"TRT-101401-LegacyCalibration\nc1: 3c010204\n")


def test_output_types_are_set_on_float_outputs_only():
    """NvInfer.h: ILayer::setOutputType on a non-float output (TopK's INT32 indices) is ignored
    with an error message, so the Python build never asks for it."""
    from types import SimpleNamespace

    from quantkit.backends.trt import set_float_output_types

    outputs = [SimpleNamespace(is_shape_tensor=False, dtype="float32"), SimpleNamespace(is_shape_tensor=False, dtype="int32"),
               SimpleNamespace(is_shape_tensor=True, dtype="float32")]  # fmt: skip
    set_calls = []
    layer = SimpleNamespace(num_outputs=3, get_output=outputs.__getitem__, set_output_type=lambda j, t: set_calls.append((j, t)))
    set_float_output_types(layer, "float16", ("float32", "float16"))
    assert set_calls == [(0, "float16")]
