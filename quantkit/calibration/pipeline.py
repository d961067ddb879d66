"""Calibration pipeline: data -> model runner -> statistics -> ranges -> artifacts.

Each step is a plain function usable on its own:

- ``collect_statistics(model, batches)`` (in ``collect``) runs the model and streams every batch
  into one ``TensorHistogram`` per tensor (memory is independent of the number of samples);
- ``compute_ranges(stats, calibrators)`` turns the statistics into a ``RangeSet``;
- ``write_outputs(ranges, out_dir)`` writes ``ranges.json`` and one TensorRT cache per method;
- ``run_calibration(model, data, options)`` composes them in one process (``quantkit.calibrate`` adds scale-out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import __version__
from quantkit._io import StepTimer, ensure_writable_dir, sample_bar, write_files_atomic
from quantkit.calibration.collect import (
    CalibrationStats,
    Collector,
    CollectRequest,
    LocalCollector,
    SourceSpec,
    batch_size_for,
    select_calibration_tensors,
    tensor_groups,
)
from quantkit.calibration.methods import Calibrator, make_calibrators
from quantkit.data.batching import check_sample
from quantkit.data.preprocess import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo, load_model
from quantkit.options import CalibrationOptions, DataOptions, RuntimeOptions, given
from quantkit.ranges import RangeSet, TensorRange
from quantkit.trt_cache import DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION, format_trt_cache


def compute_ranges(
    stats: CalibrationStats,
    calibrators: Sequence[Calibrator],
    model: ModelInfo,
    calibration_info: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> RangeSet:
    """Apply every calibrator to every tensor's statistics (the first calibrator is the default)."""
    tensors: dict[str, TensorRange] = {}
    warnings = list(warnings or [])
    constant, unclean, empty = [], [], []
    for name, hist in stats.histograms.items():
        if hist.count == 0:
            empty.append(name)
            continue
        amax = {cal.name: float(np.float32(cal.compute_amax(hist))) for cal in calibrators}
        tensors[name] = TensorRange(name, hist.min, hist.max, hist.count, hist.zeros, hist.nonfinite, hist.sentinels, amax)
        if hist.absmax == 0.0 or hist.min == hist.max:
            constant.append(name)
        if hist.nonfinite or hist.sentinels:
            unclean.append(f"{name} ({hist.nonfinite} NaN/inf, {hist.sentinels} |x|>1e30)")
    if constant:
        warnings.append(
            f"{len(constant)} constant tensor(s), given a valid non-zero scale: {', '.join(constant[:5])}"
            + (" ..." if len(constant) > 5 else "")
        )
    if unclean:
        warnings.append(
            f"values left out of the ranges (NaN/inf or mask sentinels) in: {'; '.join(unclean[:5])}" + (" ..." if len(unclean) > 5 else "")
        )
    if empty:
        warnings.append(f"{len(empty)} tensor(s) held only NaN/inf/sentinel values and got no range: {', '.join(empty[:5])}")
    info = {"num_samples": stats.num_samples, "batch_size": stats.batch_size, "input_shapes": stats.input_shapes}
    info.update(calibration_info or {})
    return RangeSet(
        tensors=tensors,
        methods={cal.name: {**cal.params(), "for_format": cal.for_format} for cal in calibrators},
        model={"path": str(model.path), "sha256": model.sha256},
        calibration=info,
        quantkit_version=__version__,
        warnings=warnings,
    )


def cache_path(out_dir: Path, model_path: Path, method: str) -> Path:
    return out_dir / f"{model_path.stem}.{method}.cache"


def write_outputs(
    ranges: RangeSet, out_dir: str | Path, trt_version: str = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM
) -> list[Path]:
    """Write ``ranges.json`` and ``<model>.<method>.cache`` for every method, all or nothing."""
    out = Path(out_dir)
    model_path = Path(ranges.model["path"])
    files = {out / "ranges.json": ranges.dumps().encode()}
    for method in ranges.methods:
        files[cache_path(out, model_path, method)] = format_trt_cache(ranges.scales(method), trt_version, algorithm)
    return write_files_atomic(files)


@dataclass
class CalibrationResult:
    ranges: RangeSet
    stats: CalibrationStats
    files: list[Path]
    timings: dict[str, float]
    data_description: str


def run_calibration(
    model: str | Path | ModelInfo,
    data: str | Path | Any,
    options: CalibrationOptions | None = None,
    *,
    data_options: DataOptions | None = None,
    runtime: RuntimeOptions | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
    collector: Collector | None = None,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data``; write ranges.json and the caches to ``out`` if given.

    ``data``: a path (image folder, table, arrays, saved Hugging Face dataset), ``hf:NAME[:split]``,
    a ``datasets.Dataset``, or any iterable of ``{input_name: array}`` dicts, a generator included.

    ``collector`` chooses where the model runs (default: this process). Every failure the user
    can fix raises ``QuantkitError`` before anything is written.
    """
    options, data_options, runtime = (
        given(options, CalibrationOptions, "options"),
        given(data_options, DataOptions, "data_options"),
        given(runtime, RuntimeOptions, "runtime"),
    )
    timer = StepTimer(quiet)
    calibrators = make_calibrators(options.methods, options.percentile)  # fail fast on unknown methods
    out_dir = ensure_writable_dir(out) if out is not None else None
    with timer.step("load model"):
        info = model if isinstance(model, ModelInfo) else load_model(model)
    spec = data_options.preprocess or PreprocessSpec()
    from_path = isinstance(data, (str, Path))
    source_spec = SourceSpec(str(data) if from_path else data, spec, data_options.input_name, data_options.shuffle, data_options.seed)
    source = source_spec.open(info)
    tensors = select_calibration_tensors(info.proto, options.all_tensors)
    if not tensors:
        raise QuantkitError(f"model {info.path} has no float activations to calibrate")
    collector = collector or LocalCollector(runtime.providers, runtime.threads)
    warnings: list[str] = []
    batch_size, per_sample, groups = data_options.batch_size, 0, [list(tensors)]
    if batch_size is None:  # the largest batch whose activations fit the memory budget
        first = next(iter(source), None)
        if first is None:
            raise QuantkitError(f"{source.description} yielded no samples", option="data")
        batch_size, per_sample = batch_size_for(info, check_sample(first, info.inputs), tensors, options.max_memory)
        if per_sample > options.max_memory:
            groups = _passes(info, check_sample(first, info.inputs), tensors, options.max_memory, from_path, per_sample, warnings)
    total = data_options.num_samples if data_options.num_samples is not None else source.size
    bar = sample_bar(total * len(groups) if total else None, "calibrating", quiet)
    try:
        with timer.step("collect statistics"):
            stats = None
            for k, group in enumerate(groups):  # a second pass reopens the data (a path: _passes checked)
                request = CollectRequest(source_spec, group, batch_size, data_options.num_samples, options.bins, warnings, bar.update)
                found = collector.collect(info, source if k == 0 else source_spec.open(info), request)
                stats = found if stats is None else stats.joined(found, tensors)
    finally:
        bar.close()
    with timer.step("compute ranges"):
        calibration_info: dict[str, Any] = {
            "data": str(data) if from_path else source.description,  # no object address: ranges.json is the same on repeat
            "bins": options.bins,
            "shuffle": data_options.shuffle,
            "seed": data_options.seed,
        }
        if per_sample:
            calibration_info["batch_from_memory"] = {"max_memory": options.max_memory, "bytes_per_sample": per_sample}
        # the preprocessing the images were read with (image folders resolve it; tables and datasets
        # apply it to their image column), so the fidelity check and eval read the data the same way
        preprocess = getattr(source, "preprocess", None) or getattr(source, "preprocess_base", None)
        if preprocess is not None:
            calibration_info["preprocess"] = preprocess.to_json()
        ranges = compute_ranges(stats, calibrators, info, calibration_info, warnings)
    files: list[Path] = []
    if out_dir is not None:
        with timer.step("write outputs"):
            files = write_outputs(ranges, out_dir, options.trt_version, options.cache_algorithm)
    return CalibrationResult(ranges, stats, files, dict(timer.times), source.description)


def _passes(
    info: ModelInfo, sample: dict[str, Any], tensors: list[str], max_memory: int, reopenable: bool, per_sample: int, warnings: list[str]
) -> list[list[str]]:
    """When one sample's activations exceed the budget: the tensor groups of several passes over the
    data (``tensor_groups``), or one pass and a plain warning where the data cannot be read twice."""
    mib = per_sample / (1 << 20)
    if not reopenable:
        warnings.append(
            f"one sample's activations take about {mib:.0f} MiB, over max_memory ({max_memory / (1 << 20):.0f} MiB), and the data "
            "is a Python iterable that cannot be read twice: calibrated in one pass, over the budget; give a path to calibrate "
            "in several passes within it"
        )
        return [tensors]
    groups = tensor_groups(info, sample, tensors, max_memory)
    if len(groups) > 1:
        warnings.append(
            f"one sample's activations take about {mib:.0f} MiB, over max_memory ({max_memory / (1 << 20):.0f} MiB): "
            f"calibrated in {len(groups)} passes over the data, one group of tensors each"
        )
    return groups


def summary_table(result: CalibrationResult) -> str:
    """Human summary: counts, timings, and per-method amax spread (relative to minmax where present)."""
    r = result.ranges
    lines = [
        f"calibrated {len(r.tensors)} tensors on {r.calibration['num_samples']} samples "
        f"(batch {r.calibration['batch_size']}{_batch_note(r)}) from {result.data_description}",
        "time: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
        "",
        f"{'method':<11}{'min amax':>12}{'median amax':>14}{'max amax':>12}{'median amax/minmax':>20}",
    ]
    names = list(r.tensors)
    minmax = np.array([max(abs(r.tensors[n].min), abs(r.tensors[n].max)) for n in names])
    for method in r.methods:
        a = np.array([r.tensors[n].amax[method] for n in names])
        ratio = np.median(np.where(minmax > 0, a / np.where(minmax > 0, minmax, 1), 1.0))
        lines.append(f"{method:<11}{a.min():>12.4g}{np.median(a):>14.4g}{a.max():>12.4g}{ratio:>20.3f}")
    for w in r.warnings:
        lines.append(f"warning: {w}")
    if result.files:
        lines.append("")
        lines += [f"wrote {p}" for p in result.files]
    return "\n".join(lines)


def _batch_note(r: RangeSet) -> str:
    auto = r.calibration.get("batch_from_memory")
    if not auto:
        return ""
    return f", chosen for {auto['max_memory'] / 2**20:.0f} MiB of activations at {auto['bytes_per_sample'] / 2**20:.1f} MiB a sample"
