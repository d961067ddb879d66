"""Calibration: statistics (``histogram``), range methods (``methods``), one collection pass
(``collect``) and the pipeline that composes them into a ``RangeSet`` and its files (``pipeline``)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["CalibrationResult", "run_calibration", "cache_path", "compute_ranges", "summary_table", "write_outputs"],
        "quantkit.calibration.pipeline",
    ),
    **dict.fromkeys(
        ["CalibrationStats", "Collector", "LocalCollector", "SourceSpec", "collect_statistics", "select_calibration_tensors"],
        "quantkit.calibration.collect",
    ),
    "TensorHistogram": "quantkit.calibration.histogram",
    **dict.fromkeys(["Calibrator", "METHOD_NAMES", "make_calibrators"], "quantkit.calibration.methods"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
