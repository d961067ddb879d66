import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_PREPROCESS, conv_model, encoder_model, save
from fakequant import activation_fakequant, top1

import quantkit
from quantkit.calibration.collect import CalibrationStats, collect_statistics
from quantkit.calibration.methods import EntropyCalibrator, make_calibrators
from quantkit.calibration.pipeline import compute_ranges, write_outputs
from quantkit.cli import main
from quantkit.data import batches, open_source
from quantkit.errors import QuantkitError
from quantkit.model import load_model
from quantkit.ranges import RangeSet
from quantkit.trt_cache import read_trt_cache

DEMO_ARGS = [str(DEMO_MODEL), "--data", str(DEMO_CALIB), "--preprocess-config", str(DEMO_PREPROCESS), "--quiet", "--batch-size", "32"]


def files_in(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["calibrate", *DEMO_ARGS, "--method", "all", "--num-samples", "256", "--out-dir", str(out)]) == 0
    return out


def test_cli_writes_ranges_and_one_cache_per_method(demo_run):
    assert files_in(demo_run) == [
        "demo_cnn.entropy.cache",
        "demo_cnn.minmax.cache",
        "demo_cnn.mse.cache",
        "demo_cnn.percentile.cache",
        "ranges.json",
    ]
    ranges = RangeSet.load(demo_run / "ranges.json")
    assert ranges.model["sha256"] == load_model(DEMO_MODEL).sha256
    assert ranges.calibration["num_samples"] == 256 and ranges.calibration["input_shapes"] == {"image": [[32, 1, 28, 28]]}
    for method in ("entropy", "minmax", "percentile", "mse"):
        cache = read_trt_cache(demo_run / f"demo_cnn.{method}.cache", expect_version="10.14.1")
        assert cache.algorithm == "EntropyCalibration2"
        assert list(cache.scales) == list(ranges.tensors)  # graph order
        for name, t in ranges.tensors.items():
            assert cache.scales[name] == t.scale(method) == float(np.float32(t.amax[method] / 127))
            assert 0 < t.amax[method] <= max(abs(t.min), abs(t.max)) + 1e-6
    # minmax is the observed range, exactly
    for t in ranges.tensors.values():
        assert t.amax["minmax"] == float(np.float32(max(abs(t.min), abs(t.max))))


def test_outputs_get_ordinary_file_permissions(demo_run):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in demo_run.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_same_inputs_give_byte_identical_outputs(demo_run, tmp_path):
    assert main(["calibrate", *DEMO_ARGS, "--method", "all", "--num-samples", "256", "--out-dir", str(tmp_path)]) == 0
    for name in files_in(demo_run):
        assert (tmp_path / name).read_bytes() == (demo_run / name).read_bytes(), name


def test_ranges_do_not_depend_on_batch_size_or_sharding(demo_preprocess):
    model = load_model(DEMO_MODEL)
    cals = make_calibrators("all")

    def stats(batch_size, start, stop):
        source = open_source(DEMO_CALIB, model, demo_preprocess)
        samples = (s for k, s in enumerate(source) if start <= k < stop)
        return collect_statistics(model, batches(samples, model, batch_size))

    one = stats(32, 0, 96)
    assert stats(7, 0, 96).histograms == one.histograms
    merged = stats(16, 0, 40).merge(stats(32, 40, 96))  # a shard boundary mid-stream
    assert merged.histograms == one.histograms and merged.num_samples == 96
    a = compute_ranges(one, cals, model).tensors
    b = compute_ranges(merged, cals, model).tensors
    assert {n: t.amax for n, t in a.items()} == {n: t.amax for n, t in b.items()}


def test_entropy_ranges_keep_demo_accuracy(demo_run, demo_val):
    images, labels = demo_val
    model = load_model(DEMO_MODEL)
    fp32 = top1(ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]), images, labels)
    assert fp32 == pytest.approx(json.loads((DEMO_MODEL.with_suffix(".json")).read_text())["fp32_val_top1"], abs=1e-9)
    ranges = RangeSet.load(demo_run / "ranges.json")
    for method in ranges.methods:
        sim = activation_fakequant(model.proto, ranges, method)
        acc = top1(ort.InferenceSession(sim.SerializeToString(), providers=["CPUExecutionProvider"]), images, labels)
        assert acc >= fp32 - 0.01, f"{method}: {acc} vs fp32 {fp32}"


def test_unguarded_entropy_collapses_on_the_demo(demo_val, demo_preprocess):
    """Why the guards exist: without them, the KL search clips the spiky input and early ReLUs."""
    images, labels = demo_val
    model = load_model(DEMO_MODEL)
    stats = collect_statistics(model, batches(open_source(DEMO_CALIB, model, demo_preprocess), model, 32, 256))
    plain = compute_ranges(stats, [EntropyCalibrator(suppress_spikes=False, max_saturated=1.0)], model)
    assert plain.amax("image") < 0.5 * plain.tensors["image"].max
    sim = activation_fakequant(model.proto, plain, "entropy")
    assert top1(ort.InferenceSession(sim.SerializeToString(), providers=["CPUExecutionProvider"]), images, labels) < 0.9


def test_transformer_encoder_with_mask_sentinels_and_int_inputs(tmp_path):
    path = save(encoder_model(), tmp_path / "enc.onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=(12, 6))
    mask = np.ones((12, 6), np.int64)
    mask[:, 4:] = 0  # padding: the additive mask holds float32-min sentinels there
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    result = quantkit.calibrate(
        path,
        tmp_path / "calib.npz",
        quantkit.CalibrationOptions(methods="all"),
        out=tmp_path / "out",
        data_options=quantkit.DataOptions(batch_size=4),
    )
    tensors = result.ranges.tensors
    assert "input_ids" not in tensors and "attention_mask" not in tensors  # integers are skipped
    assert {"ln", "q", "kt", "probs", "v", "context", "scores", "mask_bias", "masked"} <= set(tensors)
    assert "hidden" not in tensors  # feeds only LayerNorm, which stays in float
    assert tensors["mask_bias"].sentinels > 0 and tensors["mask_bias"].min == 0.0  # sentinels kept out
    assert tensors["masked"].sentinels > 0 and abs(tensors["masked"].min) < 1e30
    for t in tensors.values():
        for method in t.amax:
            assert math.isfinite(t.scale(method)) and t.scale(method) > 0
    assert any("sentinels" in w for w in result.ranges.warnings)
    cache = read_trt_cache(tmp_path / "out" / "enc.entropy.cache")
    assert all(s is not None and math.isfinite(s) for s in cache.scales.values())
    everything = quantkit.calibrate(
        path, tmp_path / "calib.npz", quantkit.CalibrationOptions(methods="minmax", all_tensors=True)
    ).ranges.tensors
    assert everything["masked"].sentinels > 0 and abs(everything["masked"].min) < 1e30


def test_constant_tensor_gets_a_valid_scale_and_is_reported(tmp_path):
    path = save(conv_model(constant_branch=True), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    result = quantkit.calibrate(path, tmp_path / "x.npy", quantkit.CalibrationOptions(methods="all"))
    zeroed = result.ranges.tensors["zeroed"]
    assert zeroed.min == zeroed.max == 0.0
    assert all(zeroed.scale(m) == 1.0 for m in zeroed.amax)
    assert any("constant tensor" in w and "zeroed" in w for w in result.ranges.warnings)


def test_api_and_cli_agree(demo_run, demo_preprocess):
    result = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="all"),
        data_options=quantkit.DataOptions(num_samples=256, batch_size=32, preprocess=demo_preprocess),
    )
    assert result.ranges.dumps() == (demo_run / "ranges.json").read_text()


# ---- bad input: one clear line, exit code 2, nothing written -----------------------------------


def run_cli(capsys, *args):
    code = main(["calibrate", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_and_corrupt_models(tmp_path, capsys):
    code, err = run_cli(capsys, str(tmp_path / "nope.onnx"), "--data", str(DEMO_CALIB), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "model file not found" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(DEMO_MODEL.read_bytes()[:5000])
    code, err = run_cli(capsys, str(bad), "--data", str(DEMO_CALIB), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "bad.onnx" in err and len(err.splitlines()) == 1
    assert not any((tmp_path / "o").iterdir())


def test_model_with_nothing_to_calibrate(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["b"])],
        "ints",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 4])],
    )
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ints.onnx")
    np.savez(tmp_path / "d.npz", a=np.ones((4, 4), np.int64))
    code, err = run_cli(capsys, str(path), "--data", str(tmp_path / "d.npz"), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "no float activations to calibrate" in err
    code, err = run_cli(capsys, str(path), "--data", str(DEMO_CALIB), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "no float input" in err


def test_unwritable_output_and_unknown_method(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, *DEMO_ARGS, "--out-dir", str(blocker / "sub"))
    assert code == 2 and "not writable" in err
    code, err = run_cli(capsys, *DEMO_ARGS, "--out-dir", str(tmp_path / "o"), "--method", "kl")
    assert code == 2 and "unknown calibration method 'kl'" in err


def test_too_few_samples_writes_nothing(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 28, 28), np.float32))
    code, err = run_cli(capsys, str(DEMO_MODEL), "--data", str(tmp_path / "x.npy"), "--num-samples", "6", "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "has only 5 sample" in err
    assert list((tmp_path / "o").iterdir()) == []


def test_interrupt_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    import quantkit.calibration.collect as calibrate_module

    real = calibrate_module.batches

    def interrupted(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(calibrate_module, "batches", interrupted)
    out = tmp_path / "o"
    code, err = run_cli(capsys, *DEMO_ARGS, "--num-samples", "256", "--out-dir", str(out))
    assert code == 130 and "no output was written" in err
    assert list(out.iterdir()) == []


def test_interrupt_while_writing_leaves_previous_files_intact(tmp_path, monkeypatch, demo_preprocess):
    import quantkit._io as atomic

    result = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="minmax"),
        data_options=quantkit.DataOptions(num_samples=64, preprocess=demo_preprocess),
    )
    write_outputs(result.ranges, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real_replace = atomic.os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    other = quantkit.calibrate(
        DEMO_MODEL,
        DEMO_CALIB,
        quantkit.CalibrationOptions(methods="minmax"),
        data_options=quantkit.DataOptions(num_samples=32, preprocess=demo_preprocess),
    )
    with pytest.raises(KeyboardInterrupt):
        write_outputs(other.ranges, tmp_path)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, nothing half-written


def test_ranges_file_errors(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="not valid JSON"):
        RangeSet.load(tmp_path / "r.json")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(QuantkitError, match="not a quantkit ranges file"):
        RangeSet.load(tmp_path / "r.json")


def test_stats_merge_keeps_input_shapes():
    a = CalibrationStats({}, 2, 2, {"x": [[2, 3]]})
    b = CalibrationStats({}, 3, 3, {"x": [[3, 3]]})
    merged = a.merge(b)
    assert merged.num_samples == 5 and merged.input_shapes == {"x": [[2, 3], [3, 3]]}


def test_batch_size_comes_from_the_memory_budget_and_ranges_do_not_depend_on_it(tmp_path):
    """Without --batch-size, the batch is the largest whose activations fit --max-memory; the
    histograms are exact for any batching, so the caches are byte-identical."""
    from quantkit.calibration.collect import activation_bytes, select_calibration_tensors

    model = load_model(DEMO_MODEL)
    x = np.zeros((1, 1, 28, 28), np.float32)
    total, chosen = activation_bytes(model.proto, {"image": x}, select_calibration_tensors(model.proto))
    assert 0 < chosen < total
    per_sample = total + 3 * chosen  # the run's copy of what it fetches, and two batches queued for the histograms
    budget = 40 * per_sample + 1
    args = [*DEMO_ARGS[:-2], "--num-samples", "96", "--method", "all"]
    assert main(["calibrate", *args, "--max-memory", str(budget), "--out-dir", str(tmp_path / "auto")]) == 0
    auto = RangeSet.load(tmp_path / "auto" / "ranges.json")
    assert auto.calibration["batch_size"] == 40
    assert auto.calibration["batch_from_memory"] == {"max_memory": budget, "bytes_per_sample": per_sample}
    assert main(["calibrate", *args, "--batch-size", "7", "--out-dir", str(tmp_path / "seven")]) == 0
    for cache in (tmp_path / "auto").glob("*.cache"):
        assert cache.read_bytes() == (tmp_path / "seven" / cache.name).read_bytes()
    assert {n: t.amax for n, t in auto.tensors.items()} == {
        n: t.amax for n, t in RangeSet.load(tmp_path / "seven" / "ranges.json").tensors.items()
    }
