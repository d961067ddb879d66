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


# ---- every options object, every field, random types and values -----------------------------------------
import dataclasses  # noqa: E402
import math  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quantkit import options as options_module  # noqa: E402

OPTION_CLASSES = [
    c
    for c in vars(options_module).values()
    if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == options_module.__name__
]

#: anything a careless caller might pass: wrong types, edge numbers, strings of numbers, containers
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["all", "entropy", "minmax,mse", "CPUExecutionProvider", "1G", "10.1", "fp16", "tensorrt", "auto"]),
    st.lists(st.one_of(st.text(max_size=5), st.integers(-3, 300)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()),
)


def _accepted(option_object, name, value):
    """What a created options object holds in ``name``: the value, or its normalised form."""
    held = getattr(option_object, name)
    return held == value or isinstance(held, tuple) or held is value or (isinstance(value, float) and math.isnan(value))


@settings(max_examples=1000, deadline=None)
@given(cls=st.sampled_from(OPTION_CLASSES), data=st.data())
def test_any_value_in_any_field_is_kept_or_refused_naming_the_field(cls, data):
    """Property: creating an options object with any value in any field either works (and the
    object holds a value of the field's type) or raises QuantkitError naming that field; never
    another exception, and never a wrong type accepted silently."""
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    value = data.draw(VALUES)
    try:
        made = cls(**{field: value})
    except QuantkitError as err:
        named = (err.option,) if isinstance(err.option, str) else tuple(err.option or ())
        assert field in named, (cls.__name__, field, value, err.option, str(err))
        return
    options_module.check_types(made)  # what it holds has the field's type
    assert _accepted(made, field, value), (cls.__name__, field, value)


def test_objects_in_the_wrong_place_are_refused_by_the_api(tmp_path):
    from conftest import DEMO_CALIB, DEMO_MODEL

    import quantkit

    with pytest.raises(QuantkitError) as err:
        quantkit.calibrate(DEMO_MODEL, DEMO_CALIB, DataOptions())
    assert err.value.option == "options" and "CalibrationOptions" in str(err.value)
    with pytest.raises(QuantkitError) as err:
        quantkit.quantize(DEMO_MODEL, tmp_path / "o.onnx", options_module.QuantizeOptions(), check=DataOptions())
    assert err.value.option == "check"
