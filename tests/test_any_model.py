"""Issue 27's kinds of failure on small models built here: a clipped decision, the default method,
inputs not batched on axis 0, and activations larger than the memory budget."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
from conftest import conv_model, float_model, save
from onnx import TensorProto, helper

import quantkit
from quantkit.cli import main
from quantkit.evaluation.check import FidelityError
from quantkit.export.qdq import quantize_model

RNG = np.random.default_rng(3)


def branches_to_output():
    """Two conv branches joined by a Concat that is the graph output (a detector's head joins so)."""
    w = [helper.make_tensor(f"w{k}", TensorProto.FLOAT, [4, 3, 3, 3], RNG.normal(size=108)) for k in (1, 2)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Concat", ["ra", "rb"], ["y"], axis=1, name="join"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 8, 8, 8]}, w)


def test_what_feeds_an_output_keeps_its_observed_range_whatever_the_method(tmp_path):
    path = save(branches_to_output(), tmp_path / "m.onnx")
    x = RNG.normal(size=(64, 3, 8, 8)).astype(np.float32)
    x[::16] *= 40  # rare outliers: percentile clips them
    np.save(tmp_path / "x.npy", x)
    ranges = quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="percentile")).ranges
    for name in ("ra", "rb"):
        assert ranges.tensors[name].amax["percentile"] < ranges.tensors[name].max  # the method clips them
    _, report = quantize_model(quantkit.load_model(path), ranges, target="onnxruntime")
    assert {"ra", "rb"} <= set(report.decision_maxima)
    for name in ("ra", "rb"):  # the Concat's uint8 inputs span what FP32 produced: [0, observed max] in 255 steps
        t = ranges.tensors[name]
        assert report.activation_params[name] == (pytest.approx(float(np.float32(t.max / 255.0)), rel=1e-6), 0)


def prototype_classifier():
    """x[N, 16] -> MatMul -> logits[N, 10]: samples are noisy class prototypes, so logits are peaked."""
    protos = RNG.normal(size=(10, 16)).astype(np.float32)
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 10], protos.T.copy().ravel())
    model = float_model([helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc")], {"x": ["N", 16]}, {"logits": ["N", 10]}, [w])
    labels = RNG.integers(10, size=128)
    return model, (protos[labels] + RNG.normal(0, 0.3, size=(128, 16))).astype(np.float32)


def test_without_a_method_quantize_never_takes_one_that_fails_the_task(tmp_path):
    model, x = prototype_classifier()
    path = save(model, tmp_path / "cls.onnx")
    np.save(tmp_path / "x.npy", x)
    quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="entropy,minmax,percentile"), out=tmp_path / "cal")
    doc = json.loads((tmp_path / "cal" / "ranges.json").read_text())
    doc["tensors"]["x"]["amax"]["entropy"] = 0.05  # the default method now clips the input to nothing
    (tmp_path / "cal" / "ranges.json").write_text(json.dumps(doc))
    options = quantkit.QuantizeOptions(ranges=tmp_path / "cal" / "ranges.json")
    result = quantkit.quantize(path, tmp_path / "q.onnx", options, data=tmp_path / "x.npy")
    chosen = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}["quantkit.method"]
    assert chosen in ("minmax", "percentile") and result.notes[0].startswith(f"method: {chosen}, the best")
    assert "entropy " in result.notes[0] and ", refused" in result.notes[0]
    # an explicit method is obeyed, and checked (without the automatic trials: SmoothQuant's would
    # calibrate the smoothed model anew, and its entropy ranges are not the ones broken here)
    explicit = dataclasses.replace(options, method="entropy", algorithms=())
    with pytest.raises(FidelityError, match="the new model is broken: output logits"):
        quantkit.quantize(path, tmp_path / "e.onnx", explicit, data=tmp_path / "x.npy")
    assert not (tmp_path / "e.onnx").exists()


def stateful_model():
    """A voice-activity model's inputs: x[N, 16], a scalar sample rate, a state [2, N, 8] batched on axis 1."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [16, 8], RNG.normal(size=128))
    axis = helper.make_tensor("ax", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["h", "srf"], ["hs"]),
        helper.make_node("ReduceMean", ["state"], ["sm"], axes=[0], keepdims=0),
        helper.make_node("Add", ["hs", "sm"], ["y"]),
        helper.make_node("Unsqueeze", ["y", "ax"], ["ns"]),
        helper.make_node("Concat", ["ns", "ns"], ["new_state"], axis=0),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
        helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "N", 8]),
    ]
    return helper.make_model(helper.make_graph(nodes, "vad", inputs, outputs, [w, axis]), opset_imports=[helper.make_opsetid("", 17)])


def test_a_scalar_input_and_a_state_batched_on_axis_1_go_through_every_command(tmp_path, capsys):
    path = save(stateful_model(), tmp_path / "vad.onnx")
    info = quantkit.load_model(path)
    assert info.batch_axes == {"x": 0, "sr": None, "state": 1}
    np.savez(tmp_path / "d.npz", x=RNG.normal(size=(20, 16)).astype(np.float32), sr=np.array(16), state=RNG.normal(size=(2, 20, 8)))
    from quantkit.data.sources import open_source

    first = next(iter(open_source(tmp_path / "d.npz", info)))
    assert first.feeds["state"].shape == (2, 8) and first.feeds["sr"].shape == ()
    data = ["--data", str(tmp_path / "d.npz")]
    assert main(["calibrate", str(path), *data, "--method", "all", "--out-dir", str(tmp_path / "c"), "-q"]) == 0
    ranges = str(tmp_path / "c" / "ranges.json")
    for target in ("tensorrt", "onnxruntime"):
        assert (
            main(["quantize", str(path), "--ranges", ranges, "--target", target, *data, "-o", str(tmp_path / f"{target}.onnx"), "-q"]) == 0
        )
    assert main(["fp16", str(path), "--ranges", ranges, *data, "-o", str(tmp_path / "f.onnx"), "-q"]) == 0
    assert (
        main(["eval", str(path), *data, "--ranges", ranges, "--variants", "fp32,int8:minmax", "--out-dir", str(tmp_path / "e"), "-q"]) == 0
    )
    assert capsys.readouterr().err == ""


def wide_conv():
    w = [helper.make_tensor(f"w{k}", TensorProto.FLOAT, [16, c, 3, 3], RNG.normal(size=16 * c * 9)) for k, c in ((1, 3), (2, 16), (3, 16))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="c2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], pads=[1, 1, 1, 1], name="c3"),
    ]
    return float_model(nodes, {"x": ["N", 3, 64, 64]}, {"y": ["N", 16, 64, 64]}, w)


def test_activations_over_the_budget_are_calibrated_in_passes_with_the_same_ranges(tmp_path):
    path = save(wide_conv(), tmp_path / "w.onnx")
    np.save(tmp_path / "x.npy", RNG.normal(size=(6, 3, 64, 64)).astype(np.float32))
    everything = quantkit.CalibrationOptions(methods="all", all_tensors=True)
    one = quantkit.calibrate(path, tmp_path / "x.npy", everything).ranges
    tight = quantkit.calibrate(path, tmp_path / "x.npy", dataclasses.replace(everything, max_memory=900_000)).ranges
    assert any("passes over the data" in w for w in tight.warnings)
    assert json.dumps({n: dataclasses.asdict(t) for n, t in tight.tensors.items()}, sort_keys=True) == json.dumps(
        {n: dataclasses.asdict(t) for n, t in one.tensors.items()}, sort_keys=True
    )


def shape_derived_concat():
    """A conv's output joined with a tensor built from the input's shape alone (an EEG segmenter's
    head does this): Shape -> Gather -> Concat -> ConstantOfShape -> Mul -> Concat."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 3, 3], RNG.normal(size=54))
    consts = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("rest", TensorProto.INT64, [3], [2, 8, 8]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [0]),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0, name="batch"),
        helper.make_node("Unsqueeze", ["n", "one_axis"], ["n1"], name="n1"),
        helper.make_node("Concat", ["n1", "rest"], ["dims"], axis=0, name="dims"),
        helper.make_node("ConstantOfShape", ["dims"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]), name="ones"),
        helper.make_node("Mul", ["ones", "half"], ["halves"], name="halves"),
        helper.make_node("Concat", ["c", "halves"], ["y"], axis=1, name="join"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 8, 8]}, [w, *consts])


def test_a_tensor_built_from_shapes_needs_no_range(tmp_path):
    path = save(shape_derived_concat(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", RNG.normal(size=(16, 3, 8, 8)).astype(np.float32))
    ranges = quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax")).ranges
    # as the EEG segmenter's calibration did: no range for the shape-built operand
    ranges = dataclasses.replace(ranges, tensors={k: v for k, v in ranges.tensors.items() if k != "halves"})
    _, report = quantize_model(quantkit.load_model(path), ranges, target="onnxruntime")
    assert report.kept_float["join"] == "Concat with an operand computed from shapes alone (no activation, no range)"
    _, fp16 = quantkit.export.fp16.convert_fp16(onnx.load(str(path)), ranges=ranges)
    assert fp16.unranged == []


def test_the_check_holds_out_what_calibration_read(tmp_path):
    """Without check data, or with the file calibration read named as it, the check reads that data
    in calibration's own order, past the samples calibration read; with too few left, it says it
    checks on calibration's samples."""
    from quantkit.evaluation.check import check_samples

    path = save(prototype_classifier()[0], tmp_path / "m.onnx")
    x = np.arange(100 * 16, dtype=np.float32).reshape(100, 16) / 1000
    np.save(tmp_path / "x.npy", x)
    data = quantkit.DataOptions(num_samples=40)
    ranges = quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax"), data_options=data).ranges
    feeds, source = check_samples(quantkit.load_model(path), ranges=ranges, count=32)
    assert source.endswith("(held out: past the 40 samples calibration read)")
    assert np.array_equal(np.concatenate([f["x"] for f in feeds]), x[40:72])
    named, source = check_samples(quantkit.load_model(path), tmp_path / "x.npy", ranges=ranges, count=32)  # the same file, named
    assert source.endswith("(held out: past the 40 samples calibration read)") and np.array_equal(named[0]["x"], feeds[0]["x"])
    np.save(tmp_path / "other.npy", x)  # another file is the user's check data, from its start
    other, _ = check_samples(quantkit.load_model(path), tmp_path / "other.npy", ranges=ranges, count=32)
    assert np.array_equal(np.concatenate([f["x"] for f in other]), x[:32])
    most = quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="minmax")).ranges  # all 100
    _, source = check_samples(quantkit.load_model(path), ranges=most, count=32)
    assert "the samples calibration read: too few were left" in source


def test_eval_takes_the_batch_that_fits_the_model(tmp_path):
    """A fixed-batch-1 model needs no --batch-size (calibrate picks it too), and a model whose
    activations are large gets a batch that fits the budget, not 32."""
    fixed = conv_model(batch=1)
    path = save(fixed, tmp_path / "one.onnx")
    np.save(tmp_path / "x.npy", RNG.normal(size=(6, 3, 8, 8)).astype(np.float32))
    options = quantkit.EvalOptions(variants="fp32,fp16", latency=False)
    assert quantkit.evaluate(path, tmp_path / "x.npy", options).data["samples"] == 6
    from quantkit.data.sources import open_source
    from quantkit.evaluation.run import fitting_batch

    wide = quantkit.load_model(save(wide_conv(), tmp_path / "wide.onnx"))
    np.save(tmp_path / "big.npy", RNG.normal(size=(4, 3, 64, 64)).astype(np.float32))
    source = open_source(tmp_path / "big.npy", wide)
    assert fitting_batch(wide, source, 1 << 30) == 32
    assert 1 <= fitting_batch(wide, source, 2_000_000) < 4  # about 0.8 MB a sample
