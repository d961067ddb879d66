"""quantkit: calibrate FP32 ONNX models and produce what TensorRT and onnxruntime deploy in INT8/FP16.

The façade is lazy: ``import quantkit`` loads neither onnxruntime nor onnx-graphsurgeon; each
name imports its module on first use. The flow, one subpackage a stage:

    data -> backends -> calibration -> export -> evaluation -> tuning -> report,  scaleout beside
"""

__version__ = "0.1.0"

from quantkit._deps import lazy_exports

_EXPORTS = {
    # one function per stage, doing what its command does
    **dict.fromkeys(["calibrate", "quantize", "fp16", "build", "tune", "analyze"], "quantkit.api"),
    **dict.fromkeys(["QuantizeResult", "Fp16Result", "BuildReport"], "quantkit.api"),
    # calibration
    **dict.fromkeys(["CalibrationResult", "compute_ranges", "write_outputs"], "quantkit.calibration.pipeline"),
    **dict.fromkeys(["CalibrationStats", "collect_statistics"], "quantkit.calibration.collect"),
    "TensorHistogram": "quantkit.calibration.histogram",
    **dict.fromkeys(
        ["EntropyCalibrator", "MinMaxCalibrator", "MseCalibrator", "PercentileCalibrator", "make_calibrators"],
        "quantkit.calibration.methods",
    ),
    # plain data objects and their files
    "PreprocessSpec": "quantkit.data.preprocess",
    "QuantkitError": "quantkit.errors",
    "load_model": "quantkit.model",
    **dict.fromkeys(["RangeSet", "TensorRange"], "quantkit.ranges"),
    "PrecisionPlan": "quantkit.plan",
    **dict.fromkeys(["read_trt_cache", "write_trt_cache"], "quantkit.trt_cache"),
    # options, one per stage
    **dict.fromkeys(
        [
            "DataOptions",
            "RuntimeOptions",
            "CalibrationOptions",
            "QuantizeOptions",
            "Fp16Options",
            "BuildOptions",
            "CheckOptions",
            "ExportOptions",
            "EvalOptions",
            "TuneOptions",
            "ScaleOut",
        ],
        "quantkit.options",
    ),
    # export, evaluation, tuning
    "quantize_model": "quantkit.export.qdq",
    "convert_fp16": "quantkit.export.fp16",
    "apply_plan": "quantkit.export.apply",
    "optimize_model": "quantkit.graph.optimize",
    "evaluate": "quantkit.evaluation.run",
    "Evaluator": "quantkit.tuning.sensitivity",
    "write_report": "quantkit.report.eval",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *sorted(_EXPORTS)]
