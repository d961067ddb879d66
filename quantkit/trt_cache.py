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

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from quantkit._io import write_bytes_atomic
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
_LINE = re.compile(r"^(.*): ([0-9a-fA-F]{1,8})$")


def encode_version(version: str) -> int:
    """'10.14.1' -> 101401, '8.6.1' -> 8601 (decimal, never hex)."""
    parts = version.strip().split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise QuantkitError(f"TensorRT version '{version}' is not of the form MAJOR.MINOR.PATCH (e.g. 10.14.1)")
    major, minor, patch = (int(p) for p in [*parts, "0", "0"][:3])
    if minor > 99 or patch > 99:
        raise QuantkitError(f"TensorRT version '{version}': minor and patch must be below 100")
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
        if "\n" in name:
            raise QuantkitError(f"tensor name {name!r} contains a newline and cannot be written to a TensorRT cache")
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
    lines = text.splitlines()
    if not lines or not (m := _HEADER.match(lines[0].strip())):
        first = lines[0][:60] if lines else ""
        raise QuantkitError(f"{source} is not a TensorRT calibration cache: first line {first!r} is not TRT-<version>-<Algorithm>")
    version, algorithm = int(m.group(1)), m.group(2)
    if expect_version is not None and version != encode_version(expect_version):
        raise QuantkitError(
            f"{source} was written for TensorRT {decode_version(version)} (TRT-{version}) but {expect_version} "
            f"was asked for; TensorRT ignores a cache from another version: recalibrate or pass the matching --trt-version"
        )
    scales: dict[str, float | None] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        lm = _LINE.match(line.rstrip("\r"))
        if not lm:
            raise QuantkitError(f"{source}, line {lineno}: expected '<tensor>: <hex scale>', got {line[:80]!r}")
        value = hex_to_scale(lm.group(2))
        scales[lm.group(1)] = value if value > 0 else None  # "name: 0" means no range
    return TrtCache(version=version, algorithm=algorithm, scales=scales)


def read_trt_cache(path: str | Path, expect_version: str | None = None) -> TrtCache:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"calibration cache not found: {path}") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{path} is not a text TensorRT calibration cache") from None
    return parse_trt_cache(text, str(path), expect_version)


def ranges_from_trt_cache(cache: TrtCache, source: str = "<cache>") -> RangeSet:
    """The cache's scales as a RangeSet (method ``cache``), e.g. to build a Q/DQ model for TensorRT 11."""
    params = {"source": source, "trt_version": cache.version_string, "algorithm": cache.algorithm}
    return ranges_from_scales(cache.scales, "cache", params, {"path": "", "sha256": ""})
