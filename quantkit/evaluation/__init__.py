"""Evaluation of every variant against FP32: ``variants`` (what is compared), ``metrics`` (task
metrics and fidelity), ``latency`` (timing) and ``run`` (``evaluate``)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["EvalResult", "VariantResult", "evaluate", "flags_for"], "quantkit.evaluation.run"),
    **dict.fromkeys(
        ["MODELOPT_MISSING", "CalibrationInput", "VariantSpec", "build_variants", "parse_variants"],
        "quantkit.evaluation.variants",
    ),
    **dict.fromkeys(["Latency", "hardware", "measure_all", "measure_latency"], "quantkit.evaluation.latency"),
    **dict.fromkeys(
        ["METRICS", "Metric", "OutputFidelity", "fidelity", "sqnr_db", "cosine", "top1_agreement"], "quantkit.evaluation.metrics"
    ),
    **dict.fromkeys(["RUNTIMES", "runtime_providers"], "quantkit.backends.ort"),
    **dict.fromkeys(
        ["BUILT_IN", "Objective", "Measurement", "choose_objective", "objective", "from_callable", "decode_detections"],
        "quantkit.evaluation.objectives",
    ),
    "DEFAULT_VARIANTS": "quantkit.options",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
