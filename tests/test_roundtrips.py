"""Property-based round trips of every reader and its writer: cache, ranges, plan, preprocessing."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.data.preprocess import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet, TensorRange
from quantkit.trt_cache import format_trt_cache, parse_trt_cache

FLOAT32_MAX = float(np.finfo(np.float32).max)

# tensor names: any text without line breaks (which a line-based cache cannot hold)
names = st.text(min_size=1, max_size=40).filter(lambda s: not any(c in s for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))
scales = st.floats(min_value=2.0**-99, max_value=2.0**99, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, scales, min_size=1, max_size=20))
def test_cache_round_trip(table):
    text = format_trt_cache(table).decode()
    parsed = parse_trt_cache(text)
    assert list(parsed.scales) == list(table)
    for name, scale in table.items():
        assert parsed.scales[name] == float(np.float32(scale))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_cache_parser_never_crashes(text):
    try:
        parse_trt_cache("TRT-101401-EntropyCalibration2\n" + text)
    except QuantkitError:
        pass


@given(st.sampled_from(["\n", "\r", "\x85", "\u2028", "\x0b"]))
def test_names_with_line_breaks_are_refused_when_writing(sep):
    with pytest.raises(QuantkitError, match="line break"):
        format_trt_cache({f"a{sep}b": 0.5})


amaxes = st.floats(min_value=1e-20, max_value=1e30, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.tuples(amaxes, amaxes), min_size=1, max_size=10))
def test_ranges_round_trip(table):
    tensors = {n: TensorRange(n, -a, b, 10, amax={"minmax": max(a, b), "entropy": min(a, b)}) for n, (a, b) in table.items()}
    ranges = RangeSet(tensors, {"minmax": {}, "entropy": {}}, {"path": "m.onnx", "sha256": "0" * 64}, {"num_samples": 10})
    again = RangeSet.from_json(json.loads(ranges.dumps()))
    assert again.dumps() == ranges.dumps()


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=3)))
def test_ranges_reader_refuses_any_bad_amax(value):
    doc = {
        "format": "quantkit.ranges",
        "methods": {"minmax": {}},
        "model": {},
        "calibration": {},
        "tensors": {"t": {"min": -1.0, "max": 1.0, "count": 1, "amax": {"minmax": value}}},
    }
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < FLOAT32_MAX
    if good:
        assert RangeSet.from_json(doc).tensors["t"].amax["minmax"] == float(value)
    else:
        with pytest.raises(QuantkitError):
            RangeSet.from_json(doc)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["int8", "fp16", "fp32"]),
    st.sampled_from(["fp16", "fp32"]),
    st.dictionaries(names.filter(lambda s: not s.startswith("re:")), st.sampled_from(["int8", "fp16", "fp32"]), max_size=8),
)
def test_plan_round_trip(default, fallback, nodes):
    plan = PrecisionPlan(default=default, fallback=fallback, nodes=nodes)
    assert PrecisionPlan.from_mapping(json.loads(json.dumps(plan.to_json()))) == plan


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(st.none(), st.integers(1, 2048), st.tuples(st.integers(1, 2048), st.integers(1, 2048))),
    st.floats(min_value=1e-6, max_value=10, allow_nan=False),
    st.one_of(st.none(), st.sampled_from(["RGB", "BGR", "L"])),
    st.one_of(st.none(), st.sampled_from(["NCHW", "NHWC"])),
)
def test_preprocess_round_trip(resize, scale, color, layout):
    spec = PreprocessSpec.from_mapping({"resize": resize, "scale": scale, "color": color, "layout": layout})
    assert PreprocessSpec.from_mapping(json.loads(json.dumps(spec.to_json()))) == spec


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["resize", "center_crop", "scale", "mean", "std", "color", "layout", "dtype"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=6),
                                 st.lists(st.floats(), max_size=3))))  # fmt: skip
def test_preprocess_reader_gives_a_spec_or_a_clear_error(values):
    try:
        PreprocessSpec.from_mapping(values)
    except QuantkitError:
        pass
