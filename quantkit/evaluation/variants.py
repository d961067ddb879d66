"""The variants ``evaluate`` compares, built on the fly from the model and the calibration data.

- ``fp32`` is the model itself; ``fp16`` is ``quantkit.export.fp16.convert_fp16``;
- ``int8:<method>`` is ``quantkit.export.qdq.quantize_model`` with that method's ranges, its
  placement following the runtime (``int8-tensorrt:`` / ``int8-onnxruntime:`` choose it);
- ``modelopt`` is NVIDIA ModelOpt's ONNX INT8 quantization, where ``nvidia-modelopt`` is installed;
- ``NAME=path.onnx`` is a model file of the user's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from quantkit._deps import install_hint, optional
from quantkit.calibration.methods import METHOD_NAMES
from quantkit.calibration.pipeline import run_calibration
from quantkit.data.batching import batches
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.export.apply import apply_plan
from quantkit.export.fp16 import convert_fp16
from quantkit.export.int4 import quantize_int4_weights
from quantkit.export.qdq import quantize_model
from quantkit.export.smoothquant import smooth_model
from quantkit.model import ModelInfo, load_model
from quantkit.options import CalibrationOptions, DataOptions, ExportOptions
from quantkit.ranges import RangeSet

MODELOPT_MISSING = f"nvidia-modelopt is not installed: {install_hint('modelopt')} to compare with ModelOpt"


@dataclass(frozen=True)
class VariantSpec:
    name: str
    kind: str  # fp32, fp16, int8, modelopt, file
    method: str | None = None
    target: str | None = None
    path: Path | None = None


def parse_variants(text: str, runtime: str) -> list[VariantSpec]:
    default_target = "tensorrt" if runtime == "tensorrt" else "onnxruntime"
    specs: list[VariantSpec] = []
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise QuantkitError(f"no variant given in {text!r}; e.g. fp32,fp16,int8:entropy", option="variants")
    names = [i.split("=", 1)[0] for i in items]
    if len(set(names)) != len(names):
        raise QuantkitError(f"variant names repeat in {text!r}", option="variants")
    for item in items:
        if "=" in item:
            name, path = item.split("=", 1)
            specs.append(VariantSpec(name, "file", path=Path(path)))
        elif item in ("fp32", "fp16", "modelopt", "int4w"):
            specs.append(VariantSpec(item, item))
        elif item.partition(":")[0] in ("fp8", "int8-sq", "int8-mixed"):  # TensorRT formats: one placement, a method's ranges
            kind, _, method = item.partition(":")
            if (method or "entropy") not in METHOD_NAMES:
                raise QuantkitError(f"variant '{item}': use {kind}:<{'|'.join(METHOD_NAMES)}>")
            specs.append(VariantSpec(item, kind, method=method or "entropy", target="tensorrt"))
        elif item.startswith("int8"):
            head, _, method = item.partition(":")
            target = head.partition("-")[2] or default_target
            method = method or "entropy"
            if target not in ("tensorrt", "onnxruntime") or method not in METHOD_NAMES:
                raise QuantkitError(f"variant '{item}': use int8[-tensorrt|-onnxruntime]:<{'|'.join(METHOD_NAMES)}>")
            specs.append(VariantSpec(item, "int8", method=method, target=target))
        else:
            raise QuantkitError(
                f"unknown variant '{item}'; use fp32, fp16, int8:<method>, int8-tensorrt:<method>, fp8:<method>, "
                "int8-sq:<method>, int4w, modelopt, or NAME=model.onnx"
            )
    if not any(s.kind == "fp32" for s in specs):
        specs.insert(0, VariantSpec("fp32", "fp32"))  # the baseline every other variant is compared with
    specs.sort(key=lambda s: s.kind != "fp32")  # the baseline runs first
    return specs


@dataclass
class CalibrationInput:
    """Where int8 variants get their ranges (a ranges file, or calibration data calibrated once)."""

    model: ModelInfo
    calib: str | Path | None = None
    ranges_path: str | Path | None = None
    preprocess: PreprocessSpec | None = None
    num_samples: int | None = None
    batch_size: int | None = None  # None: calibration picks it from its memory budget
    methods: str = "all"
    _ranges: Any = None

    def ranges(self) -> Any:
        if self._ranges is None:
            if self.ranges_path is not None:
                self._ranges = RangeSet.load(self.ranges_path)
            elif self.calib is not None:
                data = DataOptions(preprocess=self.preprocess, num_samples=self.num_samples, batch_size=self.batch_size)
                self._ranges = run_calibration(self.model, self.calib, CalibrationOptions(methods=self.methods), data_options=data).ranges
            else:
                raise QuantkitError("int8 variants need calibration data or ranges", option=("calib", "ranges"))
        return self._ranges

    def arrays(self) -> dict[str, np.ndarray]:
        """The calibration samples as input name -> stacked array (ModelOpt's calibration_data)."""
        if self.calib is None:
            raise QuantkitError("the modelopt variant needs calibration data", option="calib")
        got = list(batches(open_source(self.calib, self.model, self.preprocess), self.model, self.batch_size or 32, self.num_samples))
        return {k: np.concatenate([b.feeds[k] for b in got]) for k in got[0].feeds}


_QUANTIZED_TYPES = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8", TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT4: "int4"}
_FLOAT_NAMES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def layer_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """Node -> the precision its ONNX types give it, as a strongly typed TensorRT build reads them:
    a node fed by a DequantizeLinear computes in the quantized type; any other in its float type.
    Q/DQ nodes, Casts and nodes without a float tensor are left out."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    dq_from = {n.output[0]: types.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            continue
        quantized = [_QUANTIZED_TYPES.get(dq_from[t]) for t in node.input if t in dq_from]
        floats = [_FLOAT_NAMES[types[t]] for t in [*node.output, *node.input] if types.get(t) in _FLOAT_NAMES]
        if quantized and quantized[0]:
            out[node.name] = quantized[0]
        elif floats:
            out[node.name] = floats[0]
    return out


def build_variants(model: ModelInfo, specs: Sequence[VariantSpec], workdir: Path, calibration: CalibrationInput) -> dict[str, Path | str]:
    """Variant name -> model file, or the error that kept it from being built."""
    built: dict[str, Path | str] = {}
    for spec in specs:
        path = workdir / f"{model.path.stem}.{spec.name.replace(':', '.')}.onnx"
        try:
            if spec.kind == "fp32":
                built[spec.name] = model.path
            elif spec.kind == "file":
                if not spec.path or not spec.path.is_file():
                    raise QuantkitError(f"model file not found: {spec.path}")
                built[spec.name] = spec.path
            elif spec.kind == "fp16":
                fp16, _ = convert_fp16(model.proto)
                onnx.save(fp16, str(path))
                built[spec.name] = path
            elif spec.kind in ("int8", "fp8"):
                q, _ = quantize_model(model, calibration.ranges(), method=spec.method, target=spec.target or "tensorrt", fmt=spec.kind)
                onnx.save(q, str(path))
                built[spec.name] = path
            elif spec.kind == "int8-mixed":  # what quantize writes for TensorRT: fp16 outside the Q/DQ
                export = ExportOptions(spec.method, "tensorrt", high_precision="fp16")
                onnx.save(apply_plan(model, calibration.ranges(), None, export).model, str(path))
                built[spec.name] = path
            elif spec.kind == "int8-sq":
                built[spec.name] = _smoothquant_variant(model, path, spec.method or "entropy", calibration)
            elif spec.kind == "int4w":  # weight-only: no ranges; the clip search weighs channels alike
                q, _ = quantize_int4_weights(model)
                onnx.save(q, str(path))
                built[spec.name] = path
            elif spec.kind == "modelopt":
                built[spec.name] = _modelopt_variant(model, path, calibration)
        except QuantkitError as exc:
            built[spec.name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
            built[spec.name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    return built


def _smoothquant_variant(model: ModelInfo, path: Path, method: str, calibration: CalibrationInput) -> Path:
    """SmoothQuant on the calibration data, then the smoothed model calibrated and quantized (TensorRT placement)."""
    if calibration.calib is None:
        raise QuantkitError("the int8-sq variant needs calibration data: it smooths, then recalibrates", option="calib")
    stream = batches(open_source(calibration.calib, model, calibration.preprocess, shuffle=False), model, calibration.batch_size or 16)
    smoothed, _ = smooth_model(model, stream)
    smoothed_path = path.with_suffix(".smoothed.onnx")
    onnx.save(smoothed, str(smoothed_path))
    info = load_model(smoothed_path)
    data = DataOptions(preprocess=calibration.preprocess, num_samples=calibration.num_samples, batch_size=calibration.batch_size)
    ranges = run_calibration(info, calibration.calib, CalibrationOptions(methods=method), data_options=data).ranges
    q, _ = quantize_model(info, ranges, method=method, target="tensorrt")
    onnx.save(q, str(path))
    return path


def _modelopt_variant(model: ModelInfo, path: Path, calibration: CalibrationInput) -> Path | str:
    modelopt = optional("modelopt.onnx.quantization")
    if modelopt is None:
        return MODELOPT_MISSING
    modelopt_quantize = modelopt.quantize
    arrays = calibration.arrays()
    modelopt_quantize(
        onnx_path=str(model.path), quantize_mode="int8", calibration_data=arrays, calibration_eps=["cpu"], output_path=str(path)
    )
    return path
