"""TensorRT engine builds (10.x implicit + explicit, 11.x explicit/strongly typed).

The only module that imports ``tensorrt``, and it does so lazily (``import_tensorrt``), so
quantkit installs and runs without it. Capabilities are detected by feature, never by parsing
the version:
- ``BuilderFlag.INT8`` and calibrators exist in 10.x and are gone in 11.x;
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists from 10.x.

The INT8 calibrator here never calibrates on the GPU: it serves quantkit's calibration cache to
TensorRT and reports that it has no batches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from quantkit._deps import install_hint, optional
from quantkit._io import write_bytes_atomic
from quantkit.backends.trtexec import LayerFacts, ShapeProfile, constraint_for, plan_constraints
from quantkit.errors import QuantkitError
from quantkit.plan import PrecisionPlan
from quantkit.trt_cache import parse_trt_cache

INSTALL_HINT = install_hint("tensorrt")


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or a QuantkitError that says what is missing and how to install it."""
    trt = optional("tensorrt")
    if trt is None:
        raise QuantkitError(f"TensorRT is not installed: {INSTALL_HINT}")
    return trt


def tensorrt_version() -> str | None:
    trt = optional("tensorrt")
    return None if trt is None else str(trt.__version__)


@dataclass(frozen=True)
class Capabilities:
    implicit_int8: bool  # BuilderFlag.INT8 + calibrators (TensorRT <= 10)
    fp16_flag: bool  # BuilderFlag.FP16 (TensorRT <= 10)
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT >= 10)
    precision_constraints: bool  # BuilderFlag.OBEY_PRECISION_CONSTRAINTS (TensorRT <= 10)


def capabilities(trt: ModuleType) -> Capabilities:
    flags = trt.BuilderFlag
    return Capabilities(
        implicit_int8=hasattr(flags, "INT8") and hasattr(trt, "IInt8EntropyCalibrator2"),
        fp16_flag=hasattr(flags, "FP16"),
        strongly_typed=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        precision_constraints=hasattr(flags, "OBEY_PRECISION_CONSTRAINTS"),
    )


def _logger(trt: ModuleType, lines: list[str]) -> Any:
    class CollectingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the base __init__ must run, or TensorRT crashes

        def log(self, severity: Any, msg: str) -> None:
            lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

    return CollectingLogger()


#: the calibrator class TensorRT pairs with each cache header's algorithm: it reads a cache only
#: when the header names its own algorithm (NvInfer.h: IInt8Calibrator::getAlgorithm; trtexec's
#: sampleEngines.cpp hands --calib caches to an IInt8EntropyCalibrator2)
CALIBRATOR_CLASSES = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
}


def cache_calibrator(trt: ModuleType, cache: bytes) -> Any:
    """The calibrator of the cache header's algorithm, handing TensorRT quantkit's cache and no
    batches: a cache given to a calibrator of another algorithm would be ignored, and TensorRT
    would calibrate on no data."""
    algorithm = parse_trt_cache(cache.decode("utf-8", "replace")).algorithm
    if algorithm not in CALIBRATOR_CLASSES:
        raise QuantkitError(
            f"the cache's algorithm is {algorithm}: TensorRT reads it only into an IInt8LegacyCalibrator, which needs "
            "histograms quantkit does not have; write the cache as EntropyCalibration2 (quantkit cache --cache-algorithm)",
            option="cache",
        )
    base = getattr(trt, CALIBRATOR_CLASSES[algorithm])

    class CacheCalibrator(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # required: a missing base __init__ segfaults

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # no data: TensorRT must use the cache

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheCalibrator()


@dataclass
class BuildResult:
    engine: Path
    log: Path
    layers: Path | None
    layer_precisions: dict[str, str] = field(default_factory=dict)  # ONNX node -> precision TensorRT chose
    capabilities: Capabilities | None = None


def _set_weak_precision(
    trt: Any, caps: Capabilities, config: Any, network: Any, precision: str, calib_cache: str | Path | None, plan: PrecisionPlan | None
) -> None:
    """Builder flags, the cache calibrator and the plan's per-layer constraints of a weakly typed build."""
    if precision in ("fp16", "int8", "best") and caps.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)  # with INT8 too: INT8 alone forces fallback layers to FP32
    if precision in ("int8", "best"):
        config.set_flag(trt.BuilderFlag.INT8)
        if calib_cache is not None:
            config.int8_calibrator = cache_calibrator(trt, Path(calib_cache).read_bytes())
    if plan is None:
        return
    if not caps.precision_constraints:
        raise QuantkitError("this TensorRT has no precision constraints: apply the plan in the ONNX when quantizing", option="plan")
    constraints = plan_constraints(plan, [network.get_layer(i).name for i in range(network.num_layers)])
    if constraints:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    types = {"fp32": trt.float32, "fp16": trt.float16}
    for i in range(network.num_layers):  # what trtexec's --layerPrecisions/--layerOutputTypes do, filters included
        layer = network.get_layer(i)
        p = constraint_for(constraints, layer_facts(layer))
        if p is not None:
            layer.precision = types[p]
            set_float_output_types(layer, types[p], (trt.float32, trt.float16))


def set_float_output_types(layer: Any, dtype: Any, floats: tuple[Any, ...]) -> None:
    """Output types on a layer's float outputs only: NvInfer.h's ILayer::setOutputType is ignored,
    with an error in the log, on an output of another type (TopK's INT32 indices) and on shape tensors."""
    for j in range(layer.num_outputs):
        out = layer.get_output(j)
        if not out.is_shape_tensor and out.dtype in floats:
            layer.set_output_type(j, dtype)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    calib_cache: str | Path | None = None,
    typed: bool = False,
    plan: PrecisionPlan | None = None,
    shapes: list[ShapeProfile] | None = None,
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
) -> BuildResult:
    """Build a TensorRT engine; write it, its build log and the inspector's per-layer report."""
    trt = import_tensorrt()
    caps = capabilities(trt)
    log_lines: list[str] = []
    logger = _logger(trt, log_lines)
    builder = trt.Builder(logger)
    strongly_typed = typed or not caps.implicit_int8
    flags = 0
    if strongly_typed and caps.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QuantkitError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    if not strongly_typed:
        _set_weak_precision(trt, caps, config, network, precision, calib_cache, plan)
    elif precision in ("fp16", "int8", "best") and not typed:
        raise QuantkitError(
            f"this TensorRT is strongly typed only: precision {precision} has no flag. Build the Q/DQ model "
            "from 'quantkit quantize' or the FP16 model from 'quantkit fp16'",
            option="precision",
        )

    if shapes:
        profile = builder.create_optimization_profile()
        for p in shapes:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
        if not strongly_typed and precision in ("int8", "best") and hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)
    cache_obj = None
    if timing_cache is not None:
        existing = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache_obj = config.create_timing_cache(existing)
        config.set_timing_cache(cache_obj, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    engine_path = Path(engine_path)
    log_path = engine_path.with_suffix(".build.log")
    write_bytes_atomic(log_path, ("\n".join(log_lines) + "\n").encode())
    if serialized is None:
        raise QuantkitError(f"TensorRT could not build {onnx_path}; see {log_path}")
    write_bytes_atomic(engine_path, bytes(serialized))
    if cache_obj is not None:
        write_bytes_atomic(Path(timing_cache), bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    layers_path, precisions = None, {}
    if engine is not None:
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        layers_path = engine_path.with_suffix(".layers.json")
        write_bytes_atomic(layers_path, info.encode())
        precisions = layer_precisions_from_inspector(json.loads(info))
    return BuildResult(engine_path, log_path, layers_path, precisions, caps)


def _type_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1].lower()


def layer_facts(layer: Any) -> LayerFacts:
    """What trtexec's precision filters read of a TensorRT layer."""
    weights = None
    if "CONSTANT" in str(layer.type):
        try:
            weights = _type_name(layer.weights.dtype)
        except AttributeError:
            weights = None
    first_in = layer.get_input(0) if layer.num_inputs else None
    first_out = layer.get_output(0) if layer.num_outputs else None
    return LayerFacts(
        name=layer.name,
        precision=_type_name(layer.precision),
        constant_weights=weights,
        input_is_shape=bool(first_in is not None and first_in.is_shape_tensor),
        input_type=_type_name(first_in.dtype) if first_in is not None else None,
        output_type=_type_name(first_out.dtype) if first_out is not None else None,
    )


#: words of the inspector's type strings, most specific first ("Thirty-two wide channel vectorized row major Int8 format")
_TYPE_WORDS = (
    ("int8", "int8"), ("fp8", "fp8"), ("int4", "int4"), ("bf16", "bf16"), ("half", "fp16"), ("fp16", "fp16"),
    ("float", "fp32"), ("fp32", "fp32"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool"),
)  # fmt: skip
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def _tensor_type(tensor: Any) -> str | None:
    """A tensor's data type from the inspector: 10.x's one "Format/Datatype" text, or 11.x's type
    field beside "Format", read as "Datatype" (NVIDIA's 11.1 trex tooling) or "DataType" (the
    IEngineInspector migration page's I/O tensors): whichever the engine wrote."""
    if not isinstance(tensor, dict):
        return None
    text = str(next((tensor[k] for k in ("Datatype", "DataType", "Format/Datatype") if tensor.get(k)), "")).lower()
    return next((name for word, name in _TYPE_WORDS if word in text), None)


def _onnx_names(layer: dict[str, Any]) -> list[str]:
    """The ONNX nodes a TensorRT layer came from: its "Metadata" ("[ONNX Layer: X]" entries, one per
    fused node, Myelin's ForeignNode included) where present, else the fused name split on " + "."""
    meta = layer.get("Metadata")
    if isinstance(meta, str) and (found := _ONNX_LAYER.findall(meta)):
        return list(dict.fromkeys(n.strip() for n in found))
    name = str(layer.get("Name", ""))
    if name.startswith("{ForeignNode[") or "Reformatting CopyNode" in name:
        return []  # a Myelin region without metadata, or a format conversion: no ONNX node to name
    return [n.strip() for n in name.split(" + ") if n.strip()]


def layer_precisions_from_inspector(info: dict[str, Any]) -> dict[str, str]:
    """ONNX node name -> the precision TensorRT computes it in, from the inspector's detailed JSON.

    Reads both schemas: 10.x describes each tensor by one "Format/Datatype" string, 11.x by a
    "DataType" field (with "Format" beside it). The compute precision of a layer is its weights'
    type where it has weights (a convolution's), else its first input's: the output type alone
    would call an INT8 convolution with a float output FP32. Layers without detail (built with
    less than DETAILED profiling verbosity) are "unknown".
    """
    out: dict[str, str] = {}
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            for name in layer.split(" + "):
                out.setdefault(name.strip(), "unknown")
            continue
        if not isinstance(layer, dict) or layer.get("LayerType") == "Reformat":
            continue
        weights = layer.get("Weights")
        precision = _tensor_type({"DataType": weights.get("Type")}) if isinstance(weights, dict) and weights.get("Type") else None
        inputs = [i for i in layer.get("Inputs") or [] if _tensor_type(i)]
        outputs = [o for o in layer.get("Outputs") or [] if _tensor_type(o)]
        precision = precision or (_tensor_type(inputs[0]) if inputs else None) or (_tensor_type(outputs[0]) if outputs else None)
        for name in _onnx_names(layer):
            out[name] = precision or "unknown"
    return out
