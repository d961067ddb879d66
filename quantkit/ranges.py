"""``RangeSet``: the calibration result every later step consumes (a plain data object + JSON file).

One file, ``ranges.json``, holds per tensor its observed min/max and counts, and the ``amax``
(and ``scale = amax / 127``) of every method that was computed, with the methods' parameters
and the provenance (model hash, samples, batch size, input shapes, quantkit version). Floats are
written with Python's shortest round-trip repr, keys in a fixed order and no timestamps, so the
same model + data + options give a byte-identical file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantkit._io import read_text_file, write_bytes_atomic
from quantkit.errors import QuantkitError

FORMAT = "quantkit.ranges"
FORMAT_VERSION = 1
#: a ranges file larger than this is not one (a million tensors is ~300 MB of JSON; real models have thousands)
MAX_RANGES_BYTES = 256 << 20
INT8_MAX = 127
#: scale written for a tensor whose amax is 0 (it was constant zero): any positive scale
#: represents 0 exactly; 1.0 follows onnxruntime's convention for degenerate ranges.
CONSTANT_TENSOR_SCALE = 1.0


def amax_to_scale(amax: float) -> float:
    """TensorRT's symmetric int8 scale, as the float32 value that the cache and Q/DQ store.

    A zero (or non-representable) amax gets ``CONSTANT_TENSOR_SCALE``: never 0, inf or NaN.
    """
    scale = float(np.float32(amax / INT8_MAX))
    if not (math.isfinite(scale) and scale >= float(np.finfo(np.float32).tiny)):
        return CONSTANT_TENSOR_SCALE
    return scale


#: the observed statistics a tensor's range records (and its histogram carries)
STAT_FIELDS = ("min", "max", "count", "zeros", "nonfinite", "sentinels")


@dataclass
class TensorRange:
    """Observed statistics and per-method amax of one tensor."""

    name: str
    min: float
    max: float
    count: int
    zeros: int = 0
    nonfinite: int = 0
    sentinels: int = 0
    amax: dict[str, float] = field(default_factory=dict)

    @property
    def constant(self) -> bool:
        return self.min == self.max

    def scale(self, method: str) -> float:
        return amax_to_scale(self.amax[method])

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in STAT_FIELDS},
            "amax": dict(self.amax),
            "scale": {m: self.scale(m) for m in self.amax},
        }


@dataclass
class RangeSet:
    """Ranges for every calibrated tensor of one model, for one or more methods."""

    tensors: dict[str, TensorRange]
    methods: dict[str, dict[str, Any]]  # method name -> its parameters
    model: dict[str, Any]  # path, sha256
    calibration: dict[str, Any]  # num_samples, batch_size, input_shapes, data, preprocess, bins
    quantkit_version: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def default_method(self) -> str:
        return next(iter(self.methods))

    def amax(self, tensor: str, method: str | None = None) -> float:
        return self.tensors[tensor].amax[self.method_name(method)]

    def scales(self, method: str | None = None) -> dict[str, float]:
        """tensor name -> scale for one method, in calibration (graph) order."""
        method = self.method_name(method)
        return {name: r.scale(method) for name, r in self.tensors.items()}

    def check_model(self, path: str | Path, sha256: str) -> None:
        """Refuse ranges calibrated on another model than the one at ``path`` (by content hash)."""
        theirs = self.model.get("sha256")
        if theirs and theirs != sha256:
            raise QuantkitError(
                f"the ranges were calibrated on another model ({self.model.get('path')}, sha256 {theirs[:12]}...) "
                f"than {path} (sha256 {sha256[:12]}...); recalibrate this model",
                option="ranges",
            )

    def with_missing_from(self, other: RangeSet) -> RangeSet:
        """These ranges plus the tensors only ``other`` has (its methods' amax kept under their names)."""
        tensors = dict(self.tensors)
        for name, r in other.tensors.items():
            tensors.setdefault(name, r)
        return RangeSet(
            tensors, {**other.methods, **self.methods}, self.model, self.calibration, self.quantkit_version, list(self.warnings)
        )

    def method_format(self, method: str) -> str:
        """The Q/DQ format a method's amax was chosen for ("int8", "fp8" or "any"), as calibration
        recorded it (files written before it was recorded: from the method's name)."""
        recorded = self.methods.get(method, {}).get("for_format")
        if isinstance(recorded, str):
            return recorded
        return "fp8" if method == "mse-fp8" else "any" if method == "minmax" else "int8"

    def with_observed_max(self, method: str = "minmax") -> RangeSet:
        """A copy with ``method`` holding each tensor's observed max |x| (what the minmax method
        computes, from the min/max every range records)."""
        tensors = {n: replace(t, amax={**t.amax, method: max(abs(t.min), abs(t.max))}) for n, t in self.tensors.items()}
        return replace(self, tensors=tensors, methods={**self.methods, method: {"for_format": "any"}})

    def method_name(self, method: str | None) -> str:
        """``method`` checked against the methods held, or the default one for None."""
        if method is None:
            return self.default_method
        if method not in self.methods:
            raise QuantkitError(f"ranges hold no '{method}' method (have: {', '.join(self.methods)}); recalibrate with --method {method}")
        return method

    # ---- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "quantkit_version": self.quantkit_version,
            "model": self.model,
            "calibration": self.calibration,
            "methods": self.methods,
            "default_method": self.default_method,
            "warnings": self.warnings,
            "tensors": {name: r.to_json() for name, r in self.tensors.items()},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return write_bytes_atomic(path, self.dumps().encode())

    @classmethod
    def load(cls, path: str | Path) -> RangeSet:
        """Read and validate a ranges file: every key, type and amax is checked here, once."""
        path = Path(path)
        text = read_text_file(path, "ranges file", MAX_RANGES_BYTES)
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise QuantkitError(f"{path} is not valid JSON ({str(exc)[:80]}); was it written by quantkit calibrate?") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise QuantkitError(f'{path} is not a quantkit ranges file (missing "format": "{FORMAT}")')
        return cls.from_json(doc, str(path))

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = "ranges") -> RangeSet:
        def fail(what: str) -> QuantkitError:
            return QuantkitError(f"{source}: {what}; rewrite it with quantkit calibrate")

        version = doc.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise fail(f"format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise QuantkitError(f"{source} has ranges format {version}; this quantkit reads up to {FORMAT_VERSION}: upgrade quantkit")
        for key, kind in (("tensors", dict), ("methods", dict), ("model", dict), ("calibration", dict)):
            if not isinstance(doc.get(key), kind):
                raise fail(f'"{key}" must be an object, got {type(doc.get(key)).__name__}')
        methods = doc["methods"]
        if not methods or not all(isinstance(k, str) and isinstance(v, dict) for k, v in methods.items()):
            raise fail('"methods" must map each method name to its parameters')
        tensors = {name: _tensor_from_json(name, t, methods, fail) for name, t in doc["tensors"].items()}
        methods = dict(methods)
        default = doc.get("default_method")
        if default in methods:  # keep the default first
            methods = {default: methods[default], **{k: v for k, v in methods.items() if k != default}}
        warnings = doc.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise fail('"warnings" must be a list of strings')
        version_text = doc.get("quantkit_version", "")
        return cls(
            tensors=tensors,
            methods=methods,
            model=doc["model"],
            calibration=doc["calibration"],
            quantkit_version=version_text if isinstance(version_text, str) else "",
            warnings=list(warnings),
        )


def _tensor_from_json(name: str, t: Any, methods: dict[str, Any], fail: Any) -> TensorRange:
    """One tensor's entry of a ranges file, every field checked (``fail`` makes the error)."""
    if not isinstance(t, dict):
        raise fail(f"tensor {name[:80]!r} must be an object")
    stats: dict[str, Any] = {}
    for key in ("min", "max"):
        v = t.get(key)
        if not _is_number(v) or not math.isfinite(v):
            raise fail(f"tensor {name[:80]!r}: {key} must be a finite number, got {v!r}")
        stats[key] = float(v)
    for key in ("count", "zeros", "nonfinite", "sentinels"):
        v = t.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise fail(f"tensor {name[:80]!r}: {key} must be a non-negative integer, got {v!r}")
        stats[key] = v
    amax = t.get("amax")
    if not isinstance(amax, dict) or set(amax) - set(methods) or not amax:
        raise fail(f"tensor {name[:80]!r}: amax must give a value for the file's methods ({', '.join(methods)})")
    constant_zero = stats["min"] == stats["max"] == 0.0
    for method, v in amax.items():
        ok = _is_number(v) and math.isfinite(v) and abs(v) < float(np.finfo(np.float32).max)
        if not ok or v < 0 or (v == 0 and not constant_zero):
            raise fail(
                f"tensor {name[:80]!r}: {method} amax is {v!r}; an amax must be positive and finite "
                "(0 only for a tensor that is constantly zero)"
            )
    return TensorRange(name=name, amax={m: float(v) for m, v in amax.items()}, **stats)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ranges_from_scales(
    scales: dict[str, float | None], method: str, params: dict[str, Any], model: dict[str, Any], warnings: list[str] | None = None
) -> RangeSet:
    """A RangeSet holding only symmetric amax values (amax = scale * 127), e.g. from a TensorRT
    cache or a Q/DQ model. Min/max are unknown and set to -amax/+amax; entries without a scale are skipped."""
    tensors = {}
    for name, scale in scales.items():
        if scale is None:
            continue
        amax = float(np.float32(scale)) * INT8_MAX  # exact in float64, so amax/127 gives the scale back
        tensors[name] = TensorRange(name, -amax, amax, 0, amax={method: amax})
    return RangeSet(
        tensors=tensors, methods={method: params}, model=model, calibration={}, quantkit_version="", warnings=list(warnings or [])
    )
