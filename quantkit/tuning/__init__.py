"""Per-layer precision: ``sensitivity`` (which nodes cost accuracy) and ``search`` (the fewest to keep high)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Evaluator", "LocalExecutor", "NodeSensitivity", "Score", "SensitivityResult", "TrialExecutor", "analyze", "build_candidate"],
        "quantkit.tuning.sensitivity",
    ),
    **dict.fromkeys(["PrecisionSearch", "Trial", "TuneResult", "summary", "tune"], "quantkit.tuning.search"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
