"""What deployment tools consume: Q/DQ ONNX (``qdq``), FP16 models (``fp16``) and mixed-precision
models from a precision plan (``apply``). TensorRT caches are a format of the RangeSet itself
(``quantkit.trt_cache``)."""

from quantkit._deps import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["QuantizeReport", "TARGETS", "quantize_model", "ranges_from_qdq", "node_names"], "quantkit.export.qdq"),
    **dict.fromkeys(["Fp16Report", "convert_fp16", "fp16_precisions"], "quantkit.export.fp16"),
    **dict.fromkeys(["AppliedPlan", "apply_plan"], "quantkit.export.apply"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
