"""Per-layer precision: ``sensitivity`` (which nodes cost accuracy) and ``search`` (the fewest to keep high)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Evaluator", "LocalExecutor", "NodeSensitivity", "Score", "SensitivityResult", "TrialExecutor", "build_candidate", "rank_nodes"],
        "quantkit.tuning.sensitivity",
    ),
    **dict.fromkeys(["PrecisionSearch", "Trial", "TuneResult", "run_search", "summary"], "quantkit.tuning.search"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
