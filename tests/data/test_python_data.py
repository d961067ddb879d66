"""Data from Python and from Hugging Face datasets: each gives exactly the ranges of the same
samples read from files (the file readers are the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO_MODEL, DEMO_PREPROCESS, DEMO_VAL

import quantkit
from quantkit.errors import QuantkitError

N = 48


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(N, 1, 28, 28)).astype(np.float32)


def amaxes(result):
    r = result.ranges
    return {(t, m): r.tensors[t].amax[m] for t in r.tensors for m in r.methods}


def test_a_generator_and_a_list_give_the_ranges_of_the_same_npy(images, tmp_path):
    np.save(tmp_path / "calib.npy", images)
    options = quantkit.CalibrationOptions(methods="entropy,minmax")
    reference = amaxes(quantkit.calibrate(DEMO_MODEL, tmp_path / "calib.npy", options))

    def generator():
        for k in range(0, N, 8):  # batches of 8 along axis 0, then single samples: both are accepted
            yield {"image": images[k : k + 8]} if k < N // 2 else {"image": images[k]}
            for j in range(k + 1, k + 8):
                if k >= N // 2:
                    yield {"image": images[j]}

    got = quantkit.calibrate(DEMO_MODEL, generator(), options)  # batch size from memory: the peeked sample is replayed
    assert got.ranges.calibration["num_samples"] == N and amaxes(got) == reference
    assert got.ranges.calibration["data"] == "Python generator"
    listed = quantkit.calibrate(DEMO_MODEL, [{"image": x} for x in images], options, data_options=quantkit.DataOptions(batch_size=5))
    assert amaxes(listed) == reference


def test_a_saved_hugging_face_dataset_gives_the_ranges_of_its_parquet(tmp_path):
    import datasets

    spec = quantkit.PreprocessSpec.load(DEMO_PREPROCESS)
    data = quantkit.DataOptions(preprocess=spec, num_samples=64)
    options = quantkit.CalibrationOptions(methods="percentile")
    reference = amaxes(quantkit.calibrate(DEMO_MODEL, DEMO_VAL, options, data_options=data))
    ds = datasets.load_dataset("parquet", data_files={"validation": str(DEMO_VAL)}, split="validation")
    ds.save_to_disk(str(tmp_path / "saved"))
    assert amaxes(quantkit.calibrate(DEMO_MODEL, tmp_path / "saved", options, data_options=data)) == reference
    assert amaxes(quantkit.calibrate(DEMO_MODEL, ds, options, data_options=data)) == reference  # the object itself
    report = quantkit.evaluate(DEMO_MODEL, tmp_path / "saved", quantkit.EvalOptions(variants="fp32", latency=False), data_options=data)
    assert report.labelled and report.metric_names == ["top1"] and report.variant("fp32").metrics["top1"] > 0.9


def test_evaluate_takes_a_list_of_dicts_with_labels(images):
    rows = [{"image": x, "label": k % 10} for k, x in enumerate(images)]
    report = quantkit.evaluate(DEMO_MODEL, rows, quantkit.EvalOptions(variants="fp32", latency=False))
    assert report.labelled and report.data["samples"] == N and report.data["path"] == "Python list"


def test_bad_python_data_is_a_clear_error(images):
    with pytest.raises(QuantkitError, match="item 0 of the Python list is a ndarray: give dicts"):
        quantkit.calibrate(DEMO_MODEL, [images[0]])
    with pytest.raises(QuantkitError, match="key.*pixels.*name no model input"):
        quantkit.calibrate(DEMO_MODEL, [{"image": images[0], "pixels": 1}])
    with pytest.raises(QuantkitError, match="hf:no-such-dataset-xyz: not in the local Hugging Face cache.*never downloads"):
        quantkit.calibrate(DEMO_MODEL, "hf:no-such-dataset-xyz")
    gen = ({"image": x} for x in images)
    quantkit.calibrate(DEMO_MODEL, gen, quantkit.CalibrationOptions(methods="minmax"))
    with pytest.raises(QuantkitError, match="yielded no samples|already read"):
        quantkit.calibrate(DEMO_MODEL, gen, quantkit.CalibrationOptions(methods="minmax"))
    with pytest.raises(QuantkitError, match="Ray workers needs data that each worker can open"):
        quantkit.calibrate(DEMO_MODEL, [{"image": images[0]}], scale_out=quantkit.ScaleOut(workers=2))
