"""One typed, frozen options object per stage, validated when it is created.

The stages' functions take these instead of long keyword lists (``calibrate(model, data,
CalibrationOptions(methods="all"), data_options=DataOptions(num_samples=512))``). Errors name the
field (``option=``), which the CLI shows as its flag.
"""

from __future__ import annotations

import functools
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantkit.data.preprocess import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.plan import NodeFilter
from quantkit.trt_cache import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION, encode_version

RUNTIME_NAMES = ("ort-cpu", "ort-cuda", "tensorrt")
TARGETS = ("tensorrt", "onnxruntime")
FALLBACKS = ("fp16", "fp32")
HIGH_PRECISIONS = ("fp16", "fp32")
DEFAULT_VARIANTS = "fp32,fp16,int8:entropy,int8:minmax,int8:percentile,int8:mse"
#: activation memory calibration may hold at once (it picks the batch size from it)
DEFAULT_MAX_MEMORY = 1 << 30
#: the largest histogram a tensor may get (2 x bins float64 counts); far above any useful resolution
MAX_BINS = 1 << 16
#: the fidelity check: an output below this SQNR against FP32 has collapsed (see quantkit.evaluation.check)
MIN_SQNR_DB = 4.0
#: eval flags a variant that loses more than this many points (dB for sqnr) of the first metric
DEFAULT_MAX_DROP = 1.0
#: the fidelity check's samples: enough that a task measure (agreement, IoU) is not one sample's noise
CHECK_SAMPLES = 32
#: what ``quantkit quantize`` writes: Q/DQ in int8 or fp8, or int4 weights only
QUANTIZE_FORMATS = ("int8", "fp8", "int4-weights")
#: the INT4 block sizes TensorRT supports: "The supported block sizes are {64, 128}" (NVIDIA,
#: TensorRT developer guide, "Quantization Schemes", INT4 block quantization)
INT4_BLOCK_SIZES = (64, 128)
#: what quantize may apply besides the placement (quantkit.export.equalize, .bias_correction)
QUANTIZE_ALGORITHMS = ("cle", "depthwise-equalization", "gptq", "bias-correction", "empirical-bias-correction")
AUTO_ALGORITHMS = "auto"
#: the largest batch --measure-speed times: kernels' speed per sample is settled long before it
MAX_SPEED_BATCH = 4096


#: calibration methods by name (``quantkit.calibration.methods`` implements one calibrator for each)
CALIBRATION_METHODS = ("entropy", "minmax", "percentile", "mse", "entropy-trt", "mse-fp8")


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if origin is tuple:
        return f"a sequence of {_type_name(typing.get_args(kind)[0])}"
    if kind is Path:
        return "a path"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _is_a(value: Any, kind: Any) -> bool:
    """Whether ``value`` fits the annotation ``kind`` (the subset of typing the options use)."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, k) for k in typing.get_args(kind))
    if origin is tuple:  # tuple[T, ...]: any list or tuple of T (a lone string is not a sequence of names)
        return isinstance(value, (list, tuple)) and all(_is_a(v, typing.get_args(kind)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is Callable or kind is Callable:
        return callable(value)
    if kind is Path:
        return isinstance(value, (str, os.PathLike))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if kind is type(None) else isinstance(value, kind)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(options: Any) -> None:
    """Refuse, naming the field, any value whose type is not its field's annotation: options are
    checked when they are made, not when a stage first uses them."""
    hints = _hints(type(options))
    for f in fields(options):
        value = getattr(options, f.name)
        if not _is_a(value, hints[f.name]):
            raise QuantkitError(f"{f.name} must be {_type_name(hints[f.name])}, got {type(value).__name__} {value!r:.80}", option=f.name)


T = typing.TypeVar("T")


def given(value: T | None, cls: type[T], name: str) -> T:
    """``value``, or ``cls()`` when it is None; another object in its place (a DataOptions where
    CalibrationOptions belongs) is refused, naming the parameter."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise QuantkitError(f"{name} must be a {cls.__name__}, got a {type(value).__name__}", option=name)
    return value


def parse_size(text: str | int) -> int:
    """'1G', '512M', '300k' or a byte count -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(number)
    except ValueError:
        raise QuantkitError(f"max_memory must be a size like 1G, 512M or a byte count, got {text!r}", option="max_memory") from None
    if not math.isfinite(value) or value <= 0:
        raise QuantkitError(f"max_memory must be positive, got {text!r}", option="max_memory")
    return int(value * units[unit])


def _positive_int(value: Any, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuantkitError(f"{name} must be a positive integer, got {value!r}", option=name)


def _known_methods(methods: str | tuple[str, ...] | None, name: str, allow_all: bool = False) -> None:
    """Method names (a name, a comma list or a sequence) are calibration methods (or ``all``)."""
    if methods is None:
        return
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    known = (*CALIBRATION_METHODS, "all") if allow_all else CALIBRATION_METHODS
    for n in (n.strip().lower() for n in names):
        if n not in known:
            raise QuantkitError(f"unknown calibration method {n!r}; choose from {', '.join(known)}", option=name)


def _non_negative(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise QuantkitError(f"{name} must be a non-negative number, got {value!r}", option=name)


@dataclass(frozen=True)
class DataOptions:
    """Which samples are read and how they are batched and preprocessed."""

    preprocess: PreprocessSpec | None = None
    input_name: str | None = None  # the model input that images feed (models with several float inputs)
    shuffle: bool = True  # image folders in a seeded shuffled order
    seed: int = 0
    num_samples: int | None = None  # None: all
    batch_size: int | None = None  # None: calibration picks it from its memory budget, evaluation uses 32
    label_column: str | None = None
    # an image folder's label folders name these classes, in the model's order (default: the
    # model's metadata, else numbers, else alphabetical; see quantkit.data.sources.folder_labels)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        _positive_int(self.num_samples, "num_samples")
        _positive_int(self.batch_size, "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise QuantkitError(f"seed must be an integer in [0, 2**32), got {self.seed!r}", option="seed")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where models run: the runtime name, or explicit onnxruntime providers, and threads."""

    runtime: str = "ort-cpu"
    providers: tuple[str, ...] | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.runtime not in RUNTIME_NAMES:
            raise QuantkitError(f"unknown runtime '{self.runtime}'; choose from {', '.join(RUNTIME_NAMES)}", option="runtime")
        _positive_int(self.threads, "threads")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))


@dataclass(frozen=True)
class CalibrationOptions:
    """What statistics are collected and which ranges and caches come out of them."""

    methods: str | tuple[str, ...] = "entropy"  # a name, a comma list, or "all"
    percentile: float = 99.99
    bins: int = 2048
    all_tensors: bool = False
    trt_version: str = DEFAULT_TRT_VERSION
    cache_algorithm: str = DEFAULT_ALGORITHM
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes of activations in flight, which choose the batch size when none is given

    def __post_init__(self) -> None:
        check_types(self)
        _positive_int(self.max_memory, "max_memory", allow_none=False)
        if not isinstance(self.methods, str):
            object.__setattr__(self, "methods", tuple(self.methods))
        _known_methods(self.methods, "methods", allow_all=True)
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 256 or self.bins & (self.bins - 1):
            raise QuantkitError(f"bins must be a power of two of at least 256, got {self.bins!r}", option="bins")
        if self.bins > MAX_BINS:
            raise QuantkitError(f"bins must be at most {MAX_BINS}, got {self.bins}", option="bins")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 0.0 < self.percentile <= 100.0:
            raise QuantkitError(f"percentile must be in (0, 100], got {self.percentile!r}", option="percentile")
        if self.cache_algorithm not in ALGORITHMS:
            raise QuantkitError(
                f"cache_algorithm must be one of {', '.join(ALGORITHMS)}, got {self.cache_algorithm!r}", option="cache_algorithm"
            )
        encode_version(self.trt_version)  # a clear error for a version the cache header cannot hold


@dataclass(frozen=True)
class ExportOptions:
    """How a model is quantized: which method's ranges, which placement, which plan."""

    method: str | None = None  # None: the ranges' default method
    target: str = "tensorrt"
    allow_missing: bool = False
    weight_bits: int | None = None  # None: the target's default (7 for onnxruntime, 8 for TensorRT)
    filters: NodeFilter | None = None  # which nodes may be quantized (a plan's entries win)
    # TensorRT placement: the attention core (Q.K^T and attention.V MatMuls) stays float by
    # default, as ModelOpt's placement does (INT8 Q.K^T and attention.V cost accuracy; under
    # strong typing the high precision, fp16 by default, is what they run in)
    quantize_attention: bool = False
    format: str = "int8"  # or fp8: E4M3 Q/DQ for TensorRT (Hopper and later)
    # what is not quantized runs in: fp16 (range-safe: what overflows float16 stays float32) or
    # fp32 (None: fp32; quantize resolves None to its target's default, QuantizeOptions)
    high_precision: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        _known_methods(self.method, "method")
        if self.high_precision not in (None, *HIGH_PRECISIONS):
            raise QuantkitError(f"high_precision must be fp16 or fp32, got {self.high_precision!r}", option="high_precision")
        if self.format not in ("int8", "fp8"):
            raise QuantkitError(f"format must be int8 or fp8, got {self.format!r}", option="format")
        if self.target not in TARGETS:
            raise QuantkitError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}", option="target")
        if self.weight_bits not in (None, 7, 8):
            raise QuantkitError(f"weight_bits must be 7 or 8, got {self.weight_bits!r}", option="weight_bits")


@dataclass(frozen=True)
class CheckOptions:
    """The fidelity check every written model passes: the new model against FP32 on real samples."""

    force: bool = False  # write a model the check refuses (with a warning)
    min_sqnr: float = MIN_SQNR_DB  # an output below this SQNR (dB) has collapsed
    samples: int = CHECK_SAMPLES

    def __post_init__(self) -> None:
        check_types(self)
        _positive_int(self.samples, "samples", allow_none=False)
        if isinstance(self.min_sqnr, bool) or not isinstance(self.min_sqnr, (int, float)) or not math.isfinite(self.min_sqnr):
            raise QuantkitError(f"min_sqnr must be a finite number of dB, got {self.min_sqnr!r}", option="min_sqnr")


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``quantkit.quantize`` writes: from which ranges, in which format, where Q/DQ goes, which rewrites first.

    ``format`` None takes the plan's ``quantized_format``, else int8. ``ranges`` (ranges.json) or
    ``from_cache`` (a TensorRT cache to migrate) give int8/fp8 their scales; int4-weights needs
    neither. ``smoothquant`` calibrates the smoothed model itself on the data ``quantize`` gets.
    ``measure_speed``: batch sizes at which onnxruntime's int8 kernels are timed against float.
    """

    ranges: str | Path | None = None
    from_cache: str | Path | None = None
    trt_version: str | None = None  # with from_cache: warn when the cache was written for another version
    plan: str | Path | None = None
    method: str | None = None  # None: the ranges' default (fp8: mse-fp8, else each tensor's max)
    target: str = "tensorrt"
    format: str | None = None
    allow_missing: bool = False
    weight_bits: int | None = None  # None: the target's default (7 for onnxruntime, 8 for TensorRT)
    filters: NodeFilter | None = None
    quantize_attention: bool = False
    smoothquant: bool = False
    alpha: float | str = "auto"
    block_size: int = 128
    measure_speed: tuple[int, ...] = field(default_factory=tuple)
    # what is not quantized runs in, fp16 or fp32. None: the target's. Under strong typing
    # (TensorRT 11 always, 10 with --stronglyTyped) the ONNX types decide each layer's precision,
    # so the TensorRT target writes fp16 (as ModelOpt's high_precision_dtype="fp16" does);
    # onnxruntime's CPU kernels are fp32, so its target keeps fp32
    high_precision: str | None = None
    # accuracy algorithms before or after the placement: "cle" (cross-layer equalization of the
    # FP32 model, then calibration of the equalized model on the data), "gptq" (the int8 weights'
    # rounding that minimises each layer's output error against FP32, on its input in the Q/DQ
    # model), "bias-correction" (for the weights' mean shift), "empirical-bias-correction" (for
    # the shift measured in the Q/DQ model); "auto" (the default) tries the rewrites that fit the
    # model (depthwise-equalization, SmoothQuant), then the weight algorithms, where the check
    # finds the model short of FP32, and keeps what the check shows helps; () applies none
    algorithms: tuple[str, ...] = ("auto",)

    @property
    def chosen_algorithms(self) -> tuple[str, ...]:
        """The algorithms asked for by name (none with "auto")."""
        return tuple(a for a in self.algorithms if a != AUTO_ALGORITHMS)

    @property
    def auto_algorithms(self) -> bool:
        return self.algorithms == (AUTO_ALGORITHMS,)

    @property
    def resolved_high_precision(self) -> str:
        return self.high_precision or ("fp16" if self.target == "tensorrt" else "fp32")

    def __post_init__(self) -> None:
        check_types(self)
        _known_methods(self.method, "method")
        if self.target not in TARGETS:
            raise QuantkitError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}", option="target")
        if self.format not in (None, *QUANTIZE_FORMATS):
            raise QuantkitError(f"format must be one of {', '.join(QUANTIZE_FORMATS)}, got {self.format!r}", option="format")
        if self.weight_bits not in (None, 7, 8):
            raise QuantkitError(f"weight_bits must be 7 or 8, got {self.weight_bits!r}", option="weight_bits")
        if self.ranges is not None and self.from_cache is not None:
            raise QuantkitError("give ranges or from_cache, not both", option="from_cache")
        if self.high_precision not in (None, *HIGH_PRECISIONS):
            raise QuantkitError(f"high_precision must be fp16 or fp32, got {self.high_precision!r}", option="high_precision")
        object.__setattr__(self, "algorithms", tuple(dict.fromkeys(self.algorithms)))
        unknown = [a for a in self.algorithms if a not in (*QUANTIZE_ALGORITHMS, AUTO_ALGORITHMS)]
        if unknown:
            choices = ", ".join((*QUANTIZE_ALGORITHMS, AUTO_ALGORITHMS))
            raise QuantkitError(f"unknown algorithm {unknown[0]!r}; choose from {choices}", option="algorithms")
        if AUTO_ALGORITHMS in self.algorithms and len(self.algorithms) > 1:
            raise QuantkitError("auto chooses the algorithms itself: give auto alone, or the algorithms by name", option="algorithms")
        if isinstance(self.block_size, bool) or self.block_size not in INT4_BLOCK_SIZES:
            raise QuantkitError(
                f"block_size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))} (TensorRT's INT4 block sizes), got {self.block_size!r}",
                option="block_size",
            )
        object.__setattr__(self, "measure_speed", tuple(self.measure_speed))
        for b in self.measure_speed:
            _positive_int(b, "measure_speed", allow_none=False)
            if b > MAX_SPEED_BATCH:
                raise QuantkitError(f"measure_speed batch sizes must be at most {MAX_SPEED_BATCH}, got {b}", option="measure_speed")

    def export(self, fmt: str, allow_missing: bool | None = None) -> ExportOptions:
        """The placement's options for a Q/DQ format."""
        missing = self.allow_missing if allow_missing is None else allow_missing
        return ExportOptions(
            self.method, self.target, missing, self.weight_bits, self.filters, self.quantize_attention, fmt, self.resolved_high_precision
        )


@dataclass(frozen=True)
class Fp16Options:
    """What ``quantkit.fp16`` converts: which nodes must stay float32, and from which ranges it knows."""

    ranges: str | Path | None = None  # ranges.json: tensors beyond float16's safe range stay float32
    use_ranges: bool = True  # False converts without any range (unsafe: an overflow goes unnoticed)
    plan: str | Path | None = None  # nodes the plan marks fp32 stay float32
    num_samples: int | None = None  # of the min/max pass over the data (default: all, or what ranges.json used)
    keep_op_types: tuple[str, ...] = ()
    max_memory: int = DEFAULT_MAX_MEMORY  # activations the min/max pass may hold at once (it picks the batch from it)

    def __post_init__(self) -> None:
        check_types(self)
        _positive_int(self.num_samples, "num_samples")
        _positive_int(self.max_memory, "max_memory", allow_none=False)
        if isinstance(self.keep_op_types, str):
            raise QuantkitError(
                f"keep_op_types must be a sequence of op types, got the string {self.keep_op_types!r}", option="keep_op_types"
            )
        object.__setattr__(self, "keep_op_types", tuple(self.keep_op_types))


#: what ``quantkit build`` targets: a TensorRT engine, or an optimized onnxruntime model
BUILD_RUNTIMES = ("tensorrt", "ort-cpu", "ort-cuda", "ort-tensorrt")
BUILD_PRECISIONS = ("fp32", "fp16", "int8", "best")


@dataclass(frozen=True)
class BuildOptions:
    """How ``quantkit.build`` builds: the runtime, TensorRT 10's precision flags and cache, the profile."""

    runtime: str = "tensorrt"
    precision: str = "fp16"  # TensorRT 10's builder precision (a typed model's own types win)
    cache: str | Path | None = None  # a calibration cache for implicit INT8 (TensorRT 10)
    qdq: bool = False  # the model carries Q/DQ (also detected from the model)
    plan: str | Path | None = None  # per-layer precision constraints (TensorRT 10)
    restamp: bool = False  # a cache stamped for another TensorRT: build with a copy stamped for the installed one
    placeholder_ranges: bool = False  # int8 without ranges: a performance-only engine
    shapes: str | None = None  # NAME:MIN/OPT/MAX, dims joined by x
    ranges: str | Path | None = None  # ranges.json: the input shapes calibration saw give the profile (unless shapes)
    workspace: int | None = None  # MiB
    timing_cache: str | Path | None = None
    # TensorRT 10, a float16 or mixed model: build with precision flags, the ONNX types as hints,
    # instead of strongly typed (then a layer kept in FP32 against overflow may run in FP16)
    weak_typing: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if self.runtime not in BUILD_RUNTIMES:
            raise QuantkitError(f"runtime must be one of {', '.join(BUILD_RUNTIMES)}, got {self.runtime!r}", option="runtime")
        if self.precision not in BUILD_PRECISIONS:
            raise QuantkitError(f"precision must be one of {', '.join(BUILD_PRECISIONS)}, got {self.precision!r}", option="precision")
        if self.cache is not None and self.qdq:
            raise QuantkitError("a Q/DQ model takes no calibration cache", option="cache")
        _positive_int(self.workspace, "workspace")


@dataclass(frozen=True)
class EvalOptions:
    """Which variants ``evaluate`` builds and what it measures."""

    variants: str = DEFAULT_VARIANTS
    # names ("auto" chooses from the outputs and labels), module:function, or callables
    # (outputs, reference, labels) -> float; see quantkit.evaluation.objectives
    metrics: str | Callable[..., float] | tuple[Any, ...] = ("auto",)
    labels: bool = True  # use labels where the data has them
    # flag a variant losing more than this of the first metric (points; dB for sqnr): a large
    # loss is always flagged; None flags none
    max_drop: float | None = DEFAULT_MAX_DROP
    slices: dict[str, list[tuple[int, int, int]]] | None = None
    latency: bool = True
    throughput_batch: int = 32
    num_calib_samples: int | None = None
    conf: float = 0.25  # detection-f1: the class-score threshold of a detection
    mask_threshold: float = 0.5  # mask-iou: where a probability map becomes a mask
    max_memory: int = DEFAULT_MAX_MEMORY  # activations one run may hold: picks the batch when none is given

    def __post_init__(self) -> None:
        check_types(self)
        _positive_int(self.max_memory, "max_memory", allow_none=False)
        for name in ("conf", "mask_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise QuantkitError(f"{name} must be a number in [0, 1], got {value!r}", option=name)
        object.__setattr__(
            self, "metrics", tuple([self.metrics] if isinstance(self.metrics, str) or callable(self.metrics) else self.metrics)
        )
        _non_negative(self.max_drop, "max_drop")
        _positive_int(self.throughput_batch, "throughput_batch", allow_none=False)
        _positive_int(self.num_calib_samples, "num_calib_samples")


@dataclass(frozen=True)
class TuneOptions:
    """The accuracy target and the budget of the per-layer precision search."""

    max_drop: float = 0.5
    fallback: str = "fp32"
    max_trials: int | None = None
    timeout: float | None = None
    start_from_known: bool = False
    # how nodes are ranked before the search: "disable-one" evaluates each node kept in high
    # precision (on a subset); "sqnr" ranks by the SQNR each node loses, from two passes in all
    ranking: str = "disable-one"
    # try every method in the ranges first and tune the one whose all-INT8 model scores best
    # (one evaluation per method: a method that fits the model often needs no fallback at all)
    choose_method: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if self.ranking not in ("disable-one", "sqnr"):
            raise QuantkitError(f"ranking must be disable-one or sqnr, got {self.ranking!r}", option="ranking")
        if self.fallback not in FALLBACKS:
            raise QuantkitError(f"fallback must be fp16 or fp32, got {self.fallback!r}", option="fallback")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not math.isfinite(self.max_drop):
            raise QuantkitError(f"max_drop must be a number of accuracy points, got {self.max_drop!r}", option="max_drop")
        _positive_int(self.max_trials, "max_trials")
        _non_negative(self.timeout, "timeout")


@dataclass(frozen=True)
class ScaleOut:
    """Ray workers for calibration shards and tuning trials (results identical to one process)."""

    workers: int | None = None  # None: one process, Ray is never imported
    address: str | None = None  # join this cluster; None starts a local instance
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        check_types(self)
        _positive_int(self.workers, "workers")
        _non_negative(self.gpus_per_worker, "gpus_per_worker")

    @property
    def enabled(self) -> bool:
        return bool(self.workers)


__all__ = [
    "BuildOptions",
    "CalibrationOptions",
    "CheckOptions",
    "DataOptions",
    "EvalOptions",
    "ExportOptions",
    "Fp16Options",
    "QuantizeOptions",
    "RuntimeOptions",
    "ScaleOut",
    "TuneOptions",
]
