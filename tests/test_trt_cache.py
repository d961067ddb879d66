import struct

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.trt_cache import (
    decode_version,
    encode_version,
    format_trt_cache,
    hex_to_scale,
    parse_trt_cache,
    read_trt_cache,
    scale_to_hex,
    write_trt_cache,
)


def test_known_scale_encodings():
    assert scale_to_hex(np.float32(1.0 / 127)) == "3c010204"  # amax 1.0
    assert hex_to_scale("3c010204") == struct.unpack(">f", bytes.fromhex("3c010204"))[0]
    assert hex_to_scale("3c010a14") * 127 == pytest.approx(1.0002, abs=1e-4)  # a [0,1] image input
    assert scale_to_hex(0.5) == "3f000000" and scale_to_hex(2.0) == "40000000"


def test_version_encoding_is_decimal():
    assert encode_version("8.6.1") == 8601
    assert encode_version("7.1.3") == 7103
    assert encode_version("10.14.1") == 101401
    assert decode_version(101401) == "10.14.1" and decode_version(8601) == "8.6.1"
    with pytest.raises(QuantkitError):
        encode_version("ten")


def test_exact_bytes():
    data = format_trt_cache({"input": 1.0 / 127, "/conv/Conv_output_0": 0.5}, "8.6.1", "EntropyCalibration2")
    assert data == b"TRT-8601-EntropyCalibration2\ninput: 3c010204\n/conv/Conv_output_0: 3f000000\n"


def test_round_trip(tmp_path):
    scales = {"a": 0.013, "b:c": 2.5e-5, "(Unnamed Layer* 3) [Shuffle]_output": 7.0}
    path = write_trt_cache(tmp_path / "m.cache", scales, "10.14.1", "MinMaxCalibration")
    cache = read_trt_cache(path, expect_version="10.14.1")
    assert cache.algorithm == "MinMaxCalibration" and cache.version_string == "10.14.1"
    assert cache.scales == {k: float(np.float32(v)) for k, v in scales.items()}
    assert not list(tmp_path.glob(".*tmp"))


def test_zero_entry_means_no_range():
    cache = parse_trt_cache("TRT-8601-EntropyCalibration2\nx: 3c010204\n366: 0\n")
    assert cache.scales["366"] is None and cache.amax("366") is None
    assert cache.amax("x") == pytest.approx(1.0)


def test_bad_caches_are_clear_errors(tmp_path):
    with pytest.raises(QuantkitError, match="not a TensorRT calibration cache"):
        parse_trt_cache("calibration.json\n", "c.cache")
    with pytest.raises(QuantkitError, match="line 2"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\nx 1.5\n", "c.cache")
    with pytest.raises(QuantkitError, match="written for TensorRT 8.6.1"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\nx: 3c010204\n", "c.cache", expect_version="10.14.1")
    with pytest.raises(QuantkitError, match="not found"):
        read_trt_cache(tmp_path / "missing.cache")
    with pytest.raises(QuantkitError, match="positive finite"):
        format_trt_cache({"x": 0.0})
