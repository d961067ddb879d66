"""Calibration pipeline: data -> model runner -> statistics -> ranges -> artifacts.

Each step is a plain function usable on its own:

- ``collect_statistics(model, batches)`` runs the model and streams every batch into one
  ``TensorHistogram`` per tensor (memory is independent of the number of samples);
- ``compute_ranges(stats, calibrators)`` turns the statistics into a ``RangeSet``;
- ``write_outputs(ranges, out_dir)`` writes ``ranges.json`` and one TensorRT cache per method;
- ``calibrate(...)`` composes them, as ``quantkit calibrate`` does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import __version__
from quantkit.atomic import ensure_writable_dir, write_files_atomic
from quantkit.data.batching import Batch, batches
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.histogram import Scratch, TensorHistogram
from quantkit.methods import Calibrator, make_calibrators
from quantkit.model import ModelInfo, load_model
from quantkit.progress import StepTimer, sample_bar
from quantkit.ranges import RangeSet, TensorRange
from quantkit.runner import ActivationRunner, select_calibration_tensors
from quantkit.trt_cache import DEFAULT_ALGORITHM, DEFAULT_TRT_VERSION, format_trt_cache


@dataclass
class CalibrationStats:
    """What one collection pass produced: per-tensor statistics plus the provenance of the data."""

    histograms: dict[str, TensorHistogram]
    num_samples: int = 0
    batch_size: int = 0
    input_shapes: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain form, to send a shard's statistics between processes."""
        return {
            "histograms": {n: h.to_dict() for n, h in self.histograms.items()},
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "input_shapes": self.input_shapes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationStats:
        hists = {n: TensorHistogram.from_dict(h) for n, h in d["histograms"].items()}
        return cls(hists, int(d["num_samples"]), int(d["batch_size"]), {k: [list(s) for s in v] for k, v in d["input_shapes"].items()})

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of two shards together (exact: equal to collecting both in one run)."""
        names = list(self.histograms) + [n for n in other.histograms if n not in self.histograms]
        merged = {}
        for name in names:
            mine, theirs = self.histograms.get(name), other.histograms.get(name)
            merged[name] = mine.merge(theirs) if mine is not None and theirs is not None else (mine or theirs).copy()  # type: ignore[union-attr]
        shapes = {k: list(v) for k, v in self.input_shapes.items()}
        for k, v in other.input_shapes.items():
            shapes.setdefault(k, [])
            shapes[k] += [s for s in v if s not in shapes[k]]
        return CalibrationStats(merged, self.num_samples + other.num_samples, max(self.batch_size, other.batch_size), shapes)


def collect_statistics(
    model: ModelInfo,
    data: Iterable[Batch],
    tensors: Sequence[str] | None = None,
    *,
    bins: int = 2048,
    all_tensors: bool = False,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    on_batch: Callable[[Batch], None] | None = None,
    runner: ActivationRunner | None = None,
) -> CalibrationStats:
    """Run ``model`` over ``data`` and fold every activation into its streaming histogram.

    ``runner`` reuses an existing session (a distributed worker keeps one across its shards).
    Histogram updates run on a worker thread while onnxruntime computes the next batch (it
    releases the GIL), so statistics cost little beyond inference. At most three batches of
    activations exist at once (one folded, one queued, one computed), so memory does not depend
    on the number of samples.
    """
    if runner is None:
        tensors = list(tensors) if tensors is not None else select_calibration_tensors(model.proto, all_tensors)
        if not tensors:
            raise QuantkitError(f"model {model.path} has no float activations to calibrate")
        runner = ActivationRunner(model, tensors, providers=providers, threads=threads)
        own_runner = True
    else:
        tensors, own_runner = runner.tensors, False
    histograms = {name: TensorHistogram(bins=bins) for name in tensors}
    stats = CalibrationStats(histograms)
    pending: queue.Queue[dict[str, np.ndarray] | None] = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def fold() -> None:
        scratch = Scratch()
        while (item := pending.get()) is not None:
            if failure:
                continue  # drain so the producer never blocks
            try:
                for name, values in item.items():
                    histograms[name].update(values, scratch)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
                failure.append(exc)

    worker = threading.Thread(target=fold, name="quantkit-histograms", daemon=True)
    worker.start()
    try:
        for batch in data:
            outputs = runner.run(batch.feeds, batch.ids)
            if failure:
                break
            pending.put(outputs)
            stats.num_samples += len(batch)
            stats.batch_size = max(stats.batch_size, len(batch))
            for name, arr in batch.feeds.items():
                shape = list(arr.shape)
                known = stats.input_shapes.setdefault(name, [])
                if shape not in known:
                    known.append(shape)
            if on_batch is not None:
                on_batch(batch)
    finally:
        pending.put(None)
        worker.join()
        if own_runner:
            runner.close()
    if failure:
        raise failure[0]
    # Tensors that never produced float values (integer-typed, or empty) have nothing to calibrate.
    stats.histograms = {n: h for n, h in histograms.items() if h.count or h.nonfinite or h.sentinels}
    return stats


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
        methods={cal.name: cal.params() for cal in calibrators},
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


def calibrate(
    model: str | Path | ModelInfo,
    data: str | Path,
    *,
    methods: str | Sequence[str] = "entropy",
    out: str | Path | None = None,
    num_samples: int | None = None,
    batch_size: int = 32,
    preprocess: PreprocessSpec | None = None,
    input_name: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    percentile: float = 99.99,
    bins: int = 2048,
    all_tensors: bool = False,
    trt_version: str = DEFAULT_TRT_VERSION,
    cache_algorithm: str = DEFAULT_ALGORITHM,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    quiet: bool = True,
    workers: int | None = None,
    ray_address: str | None = None,
    gpus_per_worker: float = 0.0,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` with one or more methods; write outputs to ``out`` if given.

    Every failure the user can fix raises ``QuantkitError`` before anything is written.
    """
    timer = StepTimer(quiet)
    calibrators = make_calibrators(methods, percentile)  # fail fast on unknown methods
    if bins < 256 or bins & (bins - 1):
        raise QuantkitError(f"--num-bins must be a power of two of at least 256, got {bins}")
    out_dir = ensure_writable_dir(out) if out is not None else None
    with timer.step("load model"):
        info = model if isinstance(model, ModelInfo) else load_model(model)
    spec = preprocess or PreprocessSpec()
    source = open_source(data, info, spec, input_name=input_name, shuffle=shuffle, seed=seed)
    warnings: list[str] = []
    total = num_samples if num_samples is not None else source.size
    bar = sample_bar(total, "calibrating", quiet)
    try:
        with timer.step("collect statistics"):
            if workers:
                ray_args = {"address": ray_address, "gpus_per_worker": gpus_per_worker, "progress": bar.update}
                options = {"input_name": input_name, "shuffle": shuffle, "seed": seed, "all_tensors": all_tensors}
                stats = _collect_on_ray(info, data, source, spec, num_samples, batch_size, bins, workers, warnings, options, ray_args)
            else:
                stream = batches(source, info, batch_size, num_samples, source.description, warnings)
                stats = collect_statistics(
                    info,
                    stream,
                    bins=bins,
                    all_tensors=all_tensors,
                    providers=providers,
                    threads=threads,
                    on_batch=lambda b: bar.update(len(b)),
                )
    finally:
        bar.close()
    with timer.step("compute ranges"):
        calibration_info: dict[str, Any] = {"data": str(data), "bins": bins, "shuffle": shuffle, "seed": seed}
        if hasattr(source, "preprocess"):
            calibration_info["preprocess"] = source.preprocess.to_json()  # type: ignore[union-attr]
        ranges = compute_ranges(stats, calibrators, info, calibration_info, warnings)
    files: list[Path] = []
    if out_dir is not None:
        with timer.step("write outputs"):
            files = write_outputs(ranges, out_dir, trt_version, cache_algorithm)
    return CalibrationResult(ranges, stats, files, dict(timer.times), source.description)


def _collect_on_ray(
    info: ModelInfo,
    data: str | Path,
    source: Any,
    spec: PreprocessSpec,
    num_samples: int | None,
    batch_size: int,
    bins: int,
    workers: int,
    warnings: list[str],
    options: dict[str, Any],
    ray_args: dict[str, Any],
) -> CalibrationStats:
    """The same statistics as a single-process run, collected in shards by Ray workers."""
    from quantkit.distributed import collect_statistics_distributed

    available = source.size if source.size is not None else sum(1 for _ in source)
    if num_samples is not None and available < num_samples:
        raise QuantkitError(
            f"{source.description} has only {available} sample(s) but --num-samples {num_samples} was asked; "
            "lower --num-samples or omit it to use all"
        )
    total = num_samples if num_samples is not None else available
    if total == 0:
        raise QuantkitError(f"{source.description} yielded no samples")
    tensors = select_calibration_tensors(info.proto, options["all_tensors"])
    if not tensors:
        raise QuantkitError(f"model {info.path} has no float activations to calibrate")
    source_args = {"preprocess": spec, "input_name": options["input_name"], "shuffle": options["shuffle"], "seed": options["seed"]}
    stats, notes = collect_statistics_distributed(
        info,
        data,
        total=total,
        batch_size=batch_size,
        bins=bins,
        tensors=tensors,
        source_args=source_args,
        workers=workers,
        address=ray_args["address"],
        gpus_per_worker=ray_args["gpus_per_worker"],
        on_shard=ray_args["progress"],
    )
    warnings += notes
    return stats


def summary_table(result: CalibrationResult) -> str:
    """Human summary: counts, timings, and per-method amax spread (relative to minmax where present)."""
    r = result.ranges
    lines = [
        f"calibrated {len(r.tensors)} tensors on {r.calibration['num_samples']} samples "
        f"(batch {r.calibration['batch_size']}) from {result.data_description}",
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
