"""The composed entry points: each stage's function, with scale-out chosen from a ``ScaleOut``.

This module sits at the top of the flow (beside the CLI): it is the one place that joins the
stages to ``quantkit.scaleout``, so that calibration and tuning never import Ray's side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.calibration.pipeline import CalibrationResult, run_calibration
from quantkit.model import ModelInfo
from quantkit.options import CalibrationOptions, DataOptions, ExportOptions, RuntimeOptions, ScaleOut, TuneOptions
from quantkit.ranges import RangeSet
from quantkit.tuning.search import TuneResult, run_search
from quantkit.tuning.sensitivity import Evaluator, SensitivityResult, rank_nodes


def calibrate(
    model: str | Path | ModelInfo,
    data: str | Path | Any,
    options: CalibrationOptions | None = None,
    *,
    data_options: DataOptions | None = None,
    runtime: RuntimeOptions | None = None,
    scale_out: ScaleOut | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
) -> CalibrationResult:
    """Calibrate ``model`` on ``data`` (``quantkit.calibration.pipeline.run_calibration``), on Ray
    workers when ``scale_out`` asks for them; ranges.json and the caches go to ``out`` if given."""
    collector = None
    if scale_out is not None and scale_out.enabled:
        from quantkit.scaleout.ray import RayCollector

        collector = RayCollector(scale_out)
    return run_calibration(model, data, options, data_options=data_options, runtime=runtime, out=out, quiet=quiet, collector=collector)


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
    """Per-node sensitivity (``quantkit.tuning.sensitivity.rank_nodes``), on Ray workers when asked."""
    export = export or ExportOptions(allow_missing=True)
    return _with_executor(
        scale_out,
        model,
        ranges,
        export,
        lambda ex: rank_nodes(
            model, ranges, evaluator, method=export.method, target=export.target, subset=subset, executor=ex, quiet=quiet
        ),
        quiet,
    )


def tune(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    out_dir: str | Path,
    options: TuneOptions | None = None,
    *,
    export: ExportOptions | None = None,
    scale_out: ScaleOut | None = None,
    quiet: bool = True,
) -> TuneResult:
    """The per-layer precision search (``quantkit.tuning.search.run_search``), on Ray workers when
    ``scale_out`` asks for them (``quiet`` silences their progress)."""
    export = export or ExportOptions(allow_missing=True)
    return _with_executor(
        scale_out,
        model,
        ranges,
        export,
        lambda ex: run_search(model, ranges, evaluator, out_dir, options, export=export, executor=ex, quiet=quiet),
        quiet,
    )
