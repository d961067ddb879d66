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

from quantkit.errors import QuantkitError
from quantkit.plan import PrecisionPlan

PRECISIONS = ("fp32", "fp16", "int8", "best")
_TRT_TYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}


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
                f"--shapes {item!r}: use NAME:MIN/OPT/MAX with dims joined by x, e.g. input:1x3x224x224/8x3x224x224/32x3x224x224"
            ) from None
        if len(shapes) == 1:
            shapes = shapes * 3
        if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise QuantkitError(f"--shapes {item!r}: give one shape, or min/opt/max of the same rank")
        lo, opt, hi = shapes
        if any(a > b for a, b in zip(lo, opt, strict=True)) or any(a > b for a, b in zip(opt, hi, strict=True)):
            raise QuantkitError(f"--shapes {item!r}: need min <= opt <= max in every dimension")
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
        if not isinstance(spec.shape[0], int):
            lo = (1, *lo[1:])
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
    *, precision: str, calib_cache: str | None, qdq: bool, plan: PrecisionPlan | None, placeholder_ranges: bool = False
) -> None:
    """Refuse the builds whose result would silently be something else than asked (both the Python
    build and the printed trtexec commands go through this)."""
    if qdq and plan is not None:
        raise QuantkitError(
            "a precision plan with a Q/DQ model: the Q/DQ nodes already fix each layer's precision, and TensorRT 10 would "
            "drop the plan silently; apply it when quantizing (quantkit quantize --plan) and build that",
            option="plan",
        )
    if plan is not None and not qdq and precision not in ("int8", "best") and (plan.default == "int8" or "int8" in plan.nodes.values()):
        raise QuantkitError(
            f"the plan asks for int8 nodes but --precision is {precision}: INT8 is not enabled, so OBEY would fail; "
            "pass --precision int8 with a cache",
            option="precision",
        )
    if precision in ("int8", "best") and not calib_cache and not qdq and not placeholder_ranges:
        raise QuantkitError(
            f"--precision {precision} without a calibration cache or a Q/DQ model has no INT8 ranges: TensorRT would use "
            "placeholder scales and the engine's accuracy would be meaningless; pass --cache, build a Q/DQ model (--qdq), "
            "or --placeholder-ranges for a performance-only engine",
            option="precision",
        )


def trtexec_command(
    onnx_path: str,
    engine_path: str,
    *,
    trt_major: int = 10,
    precision: str = "fp32",
    calib_cache: str | None = None,
    qdq: bool = False,
    plan: PrecisionPlan | None = None,
    layer_names: Sequence[str] = (),
    shapes: Sequence[ShapeProfile] = (),
    workspace_mib: int | None = None,
    timing_cache: str | None = None,
    layer_info: str | None = None,
) -> list[str]:
    """The argument list of the equivalent trtexec call (``shlex.join`` it for a shell)."""
    if precision not in PRECISIONS:
        raise QuantkitError(f"unknown --precision '{precision}'; choose from {', '.join(PRECISIONS)}")
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
        if precision in ("fp16", "int8", "best") and not qdq:
            raise QuantkitError(
                f"TensorRT 11 removed --{precision}: precision comes from the ONNX types. "
                "Build the model from 'quantkit quantize' (INT8) or 'quantkit fp16' (FP16), strongly typed"
            )
        # 11.x networks are always strongly typed; no precision flags
    elif qdq:
        cmd.append("--stronglyTyped")  # explicit quantization: types come from the Q/DQ graph
    else:
        if precision == "best":
            cmd.append("--best")
        elif precision == "int8":
            cmd += ["--int8", "--fp16"]  # INT8 alone forces layers without INT8 kernels into FP32: a known slow trap
        elif precision == "fp16":
            cmd.append("--fp16")
        if calib_cache:
            if precision not in ("int8", "best"):
                raise QuantkitError("--cache needs --precision int8 (or best)")
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
