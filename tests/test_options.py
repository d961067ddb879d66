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
