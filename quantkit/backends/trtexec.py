"""The ``trtexec`` command equivalent to a quantkit build, for TensorRT 10.x and 11.x syntax.

Written beside every engine and into reports, so a user on a GPU machine can reproduce a build
or run it by hand. TensorRT 11 removed ``--int8``, ``--fp16``, ``--best``, ``--calib`` and the
precision-constraint flags (shared/reference/tensorrt-facts.md section 5). There, INT8 and FP16
live in the ONNX itself (``quantkit quantize`` / ``quantkit fp16``), and a strongly typed build
takes no precision flags.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.errors import QuantkitError
from quantkit.options import BUILD_PRECISIONS
from quantkit.plan import PrecisionPlan

PRECISIONS = BUILD_PRECISIONS  # one list: the options validate against it
_TRT_TYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}


#: ONNX element types of Q/DQ that TensorRT builds (symmetric: zero point 0), by the name quantkit reports
_QDQ_TYPE_NAMES = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.FLOAT8E4M3FN: "fp8",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
}
#: per Q/DQ type, what the 10.x build needs, from trtexec's 10.x help and the explicit-quantization
#: guide ("Use explicit quantization with Strong Typing. Precision-control build flags are not
#: required and should not be specified"; shared/reference/tensorrt-facts.md sections 4 and 5):
#: --stronglyTyped, and none of --int8/--fp8/--int4, which 11.x removed altogether
QDQ_BUILD_NOTES = {
    "int8": "INT8 Q/DQ: strongly typed, no --int8 (10.x); 11.x is always strongly typed",
    "fp8": "FP8 (E4M3) Q/DQ: strongly typed, no --fp8 (10.x; 11.x removed the flag); needs a GPU of compute "
    "capability 8.9 or later (Ada, Hopper, Blackwell)",
    "int4": "INT4 weight-only (block-wise DequantizeLinear): strongly typed, no --int4 (10.x; 11.x removed the flag)",
}


@dataclass(frozen=True)
class QdqFacts:
    """What an ONNX model's Q/DQ nodes quantize to, as a TensorRT build must know."""

    types: tuple[str, ...] = ()  # sorted names from _QDQ_TYPE_NAMES (or "other")
    nonzero_zero_points: int = 0  # Q/DQ nodes with a zero point other than 0 (asymmetric)

    @property
    def present(self) -> bool:
        return bool(self.types)


def qdq_facts(model: onnx.ModelProto) -> QdqFacts:
    """The quantized types and zero points of ``model``'s QuantizeLinear/DequantizeLinear nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {o: a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value" for o in n.output}
    types: set[str] = set()
    asymmetric = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        tensor = inits.get(zp) or consts.get(zp) if zp else None
        if tensor is None and node.op_type == "DequantizeLinear":
            tensor = inits.get(node.input[0]) or consts.get(node.input[0])  # a quantized weight without a zero point
        if tensor is None:
            attrs = {a.name: a.i for a in node.attribute if a.name == "output_dtype"}
            elem = attrs.get("output_dtype") or onnx.TensorProto.UINT8  # QuantizeLinear's default output is uint8
        else:
            elem = tensor.data_type
        types.add(_QDQ_TYPE_NAMES.get(elem, "other"))
        if zp and tensor is not None and tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            if np.any(numpy_helper.to_array(tensor) != 0):
                asymmetric += 1
    return QdqFacts(tuple(sorted(types)), asymmetric)


def has_float16(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 anywhere (a quantkit fp16 or mixed model): float16
    weights, a Cast to float16, or a float16 graph input or output."""
    graph = model.graph
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return True
    if any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute) for n in graph.node):
        return True
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in [*graph.input, *graph.output])


def check_qdq_for_tensorrt(facts: QdqFacts, source: str) -> None:
    """Refuse Q/DQ that TensorRT does not build: uint8 and asymmetric quantization (onnxruntime's format)."""
    if "uint8" in facts.types or "uint4" in facts.types or facts.nonzero_zero_points:
        raise QuantkitError(
            f"{source} has asymmetric or unsigned Q/DQ (onnxruntime's format, zero points other than 0 in "
            f"{facts.nonzero_zero_points} node(s), types {', '.join(facts.types)}): TensorRT builds only symmetric int8, fp8 "
            "and int4 Q/DQ; quantize the FP32 model again with --target tensorrt",
            option="model",
        )
    if "other" in facts.types:
        raise QuantkitError(f"{source} has Q/DQ of a type TensorRT does not build (types {', '.join(facts.types)})", option="model")


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shapes of one input, for a dynamic-shape optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def parse_shapes(text: str | None) -> list[ShapeProfile]:
    """'input:1x3x224x224/8x3x224x224/32x3x224x224[,other:...]' -> profiles (one shape = fixed)."""
    if not text:
        return []
    profiles = []
    for item in text.split(","):
        try:
            name, spec = item.rsplit(":", 1)
            shapes = [tuple(int(d) for d in s.split("x")) for s in spec.split("/")]
        except ValueError:
            raise QuantkitError(
                f"shape {item!r}: use NAME:MIN/OPT/MAX with dims joined by x, e.g. input:1x3x224x224/8x3x224x224/32x3x224x224",
                option="shapes",
            ) from None
        if len(shapes) == 1:
            shapes = shapes * 3
        if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise QuantkitError(f"shape {item!r}: give one shape, or min/opt/max of the same rank", option="shapes")
        lo, opt, hi = shapes
        if any(a > b for a, b in zip(lo, opt, strict=True)) or any(a > b for a, b in zip(opt, hi, strict=True)):
            raise QuantkitError(f"shape {item!r}: need min <= opt <= max in every dimension", option="shapes")
        profiles.append(ShapeProfile(name, lo, opt, hi))
    return profiles


def profile_from_shapes(inputs: Sequence[Any], seen: dict[str, list[list[int]]]) -> list[ShapeProfile]:
    """An optimization profile for the dynamic inputs from the batch shapes calibration saw
    (``ranges.json``'s ``input_shapes``): max and opt are the largest seen, min the smallest with
    the batch axis down to 1 (deployments run batch 1 even when calibration ran batch 32)."""
    profiles = []
    for spec in inputs:
        shapes = [tuple(int(d) for d in s) for s in seen.get(spec.name, []) if len(s) == len(spec.shape)]
        if all(isinstance(d, int) for d in spec.shape) or not shapes:
            continue
        lo = tuple(min(s[k] for s in shapes) for k in range(len(spec.shape)))
        hi = tuple(max(s[k] for s in shapes) for k in range(len(spec.shape)))
        axis = spec.batch_axis
        if axis is not None and not isinstance(spec.shape[axis], int):
            lo = (*lo[:axis], 1, *lo[axis + 1 :])
        profiles.append(ShapeProfile(spec.name, lo, hi, hi))
    return profiles


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


#: TensorRT types that are not activations: trtexec never constrains a layer of these
NON_ACTIVATION_TYPES = frozenset({"int32", "int64", "bool", "uint8"})


@dataclass(frozen=True)
class LayerFacts:
    """What trtexec's precision filters look at in one network layer (types as lower-case names)."""

    name: str
    precision: str = "float"  # the layer's default precision
    constant_weights: str | None = None  # a constant layer's weight type
    input_is_shape: bool = False
    input_type: str | None = None
    output_type: str | None = None


def plan_constraints(plan: PrecisionPlan, layer_names: Sequence[str]) -> dict[str, str]:
    """The one description of a plan's per-layer constraints, for trtexec and the Python build alike.

    ``"*"`` carries the default and each named layer its own precision, where they differ. INT8
    entries are left unconstrained: TensorRT picks INT8 where it has a kernel and a scale, and
    OBEY on a layer without an INT8 kernel would fail the build. So INT8 nodes can only sit
    under an INT8 default; under an FP16/FP32 default, ``"*"`` would force them too.
    """
    resolved = plan.resolve(list(layer_names))
    if plan.default != "int8" and any(p == "int8" for p in resolved.values()):
        raise QuantkitError(
            f"the plan puts nodes in int8 under a {plan.default} default: TensorRT's per-layer constraints cannot leave "
            "them to INT8 there; make int8 the default and list the fp16/fp32 nodes, or apply the plan in a Q/DQ model "
            "(quantkit quantize --plan)",
            option="plan",
        )
    constraints = {} if plan.default == "int8" else {"*": plan.default}
    for name, p in resolved.items():
        if p != plan.default and p != "int8":
            constraints[name] = p
    return constraints


def constraint_for(constraints: dict[str, str], layer: LayerFacts) -> str | None:
    """The precision trtexec's setLayerPrecisions gives ``layer`` (None: unconstrained).

    An exact name always applies. The ``"*"`` default skips what trtexec skips (samples/common/
    sampleEngines.cpp): layers whose default precision, constant weights, or input and output
    are of a non-activation type, and layers that operate on a shape tensor.
    """
    if layer.name in constraints:
        return constraints[layer.name]
    if "*" not in constraints:
        return None
    if layer.precision in NON_ACTIVATION_TYPES or (layer.constant_weights or "float") in NON_ACTIVATION_TYPES:
        return None
    if layer.input_is_shape:
        return None
    if (layer.input_type or "float") in NON_ACTIVATION_TYPES and (layer.output_type or "float") in NON_ACTIVATION_TYPES:
        return None
    return constraints["*"]


def layer_precisions(plan: PrecisionPlan, layer_names: Sequence[str]) -> str:
    """trtexec's ``--layerPrecisions`` (and ``--layerOutputTypes``) spec of ``plan_constraints``
    (TensorRT's ONNX parser names layers after the ONNX nodes)."""
    return ",".join(f"{name}:{_TRT_TYPES[p]}" for name, p in plan_constraints(plan, layer_names).items())


def check_build_request(
    *, precision: str, calib_cache: str | None, typed: bool, plan: PrecisionPlan | None, placeholder_ranges: bool = False
) -> None:
    """Refuse the builds whose result would silently be something else than asked (both the Python
    build and the printed trtexec commands go through this). ``typed``: the ONNX types decide each
    layer's precision (a Q/DQ, FP16 or mixed model, built strongly typed)."""
    if typed and plan is not None:
        raise QuantkitError(
            "a precision plan with a typed (Q/DQ or float16) model: its ONNX types already fix each layer's precision, and "
            "TensorRT 10 would drop the plan silently; apply it when quantizing (quantkit quantize/fp16 --plan) and build that",
            option="plan",
        )
    if plan is not None and not typed and precision not in ("int8", "best") and (plan.default == "int8" or "int8" in plan.nodes.values()):
        raise QuantkitError(
            f"the plan asks for int8 nodes but the precision is {precision}: INT8 is not enabled, so OBEY would fail; "
            "build int8 with a cache",
            option="precision",
        )
    if precision in ("int8", "best") and not calib_cache and not typed and not placeholder_ranges:
        raise QuantkitError(
            f"precision {precision} without a calibration cache or a Q/DQ model has no INT8 ranges: TensorRT would use "
            "placeholder scales and the engine's accuracy would be meaningless; give a cache, build a Q/DQ model, "
            "or allow placeholder ranges for a performance-only engine",
            option=("cache", "qdq", "placeholder_ranges"),
        )


def trtexec_command(
    onnx_path: str,
    engine_path: str,
    *,
    trt_major: int = 10,
    precision: str = "fp32",
    calib_cache: str | None = None,
    typed: bool = False,
    plan: PrecisionPlan | None = None,
    layer_names: Sequence[str] = (),
    shapes: Sequence[ShapeProfile] = (),
    workspace_mib: int | None = None,
    timing_cache: str | None = None,
    layer_info: str | None = None,
) -> list[str]:
    """The argument list of the equivalent trtexec call (``shlex.join`` it for a shell).

    ``typed``: the ONNX types decide (Q/DQ, FP16 or mixed model): ``--stronglyTyped`` on 10.x
    (without it 10.x reads the types as hints and may run a layer kept in FP32 in FP16), no
    precision flag on 11.x, whose networks are always strongly typed."""
    if precision not in PRECISIONS:
        raise QuantkitError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}", option="precision")
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if trt_major >= 11:
        if calib_cache:
            raise QuantkitError(
                "TensorRT 11 reads no calibration cache: turn the cache into a Q/DQ model with "
                "'quantkit quantize MODEL --from-cache CACHE' and build that"
            )
        if plan is not None:
            raise QuantkitError(
                "TensorRT 11 has no per-layer precision flags: apply the plan in the ONNX (quantkit quantize/fp16 --plan) and build that"
            )
        if precision in ("fp16", "int8", "best") and not typed:
            raise QuantkitError(
                f"TensorRT 11 removed --{precision}: precision comes from the ONNX types. "
                "Build the model from 'quantkit quantize' (INT8) or 'quantkit fp16' (FP16), strongly typed"
            )
        # 11.x networks are always strongly typed; no precision flags
    elif typed:
        cmd.append("--stronglyTyped")  # the ONNX types decide: Q/DQ and float16 as written
    else:
        if precision == "best":
            cmd.append("--best")
        elif precision == "int8":
            cmd += ["--int8", "--fp16"]  # INT8 alone forces layers without INT8 kernels into FP32: a known slow trap
        elif precision == "fp16":
            cmd.append("--fp16")
        if calib_cache:
            if precision not in ("int8", "best"):
                raise QuantkitError("a calibration cache needs precision int8 (or best)", option="precision")
            cmd.append(f"--calib={calib_cache}")
        if plan is not None:
            spec = layer_precisions(plan, layer_names)
            if spec:  # the Python build sets output types too: the command says the same
                cmd += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    for flag, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        if shapes:
            cmd.append(f"{flag}=" + ",".join(f"{p.name}:{_dims(getattr(p, attr))}" for p in shapes))
    if workspace_mib:
        cmd.append(f"--memPoolSize=workspace:{workspace_mib}M")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if layer_info:
        cmd += ["--profilingVerbosity=detailed", f"--exportLayerInfo={layer_info}"]
    cmd.append("--skipInference")
    return cmd


def shell(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)
