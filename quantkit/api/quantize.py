"""``quantize``: an explicitly quantized model, written only after it passes the fidelity check.

The steps, each a short function: the sources (ranges.json, a TensorRT cache, or none for int4
weights) -> the format (``QuantizeOptions.format``, else the plan's, else int8) and its default
method -> SmoothQuant (which calibrates the smoothed model itself) -> placement for the target
(``quantkit.export``), or the fastest placement measured on this CPU -> the fidelity check
against FP32 (``quantkit.evaluation.check.verify``) -> one atomic write. What the CLI prints is
``QuantizeResult.summary()``; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import onnx

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.api.scaled import calibrate
from quantkit.backends.ort import OptimizedGraphCheck, first_line, optimized_graph_check
from quantkit.calibration.collect import batch_size_for, select_calibration_tensors
from quantkit.data.batching import batches, check_sample, fixed_batch
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import SYNTHETIC, FidelityCheck, check_fidelity, check_samples, data_or_recorded, verify
from quantkit.export.apply import AppliedPlan, apply_plan
from quantkit.export.bias_correction import correct_biases, correct_biases_empirically
from quantkit.export.equalize import equalize, equalize_depthwise_inputs, has_depthwise_convs
from quantkit.export.fp16 import Fp16Report
from quantkit.export.int4 import Int4Report, quantize_int4_weights
from quantkit.export.qdq import QuantizeReport, record_quantization
from quantkit.export.rounding import optimize_rounding
from quantkit.export.smoothquant import SmoothReport, check_alpha, smooth_model, smoothable
from quantkit.model import ModelInfo, load_model
from quantkit.options import DEFAULT_MAX_MEMORY, CalibrationOptions, CheckOptions, DataOptions, ExportOptions, QuantizeOptions, given
from quantkit.plan import QUANTIZED_FORMATS, PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.trt_cache import encode_version, ranges_from_trt_cache, read_trt_cache
from quantkit.tuning.speed import SpeedChoice, fastest_placement

#: with format fp8 and no method: E4M3 spans about 18 binades, so clipping buys little precision
#: and costs the clipped values. all-MiniLM-L6-v2 (bench/encoder.py), embedding cosine: max 0.9975,
#: mse-fp8 0.9974, entropy 0.990, percentile 0.992; ModelOpt's FP8 calibration is max too
FP8_DEFAULT_METHODS = ("mse-fp8", "minmax")
#: the algorithms that rewrite the FP32 model before its calibration (cle, depthwise-equalization)
REWRITE_ALGORITHMS = ("cle", "depthwise-equalization")
#: the algorithms that rewrite the Q/DQ model's weights (gptq) and biases (bias-correction, then
#: empirical-bias-correction, which measures what is left)
WEIGHT_ALGORITHMS = ("gptq", "bias-correction", "empirical-bias-correction")
#: the weight algorithms "auto" tries, cheapest first: bias correction costs one FP32 pass over the
#: data, its empirical form a pass of the Q/DQ model per level of layers more, gptq a pass of both
#: models per level (reports/bench/accuracy.md). A trial that extends the best one so far (gptq, then
#: empirical-bias-correction) starts from that model, so only its last algorithm runs. gptq fits
#: each layer to its input in the quantized model, which takes back most of the mean shift the
#: empirical form would; what it leaves, the last trial takes (PP-OCRv4's recogniser, depthwise-
#: equalized, on cropped text lines: 19.2 dB after gptq, 23.7 dB after both). Before them, each
#: rewrite that fits the model (a pass and a calibration each): depthwise-equalization on depthwise
#: Convs, SmoothQuant on MatMuls with constant weights (a transformer's projections)
AUTO_TRIALS = (("bias-correction",), ("empirical-bias-correction",), ("gptq",), ("gptq", "empirical-bias-correction"))
#: a model that passes the check with every task measure at least AUTO_GOOD_TASK and every output's
#: SQNR at least AUTO_GOOD_SQNR_DB is left as it is: a task measure on a few dozen check samples
#: cannot see the flips to come where the output error leaves little room (30 dB: an error about
#: 3% of the output's RMS, which only near-ties feel)
AUTO_GOOD_TASK = 0.99
AUTO_GOOD_SQNR_DB = 30.0
#: task measures that are a share of the check's samples, whose sampling noise _Score weighs
SAMPLE_SHARES = ("top-1 agreement", "string agreement", "decision agreement")
#: with equal task measures, a trial is kept only for an SQNR gain above this (the check's noise)
AUTO_MIN_GAIN_DB = 0.1


@dataclass
class QuantizeResult:
    """What ``quantize`` wrote and decided: the file, every node's placement and why, the check's verdict."""

    output: Path
    model: onnx.ModelProto
    format: str
    report: QuantizeReport | Int4Report
    fidelity: FidelityCheck
    source_bytes: int  # the FP32 model's size
    fp16: Fp16Report | None = None
    smoothquant: SmoothReport | None = None
    speed: SpeedChoice | None = None
    ort_graph: OptimizedGraphCheck | None = None  # what onnxruntime's CPU provider runs in int8 (onnxruntime target)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def kept_float(self) -> dict[str, str]:
        """Node -> why it stays in float (Q/DQ formats)."""
        return dict(getattr(self.report, "kept_float", {}))

    def summary(self) -> str:
        """The lines ``quantkit quantize`` prints, in order."""
        lines = [*self.notes]
        if self.smoothquant is not None:
            lines.append(self.smoothquant.summary())
        if self.fp16 is not None:
            lines.append("outside the Q/DQ (mixed precision, --high-precision fp16): " + self.fp16.summary())
        lines += [self.fidelity.summary(), self.report.summary()]
        if self.ort_graph is not None:
            lines.append(self.ort_graph.summary())
        if self.speed is not None:
            lines.append(self.speed.summary())
        lines += [f"warning: {w}" for w in self.warnings]
        if not self.fidelity.ok:
            lines.append(f"warning: wrote a broken model (forced): {self.fidelity.failure()}")
        size = self.output.stat().st_size / 1e6
        extra = f", FP32 was {self.source_bytes / 1e6:.2f} MB" if self.format == "int4-weights" else ""
        lines.append(f"wrote {self.output} ({size:.2f} MB{extra})")
        return "\n".join(lines)


def quantize(
    model: str | Path | ModelInfo,
    output: str | Path,
    options: QuantizeOptions | None = None,
    *,
    data: str | Path | Any = None,
    data_options: DataOptions | None = None,
    check: CheckOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Write the quantized ``model`` to ``output`` (see the module docstring) and return what was done.

    ``data`` feeds the fidelity check (default: the calibration data that ranges.json records),
    SmoothQuant's statistics and calibration, and int4's clip search; ``data_options.preprocess``
    reads it. ``progress`` receives a line per step of a speed measurement.
    """
    options = given(options, QuantizeOptions, "options")
    check = given(check, CheckOptions, "check")
    preprocess = given(data_options, DataOptions, "data_options").preprocess
    model_path = model.path if isinstance(model, ModelInfo) else model
    out = check_output_file(output, model_path, options.ranges, options.from_cache, options.plan)
    plan = PrecisionPlan.load(options.plan) if options.plan else None
    fmt = _resolve_format(options, plan)
    _check_sources(options, fmt)
    info = model if isinstance(model, ModelInfo) else load_model(model)
    job = _Job(info, out, options, fmt, plan, data, preprocess, check, progress)
    if fmt == "int4-weights":
        return _int4(job)
    if set(REWRITE_ALGORITHMS) & set(options.chosen_algorithms):
        return _equalized(job)
    return _smoothquant(job) if options.smoothquant else _qdq(job)


@dataclass(frozen=True)
class _Job:
    """One ``quantize`` call, resolved: what every path below needs."""

    info: ModelInfo
    out: Path
    options: QuantizeOptions
    fmt: str
    plan: PrecisionPlan | None
    data: Any
    preprocess: PreprocessSpec | None
    check: CheckOptions
    progress: Callable[[str], None] | None

    def verify(self, candidate: onnx.ModelProto, ranges: RangeSet | None = None) -> FidelityCheck:
        """The fidelity check of ``candidate`` against the FP32 model, on the check data."""
        return verify(self.info, candidate, self.check, data=self.data, preprocess=self.preprocess, ranges=ranges)

    def result(self, model: onnx.ModelProto, report: QuantizeReport | Int4Report, fidelity: FidelityCheck, **extra: Any) -> QuantizeResult:
        """Write ``model`` atomically (after its check) and describe it."""
        write_bytes_atomic(self.out, model.SerializeToString())
        return QuantizeResult(self.out, model, self.fmt, report, fidelity, self.info.path.stat().st_size, **extra)


def _resolve_format(options: QuantizeOptions, plan: PrecisionPlan | None) -> str:
    """The format asked for, else the plan's quantized_format, else int8; a plan made for another format is refused."""
    plan_format = plan.quantized_format if plan is not None else None
    if options.format is None:
        return plan_format or "int8"
    if plan_format and options.format in QUANTIZED_FORMATS and options.format != plan_format:
        raise QuantkitError(
            f"{options.plan} was made for {plan_format} (its quantized_format) but the format is {options.format}: its choices were "
            f"checked in {plan_format}; tune again for {options.format}, or leave the format out",
            option="format",
        )
    return options.format


def _check_sources(options: QuantizeOptions, fmt: str) -> None:
    """What each format needs, refused before any work."""
    if options.measure_speed and (options.target != "onnxruntime" or fmt != "int8" or options.smoothquant):
        raise QuantkitError(
            "the speed measurement times onnxruntime's CPU kernels: use it with target onnxruntime (int8, without smoothquant)",
            option="measure_speed",
        )
    if fmt == "int4-weights" and set(options.chosen_algorithms) - {"gptq"}:
        raise QuantkitError("int4-weights takes gptq (its blocks' rounding) alone among the algorithms", option="algorithms")
    if options.chosen_algorithms and (options.smoothquant or options.measure_speed):
        raise QuantkitError("the algorithms apply to Q/DQ models without smoothquant or a speed measurement", option="algorithms")
    rewrites = [a for a in options.chosen_algorithms if a in REWRITE_ALGORITHMS]
    if rewrites and (options.ranges or options.from_cache):
        raise QuantkitError(
            f"{rewrites[0]} rewrites the model, so its activation ranges change: give data (it calibrates the rewritten "
            "model), not ranges or a cache",
            option="algorithms",
        )
    if fmt == "int4-weights":
        if options.ranges or options.from_cache or options.plan:
            raise QuantkitError("int4-weights quantizes weights only: it takes no ranges, cache or plan", option="format")
        if options.quantize_attention:
            raise QuantkitError(
                "int4-weights quantizes constant weights only, and an attention core's MatMuls have none: drop it",
                option="quantize_attention",
            )
        return
    if options.smoothquant:
        if options.ranges or options.from_cache:
            raise QuantkitError("smoothquant calibrates the smoothed model itself: give data, not ranges or a cache", option="smoothquant")
        check_alpha(options.alpha)
    elif not (options.ranges or options.from_cache or rewrites):
        raise QuantkitError("give the ranges (ranges.json from quantkit calibrate) or a TensorRT cache to migrate", option="ranges")


def _calibration_batches(info: ModelInfo, data: Any, preprocess: PreprocessSpec | None) -> Any:
    """The data as batches, streamed (the statistics that read them keep no sample in memory), of
    the size calibration would choose for its activations in the default memory budget: the
    statistics passes fetch about the same tensors (the quantized layers' inputs)."""
    source = open_source(data, info, preprocess, shuffle=False)
    first = next(iter(source), None)
    if first is None:
        raise QuantkitError(f"{source.description} yielded no samples", option="data")
    size, _ = batch_size_for(info, check_sample(first, info.inputs), select_calibration_tensors(info.proto), DEFAULT_MAX_MEMORY)
    return batches(open_source(data, info, preprocess, shuffle=False), info, fixed_batch(info) or min(size, 16))


def _int4(job: _Job) -> QuantizeResult:
    gptq = "gptq" in job.options.chosen_algorithms
    if gptq and not job.data:
        raise QuantkitError("gptq reads the calibration data: give data", option="data")
    calibration = _calibration_batches(job.info, job.data, job.preprocess) if job.data else None
    quantized, report = quantize_int4_weights(
        job.info,
        block_size=job.options.block_size,
        calibration=calibration,
        filters=job.options.filters,
        rounding=_calibration_batches(job.info, job.data, job.preprocess) if gptq else None,
    )
    if gptq:
        record_quantization(quantized, quantized, {"algorithms": "gptq"})
    return job.result(quantized, report, job.verify(quantized))


def _smoothquant(job: _Job) -> QuantizeResult:
    """Smooth, calibrate the smoothed model on the same data, quantize it, check it against the original FP32 model."""
    if not job.data:
        raise QuantkitError("smoothquant calibrates the smoothed model itself: give data", option="data")
    alpha = check_alpha(job.options.alpha)
    smoothed, smooth_report = smooth_model(job.info, _calibration_batches(job.info, job.data, job.preprocess), alpha)
    with tempfile.TemporaryDirectory(prefix="quantkit-sq-") as tmp:
        path = Path(tmp) / job.info.path.name
        onnx.save(smoothed, str(path))
        smoothed_info = load_model(path)
        # without a method, every INT8 method in one pass and the best by the check, as the default path
        # chooses (entropy alone took PP-OCRv4's recogniser to 1% of its strings)
        methods = job.options.method or ("minmax" if job.fmt == "fp8" else "all")
        data_options = DataOptions(preprocess=job.preprocess)
        ranges = calibrate(smoothed_info, job.data, CalibrationOptions(methods=methods), data_options=data_options).ranges
        method, notes = methods, []
        if methods == "all":
            method, note = _choose_method(dataclasses.replace(job, info=smoothed_info), ranges, range_aware_fp16=True)
            notes.append(note)
        applied = apply_plan(smoothed_info, ranges, job.plan, dataclasses.replace(job.options.export(job.fmt), method=method))
        record_quantization(applied.model, applied.model, {"smoothquant_alpha": alpha})
        fidelity = job.verify(applied.model)  # against the original FP32 model
    return job.result(applied.model, applied.quantize, fidelity, fp16=applied.fp16, smoothquant=smooth_report, notes=notes)


def _ranges_and_warnings(info: ModelInfo, options: QuantizeOptions, fmt: str) -> tuple[RangeSet, str | None, list[str], list[str]]:
    """The ranges to place with, the method, notes and warnings: from ranges.json (with the format's
    default method) or migrated from a TensorRT cache."""
    if options.from_cache:
        return (*_cache_ranges(info, options), [])
    ranges = RangeSet.load(options.ranges)
    method, notes = options.method, []
    if fmt == "fp8" and method is None:  # mse-fp8 where calibrated, else each tensor's observed max
        method = next((m for m in FP8_DEFAULT_METHODS if m in ranges.methods), "minmax")
        if method == "minmax" and "minmax" not in ranges.methods:
            ranges = ranges.with_observed_max("minmax")
        notes.append(f"fp8: {method} ranges (E4M3's range needs no clipping; a method option chooses another)")
    return ranges, method, _method_format_warning(ranges, method, fmt), notes


def _cache_ranges(info: ModelInfo, options: QuantizeOptions) -> tuple[RangeSet, str | None, list[str]]:
    cache = read_trt_cache(options.from_cache)
    warnings = []
    if options.trt_version and cache.version != encode_version(options.trt_version):
        warnings.append(f"{options.from_cache} was written for TensorRT {cache.version_string}, not {options.trt_version}")
    ranges = ranges_from_trt_cache(cache, options.from_cache)
    known = {name for node in info.proto.graph.node for name in [*node.input, *node.output]}
    # TensorRT names the layers it adds itself "(Unnamed Layer* N) [...]": those need not be the model's
    named = [n for n in ranges.tensors if not n.startswith("(Unnamed Layer")]
    foreign = [n for n in named if n not in known]
    if named and 2 * len(foreign) > len(named):
        raise QuantkitError(
            f"{len(foreign)} of the {len(named)} tensors in {options.from_cache} are not tensors of {info.path} "
            f"(first: {foreign[0]!r}): is it the cache of another model?",
            option="from_cache",
        )
    return ranges, options.method, warnings


def _method_format_warning(ranges: RangeSet, method: str | None, fmt: str) -> list[str]:
    method = ranges.method_name(method)
    made_for = ranges.method_format(method)
    if made_for in ("any", fmt):
        return []
    fits = "mse-fp8 or minmax" if fmt == "fp8" else "mse, entropy or percentile"
    return [f"the {method} ranges were chosen for {made_for}'s grid, not {fmt}'s: {fits} fit {fmt} (quantkit calibrate --method)"]


def _qdq(job: _Job) -> QuantizeResult:
    options = job.options
    ranges, method, warnings, notes = _ranges_and_warnings(job.info, options, job.fmt)
    range_aware_fp16 = bool(options.ranges)
    if method is None and job.fmt == "int8" and len(_int8_methods(ranges)) > 1:
        method, note = _choose_method(job, ranges, range_aware_fp16)
        notes.append(note)
    # a cache from TensorRT covers what TensorRT calibrated; the rest stays float, with a warning
    export = dataclasses.replace(options.export(job.fmt, allow_missing=True if options.from_cache else None), method=method)
    speed = None
    if options.measure_speed:
        fixed = fixed_batch(job.info)
        sizes = [fixed] if fixed else list(options.measure_speed)  # a static batch dimension wins
        feeds, _ = check_samples(job.info, job.data, job.preprocess, ranges, 1)
        speed = fastest_placement(
            job.info, ranges, export, feeds[0], sizes, plan=job.plan, progress=job.progress, range_aware_fp16=range_aware_fp16
        )
    weights = tuple(a for a in options.chosen_algorithms if a in WEIGHT_ALGORITHMS)
    adjust = _weight_algorithms(job, ranges, weights, notes) if weights else None
    applied: AppliedPlan = (
        speed.applied if speed else apply_plan(job.info, ranges, job.plan, export, range_aware_fp16=range_aware_fp16, adjust=adjust)
    )
    recorded = options.chosen_algorithms
    if options.auto_algorithms and speed is None and job.fmt == "int8":
        applied, recorded = _automatic(job, ranges, export, applied, notes, range_aware_fp16=range_aware_fp16)
    if recorded:
        record_quantization(applied.model, applied.model, {"algorithms": ",".join(recorded)})
    warnings += _placement_warnings(options, job.fmt, applied.quantize, smoothed="smoothquant" in recorded)
    fidelity = job.verify(applied.model, None if options.from_cache else ranges)
    ort_graph = optimized_graph_check(applied.model) if options.target == "onnxruntime" and job.fmt == "int8" else None
    extra = {"fp16": applied.fp16, "speed": speed, "ort_graph": ort_graph, "notes": notes, "warnings": warnings}
    return job.result(applied.model, applied.quantize, fidelity, **extra)


def _weight_algorithms(
    job: _Job, ranges: RangeSet, algorithms: tuple[str, ...], notes: list[str]
) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """The Q/DQ model's rewrite on the calibration data (given, or recorded): the weights' rounding
    first (gptq), then the biases (bias-correction, empirical-bias-correction), which correct for
    the weights as rounded."""
    data, preprocess = data_or_recorded(job.data, job.preprocess, ranges)
    if data is None:
        raise QuantkitError("gptq and bias correction read the calibration data: give data", option="data")

    def rewritten(model: onnx.ModelProto) -> onnx.ModelProto:
        if "gptq" in algorithms:
            stream = functools.partial(_calibration_batches, job.info, data, preprocess)
            model, rounding = optimize_rounding(model, job.info, stream, quiet=job.progress is None)
            notes.append(rounding.summary())
        if "bias-correction" in algorithms:
            model, report = correct_biases(model, job.info, _calibration_batches(job.info, data, preprocess))
            notes.append(report.summary())
        if "empirical-bias-correction" in algorithms:
            stream = functools.partial(_calibration_batches, job.info, data, preprocess)
            model, report = correct_biases_empirically(model, job.info, stream, quiet=job.progress is None)
            notes.append(report.summary())
        return model

    return rewritten


def _equalized(job: _Job) -> QuantizeResult:
    """The FP32 model rewritten (cle, then depthwise-equalization), calibrated on the data and
    quantized as usual (its FP32 outputs are the original's: the check compares with either)."""
    algorithms = job.options.chosen_algorithms
    if not job.data:
        names = " and ".join(a for a in algorithms if a in REWRITE_ALGORITHMS)
        raise QuantkitError(f"the model rewritten by {names} is calibrated on data: give data", option="data")
    methods = job.options.method or ("all" if job.fmt == "int8" else "minmax")
    with tempfile.TemporaryDirectory(prefix="quantkit-eq-") as tmp:
        info, notes = _rewritten(job, algorithms, Path(tmp))
        data_options = DataOptions(preprocess=job.preprocess)
        calibrate(info, job.data, CalibrationOptions(methods=methods), data_options=data_options, out=tmp)
        options = dataclasses.replace(job.options, ranges=Path(tmp) / "ranges.json")
        result = _qdq(dataclasses.replace(job, info=info, options=options))
    result.notes[:0] = notes
    result.source_bytes = job.info.path.stat().st_size
    return result


def _rewritten(job: _Job, algorithms: tuple[str, ...], folder: Path) -> tuple[ModelInfo, list[str]]:
    """The FP32 model with the rewrite algorithms applied, saved in ``folder``, and their notes
    ("smoothquant" comes from the automatic recipe: asked for by name, it is ``--smoothquant``)."""
    path, proto, notes = folder / job.info.path.name, job.info.proto, []

    def current() -> ModelInfo:  # the model so far as the statistics passes run it: saved only once rewritten
        if proto is job.info.proto:
            return job.info
        onnx.save(proto, str(path))
        return load_model(path)

    if "cle" in algorithms:
        proto, report = equalize(proto)
        notes.append(report.summary())
    if "depthwise-equalization" in algorithms:
        proto, depthwise = equalize_depthwise_inputs(current(), _calibration_batches(job.info, job.data, job.preprocess))
        notes.append(depthwise.summary())
    if "smoothquant" in algorithms:
        proto, smooth = smooth_model(current(), _calibration_batches(job.info, job.data, job.preprocess), job.options.alpha)
        notes.append(smooth.summary())
    onnx.save(proto, str(path))
    return load_model(path), notes


def _int8_methods(ranges: RangeSet) -> list[str]:
    return [m for m in ranges.methods if ranges.method_format(m) in ("int8", "any")]


def _choose_method(job: _Job, ranges: RangeSet, range_aware_fp16: bool) -> tuple[str, str]:
    """Without a method: every calibrated INT8 method's model, judged by the gate on the check
    samples; the best by ``_Score.better_than`` wins (the task measure beyond its sampling noise,
    then the SQNR; a tie keeps the ranges' default, listed first).
    All methods come from one histogram pass, so this costs a build and a check run per method."""
    feeds, source = check_samples(job.info, job.data, job.preprocess, ranges, job.check.samples)
    scores = {}
    for method in _int8_methods(ranges):
        export = dataclasses.replace(job.options.export(job.fmt), method=method)
        candidate = apply_plan(job.info, ranges, job.plan, export, range_aware_fp16=range_aware_fp16).model
        scores[method] = _judge(job, candidate, feeds, source)
    best = next(iter(scores))  # the ranges' default, listed first, unless another method is better
    for method, score in scores.items():
        best = method if score.better_than(scores[best]) else best
    shown = ", ".join(f"{m} {scores[m]}" for m in scores)
    return best, f"method: {best}, the best of the calibrated methods on {len(feeds)} check batch(es) from {source} ({shown})"


class _Score(NamedTuple):
    """A candidate's standing on the check samples: passing, then its worst task measure (the worst
    cosine where no output has a task: an embedding's), then its worst SQNR."""

    ok: bool
    task: float
    sqnr: float
    cosine_only: bool = False  # no output has a task measure: ``task`` is the worst cosine
    samples: int = 0  # the check's samples, where ``task`` is a share of them (else 0: no sampling noise is assumed)

    def __str__(self) -> str:
        measure = f"cosine {self.task:.4f}, " if self.cosine_only else f"task {self.task:.1%}, " if self.task < 1.0 else ""
        return f"{measure}{self.sqnr:.1f} dB" + ("" if self.ok else ", refused")

    @property
    def good_enough(self) -> bool:
        return self.ok and self.task >= AUTO_GOOD_TASK and self.sqnr >= AUTO_GOOD_SQNR_DB

    def better_than(self, other: _Score) -> bool:
        """Passes where ``other`` does not, or has the higher task measure by more than the two
        shares' sampling noise, or else the SQNR higher by more than ``AUTO_MIN_GAIN_DB``: a trial
        must earn its change of the model, and one sample more or less of 32 (3%) is within the
        noise of an agreement near 85% (6%), where the SQNR is the steadier judge."""
        if self.ok != other.ok:
            return self.ok
        if abs(self.task - other.task) > self._noise(other):
            return self.task > other.task
        return self.sqnr > other.sqnr + AUTO_MIN_GAIN_DB

    def _noise(self, other: _Score) -> float:
        """The binomial standard error of a share of ``samples``, at the two scores' mean share."""
        n = min(self.samples, other.samples)
        share = (self.task + other.task) / 2
        return math.sqrt(share * (1 - share) / n) if n > 0 else 0.0


def _judge(job: _Job, candidate: onnx.ModelProto, feeds: list, source: str) -> _Score:
    """A candidate's standing on the check samples (``_Score``)."""
    result = check_fidelity(job.info.proto, candidate, feeds, source=source, min_sqnr_db=job.check.min_sqnr, real=source != SYNTHETIC)
    tasks = [o.task for o in result.outputs if o.task is not None]
    cosines = [o.cosine for o in result.outputs if math.isfinite(o.cosine)]
    sqnrs = [o.sqnr_db for o in result.outputs if math.isfinite(o.sqnr_db)]
    worst_sqnr = min(sqnrs) if sqnrs else math.inf
    if tasks:
        worst = min(tasks, key=lambda t: t.value)
        return _Score(result.ok, worst.value, worst_sqnr, samples=result.samples if worst.task.measure in SAMPLE_SHARES else 0)
    if not cosines:
        return _Score(result.ok, 1.0, worst_sqnr)
    return _Score(result.ok, min(cosines), worst_sqnr, cosine_only=True)


@dataclass
class _Base:
    """What a weight trial starts from: the FP32 model (the original, or a rewritten one), its ranges, its Q/DQ model."""

    info: ModelInfo
    ranges: RangeSet
    export: ExportOptions
    applied: AppliedPlan
    adjusted: onnx.ModelProto | None = None  # its Q/DQ model after its weight algorithms, before any FP16


def _automatic(
    job: _Job, ranges: RangeSet, export: ExportOptions, applied: AppliedPlan, notes: list[str], *, range_aware_fp16: bool
) -> tuple[AppliedPlan, tuple[str, ...]]:
    """ "auto": where the check finds the model short of FP32 (refused, or a task measure under
    ``AUTO_GOOD_TASK``), the rewrites that fit the model (``_auto_rewrites``, from ranges.json),
    then the weight algorithms in order of cost (``AUTO_TRIALS``) on the best model so far are
    tried; the best model by the check is kept (``_Score``). Each trial and the choice are noted;
    without data (given or recorded) nothing is tried."""
    data, preprocess = data_or_recorded(job.data, job.preprocess, ranges)
    if data is None:
        return applied, ()
    feeds, source = check_samples(job.info, job.data, job.preprocess, ranges, job.check.samples)
    base_score = best_score = _judge(job, applied.model, feeds, source)
    if base_score.good_enough:
        return applied, ()
    best, chosen, tried, chosen_notes = _Base(job.info, ranges, export, applied), (), [], []
    with tempfile.TemporaryDirectory(prefix="quantkit-auto-") as tmp:
        with_data = dataclasses.replace(job, data=data, preprocess=preprocess)
        for rewrite in _auto_rewrites(job):
            trial_notes: list[str] = []
            try:
                rewritten = _rewrite_base(with_data, rewrite, ranges, Path(tmp) / rewrite, trial_notes, range_aware_fp16)
            except (QuantkitError, onnx.checker.ValidationError) as exc:  # a trial the model does not take: the default stands
                tried.append(f"+{rewrite} not applicable ({first_line(exc)})")
                continue
            score = _judge(job, rewritten.applied.model, feeds, source)
            tried.append(f"+{rewrite} {score}")
            if score.better_than(best_score):
                best, best_score, chosen, chosen_notes = rewritten, score, (rewrite,), trial_notes
        rewrite_chosen, rewrite_notes = chosen, chosen_notes  # each weight trial starts from this model, not from another trial
        for algorithms in AUTO_TRIALS if not best_score.good_enough else ():
            trial_notes = []
            trial = _weight_trial(job, best, chosen[len(rewrite_chosen) :], algorithms, trial_notes, range_aware_fp16)
            if trial is None:
                continue
            candidate, adjusted = trial
            score = _judge(job, candidate.model, feeds, source)
            tried.append(f"+{'+'.join((*rewrite_chosen, *algorithms))} {score}")
            if score.better_than(best_score):
                best = dataclasses.replace(best, applied=candidate, adjusted=adjusted)
                before = chosen_notes if len(algorithms) > 1 else rewrite_notes  # an extension adds to the best's notes
                best_score, chosen, chosen_notes = score, (*rewrite_chosen, *algorithms), [*before, *trial_notes]
            if best_score.good_enough:
                break
    verdict = f"applied {','.join(chosen)}" if chosen else "none applied, as none improved on the check"
    notes.append(
        f"algorithms (auto): {verdict} (default {base_score}, {', '.join(tried)}; on {len(feeds)} check batch(es) "
        f"from {source}; --algorithms none skips the trials, a list names the algorithms)"
    )
    notes.extend(chosen_notes)
    return best.applied, chosen


def _weight_trial(
    job: _Job, best: _Base, best_algorithms: tuple[str, ...], algorithms: tuple[str, ...], notes: list[str], range_aware_fp16: bool
) -> tuple[AppliedPlan, onnx.ModelProto] | None:
    """The model with the weight ``algorithms`` on ``best``'s, and its Q/DQ model as they left it
    (before any FP16 conversion). A trial that extends the best's own algorithms runs only its last
    one, on the best's Q/DQ model; one that extends a trial that was not kept is None."""
    job = dataclasses.replace(job, info=best.info)
    extends = len(algorithms) > 1
    if extends and (algorithms[:-1] != best_algorithms or best.adjusted is None):
        return None
    run = _weight_algorithms(job, best.ranges, algorithms[-1:] if extends else algorithms, notes)
    adjusted: list[onnx.ModelProto] = []

    def adjust(model: onnx.ModelProto) -> onnx.ModelProto:
        adjusted.append(run(best.adjusted if extends else model))
        return adjusted[-1]

    applied = apply_plan(best.info, best.ranges, job.plan, best.export, range_aware_fp16=range_aware_fp16, adjust=adjust)
    return applied, adjusted[-1]


def _auto_rewrites(job: _Job) -> list[str]:
    """The FP32 rewrites that fit the model, each calibrated anew (so only from ranges.json, whose
    methods it repeats): depthwise-equalization where there are depthwise Convs, SmoothQuant where
    MatMuls read activations with a constant weight (a transformer's projections; a classifier's
    Gemm head alone does not count)."""
    if not job.options.ranges:
        return []
    proto = job.info.proto
    fits = {
        "depthwise-equalization": has_depthwise_convs(proto),
        "smoothquant": any(n.op_type == "MatMul" for group in smoothable(proto).values() for n in group),
    }
    return [name for name, fit in fits.items() if fit]


def _rewrite_base(job: _Job, rewrite: str, ranges: RangeSet, folder: Path, notes: list[str], range_aware_fp16: bool) -> _Base:
    """A rewrite as a trial: the rewritten model, calibrated with the method asked for, else the
    ranges' methods in one pass and its method chosen as the default's was."""
    folder.mkdir()
    info, rewrite_notes = _rewritten(job, (rewrite,), folder)
    methods = [ranges.method_name(job.options.method)] if job.options.method else _int8_methods(ranges)
    options = CalibrationOptions(methods=",".join(methods))
    rewritten = calibrate(info, job.data, options, data_options=DataOptions(preprocess=job.preprocess)).ranges
    job = dataclasses.replace(job, info=info)
    method, note = _choose_method(job, rewritten, range_aware_fp16) if len(methods) > 1 else (methods[0], "")
    notes.extend([*rewrite_notes, *([note] if note else [])])
    export = dataclasses.replace(job.options.export(job.fmt), method=method)
    return _Base(info, rewritten, export, apply_plan(info, rewritten, job.plan, export, range_aware_fp16=range_aware_fp16))


def _placement_warnings(options: QuantizeOptions, fmt: str, report: QuantizeReport, *, smoothed: bool) -> list[str]:
    warnings = []
    if options.from_cache and report.missing_ranges:
        shown = ", ".join(report.missing_ranges[:5])
        warnings.append(f"{len(report.missing_ranges)} tensor(s) have no entry in the cache; their ops stay in float: {shown}")
    if fmt == "int8" and not smoothed and any(r.startswith("attention core") for r in report.kept_float.values()):
        warnings.append(
            "a transformer: --smoothquant (with --data) moves its activations' outlier channels into the weights "
            "(reports/bench/encoder.md measures what it gains)"
        )
    return warnings
