"""Options objects: validated on creation, naming the field; old keywords map onto them."""

import pytest

from quantkit.errors import QuantkitError
from quantkit.options import (
    CalibrationOptions,
    DataOptions,
    EvalOptions,
    ExportOptions,
    RuntimeOptions,
    ScaleOut,
    TuneOptions,
    split_options,
)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: CalibrationOptions(bins=1000), "bins"),
        (lambda: CalibrationOptions(bins=1 << 30), "bins"),
        (lambda: CalibrationOptions(percentile=0), "percentile"),
        (lambda: CalibrationOptions(cache_algorithm="Nope"), "cache_algorithm"),
        (lambda: DataOptions(batch_size=0), "batch_size"),
        (lambda: DataOptions(num_samples=-3), "num_samples"),
        (lambda: DataOptions(seed=-1), "seed"),
        (lambda: RuntimeOptions(runtime="cuda"), "runtime"),
        (lambda: ExportOptions(target="tflite"), "target"),
        (lambda: EvalOptions(max_drop=-1), "max_drop"),
        (lambda: TuneOptions(fallback="int4"), "fallback"),
        (lambda: TuneOptions(max_trials=0), "max_trials"),
        (lambda: ScaleOut(workers=0), "workers"),
    ],
)
def test_bad_values_are_refused_naming_the_field(make, option):
    with pytest.raises(QuantkitError) as err:
        make()
    assert err.value.option == option and option in str(err.value)


def test_a_trt_version_the_cache_header_cannot_hold_is_refused():
    with pytest.raises(QuantkitError, match="MAJOR.MINOR.PATCH"):
        CalibrationOptions(trt_version="ten")


def test_old_keywords_map_onto_the_options():
    cal, data, rt = split_options(
        {"methods": "all", "num_samples": 7, "threads": 2, "bins": 4096}, "calibrate", CalibrationOptions(), DataOptions(), RuntimeOptions()
    )
    assert (cal.methods, cal.bins, data.num_samples, rt.threads) == ("all", 4096, 7, 2)
    (scale,) = split_options({"workers": 2, "ray_address": "auto"}, "calibrate", ScaleOut())
    assert (scale.workers, scale.address) == (2, "auto")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        split_options({"nbins": 3}, "calibrate", CalibrationOptions())


def test_calibrate_with_options_equals_calibrate_with_old_keywords(tmp_path):
    import numpy as np
    from conftest import conv_model, save

    import quantkit

    path = save(conv_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(20, 3, 8, 8)).astype(np.float32))
    old = quantkit.calibrate(path, tmp_path / "x.npy", methods="all", batch_size=4, num_samples=16).ranges
    new = quantkit.calibrate(
        path,
        tmp_path / "x.npy",
        quantkit.CalibrationOptions(methods="all"),
        data_options=quantkit.DataOptions(batch_size=4, num_samples=16),
    ).ranges
    assert old.dumps() == new.dumps()
