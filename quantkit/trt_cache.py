"""TensorRT's calibration cache: the text file ``trtexec --calib`` and the TensorRT 8-10 calibrators read.

Format (see shared/reference/tensorrt-facts.md section 1)::

    TRT-<version>-<Algorithm>
    <tensor name>: <8 hex digits>

The hex is the big-endian IEEE-754 bit pattern of the float32 *scale* (amax / 127), lower case.
The version is TensorRT's NV_TENSORRT_VERSION as a decimal: major*1000 + minor*100 + patch up
to 9.x (8.6.1 -> 8601), major*10000 + minor*100 + patch from 10.x (10.14.1 -> 101401). A cache
whose header does not match the reading TensorRT is silently ignored by TensorRT, so the stamp
is configurable and checked when read.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit._io import read_text_file, write_bytes_atomic
from quantkit.errors import QuantkitError
from quantkit.ranges import RangeSet, ranges_from_scales

#: The TensorRT release the header claims by default (override with --trt-version to match yours).
DEFAULT_TRT_VERSION = "10.14.1"
#: trtexec --calib and quantkit's own TensorRT 10 build path read the cache through an
#: IInt8EntropyCalibrator2, which expects this algorithm name; the values are quantkit's own
#: whichever method computed them.
DEFAULT_ALGORITHM = "EntropyCalibration2"
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")

_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
#: a scale is the 8-digit hex of a float32; "0" alone marks a tensor without a range
_LINE = re.compile(r"^(.*): ([0-9a-fA-F]{8}|0)$")
#: a cache larger than this is not a calibration cache (a million tensors is ~60 MB)
MAX_CACHE_BYTES = 64 << 20
#: characters that end a line for str.splitlines: a tensor name holding one could not be read back
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def encode_version(version: str) -> int:
    """'10.14.1' -> 101401, '8.6.1' -> 8601 (decimal, never hex)."""
    parts = version.strip().split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts):
        raise QuantkitError(f"TensorRT version '{version}' is not of the form MAJOR.MINOR.PATCH (e.g. 10.14.1)", option="trt_version")
    major, minor, patch = (int(p) for p in [*parts, "0", "0"][:3])
    if minor > 99 or patch > 99:
        raise QuantkitError(f"TensorRT version '{version}': minor and patch must be below 100", option="trt_version")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def decode_version(number: int) -> str:
    if number >= 100000:
        major, rest = divmod(number, 10000)
    else:
        major, rest = divmod(number, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]


@dataclass(frozen=True)
class TrtCache:
    """A parsed cache: header fields and tensor -> scale (None where the cache holds 0, i.e. no range)."""

    version: int
    algorithm: str
    scales: dict[str, float | None]

    @property
    def version_string(self) -> str:
        return decode_version(self.version)

    def amax(self, name: str) -> float | None:
        scale = self.scales.get(name)
        return None if scale is None else scale * 127.0


def format_trt_cache(scales: dict[str, float], trt_version: str = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM) -> bytes:
    if algorithm not in ALGORITHMS:
        raise QuantkitError(f"unknown TensorRT calibration algorithm '{algorithm}'; choose from {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{encode_version(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if any(c in _LINE_BREAKS for c in name) or not name:
            raise QuantkitError(f"tensor name {name!r} contains a line break (or is empty) and cannot be written to a TensorRT cache")
        if not (scale > 0 and scale < float("inf")):
            raise QuantkitError(f"tensor '{name}' has scale {scale}; a TensorRT cache needs a positive finite scale")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_trt_cache(
    path: str | Path, scales: dict[str, float], trt_version: str = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM
) -> Path:
    """Write ``scales`` (tensor -> amax/127) as a TensorRT calibration cache, atomically."""
    return write_bytes_atomic(path, format_trt_cache(scales, trt_version, algorithm))


def parse_trt_cache(text: str, source: str = "<cache>", expect_version: str | None = None) -> TrtCache:
    """Parse a cache; every malformed line, duplicate tensor or unusable scale is a clear error.

    Lines end at "\n" only (a trailing "\r" is dropped), as TensorRT reads them.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not (m := _HEADER.match(lines[0].strip())):
        first = lines[0][:60] if lines else ""
        raise QuantkitError(f"{source} is not a TensorRT calibration cache: first line {first!r} is not TRT-<version>-<Algorithm>")
    if len(m.group(1)) > 9:
        raise QuantkitError(f"{source}: the header's TensorRT version {m.group(1)[:12]}... is not a version number")
    version, algorithm = int(m.group(1)), m.group(2)
    if expect_version is not None and version != encode_version(expect_version):
        raise QuantkitError(
            f"{source} was written for TensorRT {decode_version(version)} (TRT-{version}) but {expect_version} "
            f"was asked for; TensorRT ignores a cache from another version: recalibrate or give the matching TensorRT version",
            option="trt_version",
        )
    scales: dict[str, float | None] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        lm = _LINE.match(line)
        if not lm:
            raise QuantkitError(f"{source}, line {lineno}: expected '<tensor>: <8 hex digits, or 0>', got {line[:80]!r}")
        name, value = lm.group(1), hex_to_scale(lm.group(2))
        if name in scales:
            raise QuantkitError(f"{source}, line {lineno}: tensor {name[:80]!r} appears twice; which scale is meant?")
        if value == 0:
            scales[name] = None  # "name: 00000000" means no range
            continue
        if (
            not math.isfinite(value)
            or value < 0
            or value < float(np.finfo(np.float32).tiny)
            or value * 127 > float(np.finfo(np.float32).max)
        ):
            raise QuantkitError(
                f"{source}, line {lineno}: tensor {name[:80]!r} has scale {value!r}; a scale must be a positive, normal, finite float32"
            )
        scales[name] = value
    return TrtCache(version=version, algorithm=algorithm, scales=scales)


def read_trt_cache(path: str | Path, expect_version: str | None = None) -> TrtCache:
    path = Path(path)
    text = read_text_file(path, "calibration cache", MAX_CACHE_BYTES)
    return parse_trt_cache(text, str(path), expect_version)


def ranges_from_trt_cache(cache: TrtCache, source: str = "<cache>") -> RangeSet:
    """The cache's scales as a RangeSet (method ``cache``), e.g. to build a Q/DQ model for TensorRT 11."""
    params = {"source": source, "trt_version": cache.version_string, "algorithm": cache.algorithm}
    return ranges_from_scales(cache.scales, "cache", params, {"path": "", "sha256": ""})
