"""The composed entry points: each stage's function, with scale-out chosen from a ``ScaleOut``.

This module sits at the top of the flow (beside the CLI): it is the one place that joins the
stages to ``quantkit.scaleout``, so that calibration and tuning never import Ray's side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.calibration.pipeline import CalibrationResult
from quantkit.calibration.pipeline import calibrate as _calibrate
from quantkit.model import ModelInfo
from quantkit.options import CalibrationOptions, ExportOptions, ScaleOut, TuneOptions, split_options
from quantkit.ranges import RangeSet
from quantkit.tuning.search import TuneResult
from quantkit.tuning.search import tune as _tune
from quantkit.tuning.sensitivity import Evaluator, SensitivityResult
from quantkit.tuning.sensitivity import analyze as _analyze


def calibrate(
    model: str | Path | ModelInfo,
    data: str | Path,
    options: CalibrationOptions | None = None,
    *,
    scale_out: ScaleOut | None = None,
    **kwargs: Any,
) -> CalibrationResult:
    """``quantkit.calibration.pipeline.calibrate``, on Ray workers when ``scale_out`` asks for them.

    The old keywords ``workers=``, ``ray_address=`` and ``gpus_per_worker=`` fill ``scale_out``.
    """
    scale_kwargs = {k: kwargs.pop(k) for k in ("workers", "ray_address", "gpus_per_worker") if k in kwargs}
    (scale_out,) = split_options(scale_kwargs, "calibrate", scale_out or ScaleOut())
    if scale_out.enabled and "collector" not in kwargs:
        from quantkit.scaleout.ray import RayCollector

        kwargs["collector"] = RayCollector(scale_out)
    return _calibrate(model, data, options, **kwargs)


def _with_executor(scale_out: ScaleOut | None, model: ModelInfo, ranges: RangeSet, export: ExportOptions, run: Any, quiet: bool) -> Any:
    if scale_out is None or not scale_out.enabled:
        return run(None)
    from quantkit.scaleout.ray import RayExecutor, ray_cluster

    with ray_cluster(int(scale_out.workers or 1), scale_out.address) as ray:
        executor = RayExecutor(
            ray, model, ranges, export.method, export.target, int(scale_out.workers or 1), scale_out.gpus_per_worker, quiet
        )
        return run(executor)


def analyze(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    export: ExportOptions | None = None,
    *,
    scale_out: ScaleOut | None = None,
    subset: int | None = 256,
    quiet: bool = True,
) -> SensitivityResult:
    """Per-node sensitivity (``quantkit.tuning.sensitivity.analyze``), on Ray workers when asked."""
    export = export or ExportOptions(allow_missing=True)
    return _with_executor(
        scale_out,
        model,
        ranges,
        export,
        lambda ex: _analyze(model, ranges, evaluator, method=export.method, target=export.target, subset=subset, executor=ex),
        quiet,
    )


def tune(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    out_dir: str | Path,
    options: TuneOptions | None = None,
    *,
    scale_out: ScaleOut | None = None,
    quiet: bool = True,
    **kwargs: Any,
) -> TuneResult:
    """``quantkit.tuning.search.tune`` (same arguments; ``export=`` and the old keywords too), on Ray
    workers when ``scale_out`` asks for them (``quiet`` silences their progress)."""
    export = kwargs.pop("export", None) or ExportOptions(allow_missing=True)
    options, export = split_options(kwargs, "tune", options or TuneOptions(), export)
    return _with_executor(
        scale_out, model, ranges, export, lambda ex: _tune(model, ranges, evaluator, out_dir, options, export=export, executor=ex), quiet
    )
