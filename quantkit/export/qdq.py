"""Explicit quantization: QuantizeLinear/DequantizeLinear pairs placed from calibrated ranges.

Two placements (``target``):

- ``tensorrt`` (TensorRT's Q/DQ guide, shared/reference/tensorrt-facts.md section 4):
  - Q/DQ on the inputs of Conv, ConvTranspose, Gemm and MatMul only. Activations are int8,
    per-tensor, symmetric (zero point 0, scale = amax/127 from the ranges).
  - Weights are int8 per-channel: axis 0, axis 1 for ConvTranspose and for ``[K, N]`` Gemm/MatMul
    weights.
  - In a skip-connection Add, the residual input is quantized, so TensorRT can fuse Conv+Add.
  - No Q/DQ on the outputs of weighted ops. GEMV-shaped MatMuls (M or N = 1) stay in float.
  - Everything else (BN, activations, Softmax, LayerNorm, mask arithmetic, pooling, Concat) stays
    in float. TensorRT propagates Q/DQ through the ops that commute with them, and a Concat
    behind one Q/DQ gets one shared scale that way.
- ``onnxruntime``: the pattern onnxruntime's CPU provider fuses into integer kernels.
  - uint8 asymmetric activations, on the inputs of every int8-capable op (weighted ops, Add,
    Concat, pooling). So each op's output is quantized where the next op reads it.
  - int8 per-channel weights.
  - No Q/DQ where onnxruntime would run the op in float anyway (a ConvTranspose, a Gemm writing a
    graph output): there it only adds error, and weights dequantized at every run.
  - HardSigmoid, which has no integer kernel, rewritten as an exact uint8 Add (QLinearAdd).

Graph edits go through onnx-graphsurgeon's IR. Every decision is recorded in a
``QuantizeReport``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quantkit.errors import QuantkitError
from quantkit.export.rules import FORMATS, TARGETS, NodePlan, OpRule, const_values, placement_rules
from quantkit.graph.passes import fold_batchnorm, hardswish_as_gate, if_branch_graphs
from quantkit.model import ModelInfo, effective_outputs, if_branches, shape_derived_tensors
from quantkit.optypes import ALREADY_QUANTIZED_OPS, ORT_INT8_OPS
from quantkit.plan import NodeFilter, PrecisionPlan
from quantkit.ranges import RangeSet, TensorRange, amax_to_scale, ranges_from_scales

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis)
FP8_OPSET = 19  # float8 types in QuantizeLinear/DequantizeLinear
FP8_MAX = 448.0  # E4M3's largest finite value


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did, node by node (the CLI prints its summary)."""

    target: str
    method: str
    int8_nodes: list[str] = field(default_factory=list)
    activation_params: dict[str, tuple[float, int]] = field(default_factory=dict)  # tensor -> (scale, zero point)
    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)  # initializer -> per-channel scales
    weight_bits: int = 8
    format: str = "int8"  # or fp8 (E4M3, TensorRT)
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why it was left in float
    missing_ranges: list[str] = field(default_factory=list)
    float_op_counts: dict[str, int] = field(default_factory=dict)  # op types with no int8 placement
    opset_converted_from: int | None = None
    folded_batchnorms: list[tuple[str, str]] = field(default_factory=list)  # (conv, bn), onnxruntime target
    layernorm_maxima: list[str] = field(default_factory=list)  # LayerNorm outputs quantized with their observed max
    decision_maxima: list[str] = field(default_factory=list)  # tensors feeding an output or a decision, at their observed max
    hardsigmoids_as_add: list[str] = field(default_factory=list)  # HardSigmoid nodes run as QLinearAdd (onnxruntime)

    def summary(self) -> str:
        lines = [
            f"{len(self.int8_nodes)} node(s) quantized to {self.format} for {self.target} ({self.method} ranges): "
            f"{len(self.activation_params)} activation Q/DQ, {len(self.weight_scales)} {self.format} weight tensor(s)"
            + (" (7-bit values)" if self.weight_bits == 7 else "")
        ]
        if self.folded_batchnorms:
            n = len(self.folded_batchnorms)
            lines.append(f"folded {n} BatchNormalization/bias node(s) into their Conv (onnxruntime fuses Conv+Q/DQ only then)")
        raised = [n for n in self.layernorm_maxima if n in self.activation_params]
        if raised:
            lines.append(
                f"{len(raised)} LayerNorm output(s) quantized at their observed max, not the {self.method} clip "
                "(their outlier channels are systematic, not noise)"
            )
        raised = [n for n in self.decision_maxima if n in self.activation_params]
        if raised:
            lines.append(
                f"{len(raised)} tensor(s) that feed an output or a decision (argmax, top-k, a comparison) quantized at their "
                f"observed max, not the {self.method} clip"
            )
        if self.hardsigmoids_as_add:
            lines.append(
                f"{len(self.hardsigmoids_as_add)} HardSigmoid(s) written as an int8 Add (alpha folded into the input's "
                "scale, the clip into the output's uint8 range): onnxruntime has no int8 HardSigmoid"
            )
        if self.opset_converted_from is not None:
            to = FP8_OPSET if self.format == "fp8" else MIN_OPSET
            lines.append(f"converted the model from opset {self.opset_converted_from} to {to} ({self.format} Q/DQ needs it)")
        if self.kept_float:
            reasons = Counter(self.kept_float.values())
            lines.append("left in float: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
        if self.float_op_counts:
            lines.append("no int8 placement (float): " + ", ".join(f"{op} x{n}" for op, n in sorted(self.float_op_counts.items())))
        if self.missing_ranges:
            lines.append(
                f"no range for {len(self.missing_ranges)} tensor(s), their ops left in float: {', '.join(self.missing_ranges[:5])}"
            )
        return "\n".join(lines)


#: ops that pass a tensor through between the attention MatMuls and the Softmax
_ATTENTION_PASS = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Dropout", "Identity"}


def attention_matmuls(graph: gs.Graph) -> set[str]:
    """The MatMuls of every attention core: MatMul(Q, K^T) -> [scale Mul/Div] -> [mask Add] ->
    Softmax -> [Cast/Dropout/Reshape] -> MatMul(., V), both MatMuls with two activation inputs."""
    found: set[str] = set()

    def two_activations(node: gs.Node) -> bool:
        return node.op == "MatMul" and len(node.inputs) == 2 and all(const_values(t) is None for t in node.inputs)

    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        # back from the Softmax to the score MatMul, through scale, mask and layout ops
        frontier, steps = [softmax.inputs[0]], 0
        while frontier and steps < 8:
            step = []
            for tensor in frontier:
                producer = tensor.inputs[0] if tensor.inputs else None
                if producer is None:
                    continue
                if two_activations(producer):
                    found.add(producer.name)
                elif producer.op in _ATTENTION_PASS:
                    step += [t for t in producer.inputs if const_values(t) is None]
            frontier, steps = step, steps + 1
        # forward from the Softmax to the MatMul with V
        frontier, steps = list(softmax.outputs[0].outputs), 0
        while frontier and steps < 6:
            step = []
            for consumer in frontier:
                if two_activations(consumer):
                    found.add(consumer.name)
                elif consumer.op in _ATTENTION_PASS:
                    step += [c for out in consumer.outputs for c in out.outputs]
            frontier, steps = step, steps + 1
    return found


def _check_not_quantized(proto: onnx.ModelProto) -> None:
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in ALREADY_QUANTIZED_OPS})
    if found:
        raise QuantkitError(f"the model is already quantized (it has {', '.join(found)} nodes); quantize its FP32 original instead")


def prepare_model(model: ModelInfo | onnx.ModelProto, min_opset: int = MIN_OPSET) -> tuple[onnx.ModelProto, int | None]:
    """A copy of the model with every node named (plans and reports key on names) at opset >= ``min_opset``."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto if isinstance(model, ModelInfo) else model)
    _check_not_quantized(proto)
    graphs = [proto.graph, *if_branches(proto.graph)]  # a branch's nodes are quantized, planned and reported too
    used = {n.name for g in graphs for n in g.node if n.name}
    for k, graph in enumerate(graphs):
        for i, node in enumerate(graph.node):
            if not node.name:
                name = f"{node.op_type}_{i}" if k == 0 else f"{node.op_type}_if{k}_{i}"
                while name in used:
                    name += "_"
                node.name = name
                used.add(name)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    converted = None
    if opset < min_opset:
        try:
            proto = onnx.version_converter.convert_version(proto, min_opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            raise QuantkitError(
                f"cannot convert the model from opset {opset} to {min_opset} ({exc}); re-export it with opset >= {min_opset}"
            ) from None
        converted = opset
    return proto, converted


def node_names(model: ModelInfo | onnx.ModelProto) -> list[str]:
    """Node names as quantkit sees them (unnamed nodes get ``<op>_<index>``), for plans."""
    proto, _ = prepare_model(model)
    return [n.name for g in [proto.graph, *if_branches(proto.graph)] for n in g.node]


def _hardsigmoid(v: float) -> float:
    return float(min(1.0, max(0.0, v / 6 + 0.5)))


def _hardswish_bounds(lo: float, hi: float) -> tuple[float, float]:
    """min and max of x * HardSigmoid(x) over [lo, hi] (its minimum, -3/8, is at x = -1.5)."""
    ends = [v * _hardsigmoid(v) for v in (lo, hi)]
    inner = [-0.375] if lo < -1.5 < hi else []
    return min(ends + inner), max(ends)


def _gate_bounds(kind: str, lo: float, hi: float) -> tuple[float, float]:
    return (_hardsigmoid(lo), _hardsigmoid(hi)) if kind == "hardsigmoid" else _hardswish_bounds(lo, hi)


def _with_gate_ranges(ranges: RangeSet, gates: list[tuple[str, str, str]]) -> RangeSet:
    """``ranges`` plus the range of each tensor the hard-swish rewrite left uncalibrated, mapped
    from its input's: the images of the input's bounds (and of each method's clipped bounds)."""
    tensors = dict(ranges.tensors)
    for name, source, kind in gates:
        t = tensors.get(source)
        if t is None or name in tensors:
            continue
        amax = {m: max(abs(v) for v in _gate_bounds(kind, max(t.min, -a), min(t.max, a))) for m, a in t.amax.items()}
        tensors[name] = TensorRange(name, *_gate_bounds(kind, t.min, t.max), t.count, amax=amax)
    return dataclasses.replace(ranges, tensors=tensors)


def _scalar_op(v: float, k: float, mul: bool) -> float:
    return v * k if mul else v + k


def _with_scalar_op_ranges(ranges: RangeSet, graph: gs.Graph) -> RangeSet:
    """``ranges`` plus the range of each uncalibrated output of ``x * a`` / ``x + b`` with a scalar
    constant, mapped from x's (chains like a learnable affine block's Mul -> Add, in graph order)."""
    tensors = dict(ranges.tensors)
    for node in graph.nodes:
        if node.op not in ("Add", "Mul") or len(node.inputs) != 2 or not node.outputs or node.outputs[0].name in tensors:
            continue
        values = [const_values(t) for t in node.inputs]
        if sum(v is not None for v in values) != 1:
            continue
        k = next(v for v in values if v is not None)
        source = tensors.get(next(t for t, v in zip(node.inputs, values, strict=True) if v is None).name)
        if k.size != 1 or source is None:
            continue
        k, mul = float(k.reshape(())), node.op == "Mul"
        lo, hi = sorted((_scalar_op(source.min, k, mul), _scalar_op(source.max, k, mul)))
        amax = {
            m: max(abs(_scalar_op(max(source.min, -a), k, mul)), abs(_scalar_op(min(source.max, a), k, mul)))
            for m, a in source.amax.items()
        }
        name = node.outputs[0].name
        tensors[name] = TensorRange(name, lo, hi, source.count, amax=amax)
    return dataclasses.replace(ranges, tensors=tensors) if len(tensors) != len(ranges.tensors) else ranges


_LAYERNORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


def _reduces_last_axis(node: gs.Node) -> bool:
    """Whether a ReduceMean reduces only the last axis (its axes attribute, or input from opset 18)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_values(node.inputs[1])
    if axes is None:
        return False
    axes = [int(a) for a in np.atleast_1d(np.asarray(axes))]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def layernorm_outputs(graph: gs.Graph) -> set[str]:
    """Tensors that are a LayerNorm's output: the fused ops', and the decomposed form's
    (x - mean) / sqrt(var + eps) [* gamma] [+ beta] as torch.onnx exports it before opset 17."""
    found: set[str] = set()
    for node in graph.nodes:
        if node.op in _LAYERNORM_OPS and node.outputs:
            found.add(node.outputs[0].name)
            continue
        if node.op != "Div" or len(node.inputs) != 2:
            continue
        centred, std = (t.inputs[0] if t.inputs else None for t in node.inputs)
        if centred is None or std is None or centred.op != "Sub" or std.op != "Sqrt":
            continue
        mean = centred.inputs[1].inputs[0] if len(centred.inputs) == 2 and centred.inputs[1].inputs else None
        if mean is None or mean.op != "ReduceMean" or not _reduces_last_axis(mean):
            continue  # a group or instance norm reduces other axes: its outputs are not a LayerNorm's
        out = node.outputs[0]
        for op in ("Mul", "Add"):  # gamma, then beta: constant operands, single consumer
            nxt = out.outputs[0] if len(out.outputs) == 1 else None
            if nxt is not None and nxt.op == op and any(const_values(t) is not None for t in nxt.inputs):
                out = nxt.outputs[0]
        found.add(out.name)
    return found


def _raised_to_observed(ranges: RangeSet, names: set[str], method: str) -> tuple[RangeSet, list[str]]:
    """``ranges`` with the amax of ``method`` raised to the observed maximum for each of ``names``."""
    tensors, raised = dict(ranges.tensors), []
    for name in sorted(names):
        t = tensors.get(name)
        if t is None or method not in t.amax:
            continue
        observed = max(abs(t.min), abs(t.max))
        if observed > t.amax[method]:
            tensors[name] = dataclasses.replace(t, amax={**t.amax, method: observed})
            raised.append(name)
    return (dataclasses.replace(ranges, tensors=tensors) if raised else ranges), raised


def _with_layernorm_maxima(ranges: RangeSet, graph: gs.Graph, method: str) -> tuple[RangeSet, list[str]]:
    """``ranges`` with each LayerNorm output's amax for ``method`` raised to its observed maximum.

    A transformer's LayerNorm outputs carry a few outlier channels that are systematic, always
    the same channels and the ones the next layers rely on (Bondarenko et al., EMNLP 2021), not
    rare noise: clipping calibrators (entropy, percentile) cut them off. On all-MiniLM-L6-v2 the
    embedding cosine rose from 0.964 to 0.985 with entropy ranges (bench/encoder.py)."""
    return _raised_to_observed(ranges, layernorm_outputs(graph), method)


#: ops that move or reorder values without computing new ones, and monotonic activations: a tensor
#: that reaches a graph output or a decision through these is what the user (or the decision) reads
_PASS_TO_DECISION = frozenset(
    {
        "Reshape", "Transpose", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather",
        "Cast", "Softmax", "LogSoftmax", "Sigmoid", "Resize", "MaxPool",
    }
)  # fmt: skip
#: ops that decide: an argmax or a top-k, a comparison, a box selection
DECISION_OPS = frozenset({"ArgMax", "ArgMin", "TopK", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "NonMaxSuppression"})


def decision_tensors(graph: gs.Graph, outputs: list[gs.Tensor] | None = None) -> set[str]:
    """Tensors whose values reach a graph output or a decision op through value-preserving ops only.
    ``outputs``: the graph outputs that count (for an If branch, those whose If output reaches one)."""
    frontier = list(graph.outputs if outputs is None else outputs)
    frontier += [t for n in graph.nodes if n.op in DECISION_OPS for t in n.inputs if const_values(t) is None]
    found: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in found:
            continue
        found.add(tensor.name)
        for producer in tensor.inputs:
            if producer.op in _PASS_TO_DECISION:
                frontier += [t for t in producer.inputs[: 1 if producer.op != "Concat" else None] if const_values(t) is None]
    return found


def _with_decision_maxima(ranges: RangeSet, graph: gs.Graph, method: str) -> tuple[RangeSet, list[str]]:
    """``ranges`` with each tensor that feeds a decision (see ``decision_tensors``) at its observed
    maximum, on both targets and whatever the method: a clipping method cuts exactly the values a
    decision turns on (a CTC model's blank logit, FP32 15-31, clipped at 14 ties or beats every
    character: 12.5% of its strings stayed right). If branches count too: a branch's output feeds
    a decision where its If's output does."""
    found = decision_tensors(graph)

    def branches(g: gs.Graph, decided: set[str]) -> None:
        for node in (n for n in g.nodes if n.op == "If"):
            for branch in (node.attrs["then_branch"], node.attrs["else_branch"]):
                outs = [b for b, t in zip(branch.outputs, node.outputs, strict=False) if t.name in decided]
                inner = decision_tensors(branch, outs)
                found.update(inner)
                branches(branch, inner)

    branches(graph, found)
    return _raised_to_observed(ranges, found, method)


def _activation_params(ranges: RangeSet, name: str, method: str, target: str) -> tuple[float, int]:
    t = ranges.tensors[name]
    amax = t.amax[method]
    if target == "tensorrt":
        return amax_to_scale(amax), 0
    # uint8 asymmetric: the method's clipping range, intersected with what was observed, containing 0
    return _uint8_params(min(0.0, max(t.min, -amax)), max(0.0, min(t.max, amax)))


def _uint8_params(rmin: float, rmax: float) -> tuple[float, int]:
    """uint8 scale and zero point of [rmin, rmax] (rmin <= 0 <= rmax)."""
    scale = float(np.float32((rmax - rmin) / 255.0))
    if not scale > 0 or not np.isfinite(scale):
        return 1.0, 0
    zero_point = int(np.clip(np.round(-rmin / scale), 0, 255))
    return scale, zero_point


def quantize_model(
    model: ModelInfo | onnx.ModelProto,
    ranges: RangeSet,
    *,
    method: str | None = None,
    plan: PrecisionPlan | None = None,
    target: str = "tensorrt",
    allow_missing: bool = False,
    check_hash: bool = True,
    weight_bits: int | None = None,
    filters: NodeFilter | None = None,
    quantize_attention: bool = False,
    fmt: str = "int8",
) -> tuple[onnx.ModelProto, QuantizeReport]:
    """Return a Q/DQ copy of ``model`` and the report of what was quantized and what was not.

    A short sequence of passes over one ``_Placement``: prepare the graph, derive the ranges the
    rewrites need, decide each node from the target's rules (``quantkit.export.rules``), share
    scales where the runtime wants one, insert the Q/DQ pairs, requantize outputs (onnxruntime),
    export.

    ``weight_bits``: 8, or 7 (weights in [-63, 63]). The default is the target's
    (``default_weight_bits``): 7 for onnxruntime, whose u8 x s8 CPU kernels sum pairs of products
    into int16 on CPUs without VNNI (AVX2), which saturates for 8-bit weights (255 * 127 * 2 >
    32767; on an AVX2 EPYC the demo's INT8 fell from 32 to 13 dB SQNR). 8 for TensorRT.
    """
    weight_bits = _checked_weight_bits(fmt, target, weight_bits)
    method = ranges.method_name(method)
    _check_not_quantized(model.proto if isinstance(model, ModelInfo) else model)
    if check_hash and isinstance(model, ModelInfo):
        ranges.check_model(model.path, model.sha256)
    p = _prepare(model, ranges, method, plan, target, fmt, weight_bits)
    p.filters, p.quantize_attention = filters, quantize_attention
    scopes = _scopes(p)
    for scope in scopes:
        _decide(scope)
    _check_missing(p, allow_missing)
    for scope in scopes:  # outer scopes first: a branch starts from the Q/DQ its enclosing graph has, never a sibling's
        if scope.parent is not None:
            scope.act_dq, scope.weight_dq = dict(scope.parent.act_dq), dict(scope.parent.weight_dq)
        _share_scales(scope)
        _insert_qdq(scope)
        if target == "onnxruntime":
            _requantize_outputs(scope)
            _rewrite_hardsigmoids(scope)
    return _export(p), p.report


def _checked_weight_bits(fmt: str, target: str, weight_bits: int | None) -> int:
    if fmt not in FORMATS:
        raise QuantkitError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", option="format")
    if fmt == "fp8" and target != "tensorrt":
        raise QuantkitError("fp8 is a TensorRT format (Hopper and later GPUs): use target tensorrt", option="format")
    weight_bits = default_weight_bits(target) if weight_bits is None else weight_bits
    if weight_bits not in (7, 8):
        raise QuantkitError(f"weight_bits must be 7 or 8, got {weight_bits!r}", option="weight_bits")
    if target not in TARGETS:
        raise QuantkitError(f"unknown target '{target}'; choose tensorrt or onnxruntime", option="target")
    return weight_bits


@dataclass
class _Placement:
    """What the passes of ``quantize_model`` share: the graph being rewritten and the decisions so far."""

    proto: onnx.ModelProto  # the prepared source (named nodes, opset raised)
    graph: gs.Graph
    ranges: RangeSet
    method: str
    target: str
    fmt: str
    levels: int  # largest weight level (127, or 63 for 7-bit weights)
    report: QuantizeReport
    plan: PrecisionPlan | None
    effective_output: dict[str, str]  # node -> the tensor its int8 kernel would requantize
    rules: Mapping[str, OpRule]
    shape_derived: set[str] = field(default_factory=set)  # computed from constants and shapes: no activation, no range
    filters: NodeFilter | None = None
    quantize_attention: bool = False
    plans: dict[str, NodePlan] = field(default_factory=dict)  # node -> its Q/DQ slots
    range_of: dict[str, str] = field(default_factory=dict)  # tensor -> the tensor whose range it takes
    act_dq: dict[str, gs.Variable] = field(default_factory=dict)
    weight_dq: dict[tuple[str, int], gs.Variable] = field(default_factory=dict)
    scope: str = ""  # suffix of the Q/DQ names written in an If branch (names are unique across all scopes)
    parent: _Placement | None = None  # the enclosing graph's placement, for an If branch
    ran: bool = True  # False for an If branch that the calibration data never took (no range for any of its tensors)

    @property
    def qtype(self) -> np.dtype:
        if self.fmt == "fp8":
            return np.dtype(ml_dtypes.float8_e4m3fn)
        return np.dtype(np.int8) if self.target == "tensorrt" else np.dtype(np.uint8)

    def precision(self, node: str) -> str:
        return self.plan.precision_of(node) if self.plan else "int8"


def _prepare(
    model: ModelInfo | onnx.ModelProto, ranges: RangeSet, method: str, plan: PrecisionPlan | None, target: str, fmt: str, weight_bits: int
) -> _Placement:
    """The graph to rewrite (named, opset raised, BN folded for onnxruntime, constants folded) and the ranges its rewrites need."""
    proto, converted = prepare_model(model, FP8_OPSET if fmt == "fp8" else MIN_OPSET)
    report = QuantizeReport(target=target, method=method, opset_converted_from=converted, weight_bits=weight_bits, format=fmt)
    if plan is not None:  # validate against the model's own node names, before any folding
        plan.resolve([n.name for g in [proto.graph, *if_branches(proto.graph)] for n in g.node])
    # where each op's int8 kernel would requantize (computed before BN folding; the folded Conv
    # takes over the BN output's name, so the tensor names stay valid)
    effective_output = {}
    for g in [proto.graph, *if_branches(proto.graph)]:
        effective = effective_outputs(g, ORT_INT8_OPS)
        effective_output.update({n.name: effective[n.output[0]] for n in g.node if n.output and n.output[0] in effective})
    if target == "onnxruntime":
        proto, report.folded_batchnorms = fold_batchnorm(proto)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto, strict_mode=False))
    # weights computed from constants (a reshaped bias, a transposed MatMul weight) become
    # plain constants, so they are quantized per channel and never mistaken for activations
    graph.fold_constants(error_ok=True).cleanup()
    for g in [graph, *if_branch_graphs(graph)]:  # If branches hold whole networks (a VAD's)
        if target == "onnxruntime":
            ranges = _with_scalar_op_ranges(_with_gate_ranges(ranges, hardswish_as_gate(g)), g)
        ranges, raised = _with_layernorm_maxima(ranges, g, method)
        report.layernorm_maxima += raised
    ranges, report.decision_maxima = _with_decision_maxima(ranges, graph, method)
    levels = (1 << (weight_bits - 1)) - 1
    rules = placement_rules(target, fmt)
    return _Placement(
        proto, graph, ranges, method, target, fmt, levels, report, plan, effective_output, rules,
        set().union(*(shape_derived_tensors(g) for g in [proto.graph, *if_branches(proto.graph)])),
    )  # fmt: skip


def _scopes(p: _Placement) -> list[_Placement]:
    """``p`` and a placement for each If branch below it, outer ones first. Each branch writes its own
    Q/DQ (a branch may read its enclosing graph's, never a sibling's). Loop and Scan bodies are not
    among them: calibration cannot see their tensors (see ``if_branches``)."""
    scopes = [p]
    for scope in scopes:
        for node in scope.graph.nodes:
            if node.op != "If" or node.domain not in (None, "", "ai.onnx"):
                continue
            for branch in (node.attrs.get("then_branch"), node.attrs.get("else_branch")):
                ran = any(t.name in p.ranges.tensors for n in branch.nodes for t in n.outputs)
                child = dataclasses.replace(scope, graph=branch, plans={}, range_of={}, scope=f"__{len(scopes)}", parent=scope, ran=ran)
                scopes.append(child)
    return scopes


def _attention_reason(target: str) -> str:
    if target == "tensorrt":
        return (
            "attention core: kept in high precision, as ModelOpt's placement does (under strong typing its ONNX type, "
            "fp16 by default, decides; --quantize-attention)"
        )
    return "attention core (int8 scores and probabilities cost accuracy, little time; --quantize-attention)"


def _decide(p: _Placement) -> None:
    """Pass 1: each node's Q/DQ slots from its rule, or why it stays float (in ``report.kept_float``)."""
    float_ops: Counter[str] = Counter()
    attention = set() if p.quantize_attention else attention_matmuls(p.graph)
    output_names = {t.name for t in p.graph.outputs}
    for node in p.graph.nodes:
        rule = p.rules.get(node.op)
        node_plan, reason = rule.plan(node) if rule is not None else (None, "")
        if node_plan is None:
            if reason:
                p.report.kept_float[node.name] = reason
            elif node.op != "Constant":
                float_ops[node.op] += 1
            continue
        reason = _refusal(p, node, node_plan, node.name in attention, output_names)
        if reason:
            p.report.kept_float[node.name] = reason
            continue
        p.plans[node.name] = node_plan
    for op, count in float_ops.items():  # summed over the scopes (the graph and its If branches)
        p.report.float_op_counts[op] = p.report.float_op_counts.get(op, 0) + count


def _refusal(p: _Placement, node: gs.Node, node_plan: NodePlan, in_attention: bool, output_names: set[str]) -> str:
    """Why a node that its rule would quantize stays float: the plan, the attention core, a graph
    output's Gemm (onnxruntime), the node filters, a non-float input, a missing range; else ""."""
    if p.precision(node.name) != "int8":
        return f"plan: {p.precision(node.name)}"
    named = p.plan is not None and p.plan.names(node.name)  # the plan wins where it speaks
    if not named and in_attention:
        return _attention_reason(p.target)
    if not named and p.target == "onnxruntime" and node.op == "Gemm" and p.effective_output.get(node.name) in output_names:
        # graph outputs stay float, and without a Q after it onnxruntime runs DQ -> Gemm in float,
        # dequantizing the weights at every run: int8 would only add error and time
        return "Gemm writing a graph output (onnxruntime runs it in float without a Q after it)"
    refusal = p.filters.refusal(node.name, node.op) if p.filters is not None and not named else ""
    if refusal:
        return refusal
    if any(node.inputs[i].dtype not in (None, np.float32) for i in node_plan.activations):
        return "activation is not float32"
    missing = [node.inputs[i].name for i in node_plan.activations if node.inputs[i].name not in p.ranges.tensors]
    if missing and all(m in p.shape_derived for m in missing):
        return f"{node.op} with an operand computed from shapes alone (no activation, no range)"
    if missing and not p.ran:
        return "in an If branch that the calibration data never took (no ranges)"
    if missing and node_plan.constants:  # an x * a or x + b whose x has no range: float, as before it had a plan
        return f"{node.op} with a constant operand, no range for its input"
    if missing:
        p.report.missing_ranges += [m for m in missing if m not in p.report.missing_ranges]
        return "no range for an input"
    return ""


def _check_missing(p: _Placement, allow_missing: bool) -> None:
    missing = p.report.missing_ranges
    if missing and not allow_missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise QuantkitError(
            f"the ranges have no entry for {len(missing)} tensor(s) that the placement needs: {shown}; "
            "recalibrate (with all_tensors if needed) or allow missing ranges to leave those ops in float",
            option="allow_missing",
        )


#: pooling that picks one of its input's values: its output may share its input's scale
MAX_POOLS = ("MaxPool", "GlobalMaxPool")


def _share_scales(p: _Placement) -> None:
    """Tensors that take another tensor's range, so the runtime never requantizes between them.

    TensorRT: the inputs of a Concat whose output is quantized share the output's scale, also
    where an input is quantized for another reader; a max pooling's quantized output shares its
    quantized input's scale. onnxruntime: an op of a ``same_scale`` rule
    (MaxPool, nearest Resize) runs in int8 only when its output has its input's scale (the
    selector drops the pair); neither leaves its input's range, so nothing clips.
    """
    if p.target == "tensorrt":
        quantized = {n.inputs[slot].name for n in p.graph.nodes if n.name in p.plans for slot in p.plans[n.name].activations}
        for node in p.graph.nodes:
            if node.op == "Concat" and node.outputs and node.outputs[0].name in quantized:
                for inp in node.inputs:
                    if inp.name in quantized and inp.name != node.outputs[0].name:
                        p.range_of[inp.name] = node.outputs[0].name
        for node in p.graph.nodes:  # after Concat's: a pooled tensor that a Concat joins keeps the Concat's scale
            if node.op in MAX_POOLS and node.outputs and {node.inputs[0].name, node.outputs[0].name} <= quantized:
                out = node.outputs[0].name
                # max commutes with quantization: one scale on both sides, so TensorRT runs the pooling in
                # int8 with no requantize (as ModelOpt's placement does); its output never leaves the input's range
                p.range_of.setdefault(out, p.range_of.get(node.inputs[0].name, node.inputs[0].name))
        return
    for node in p.graph.nodes:
        rule = p.rules.get(node.op)
        if rule is not None and rule.same_scale and node.name in p.plans and node.outputs:
            out_name = node.outputs[0].name
            if p.effective_output.get(node.name) == out_name:
                p.range_of[out_name] = node.inputs[0].name


def _activation_dq(p: _Placement, tensor: gs.Variable) -> gs.Variable:
    """The dequantized copy of an activation (one Q/DQ pair per tensor, shared by its readers)."""
    if tensor.name in p.act_dq:
        return p.act_dq[tensor.name]
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        return tensor  # an enclosing graph's requantized output, which a branch reads (onnxruntime)
    source = p.range_of.get(tensor.name, tensor.name)
    if p.fmt == "fp8":  # E4M3: amax maps to 448, its largest finite value
        scale, zp = fp8_scale(p.ranges.tensors[source].amax[p.method]), 0
    else:
        scale, zp = _activation_params(p.ranges, source, p.method, p.target)
    p.report.activation_params[tensor.name] = (scale, zp)
    name = tensor.name + p.scope
    s = gs.Constant(f"{name}_scale", np.array(scale, dtype=np.float32))
    z = gs.Constant(f"{name}_zero_point", np.array(zp, dtype=p.qtype))
    q = gs.Variable(f"{name}_quantized", dtype=p.qtype, shape=tensor.shape)
    dq = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=tensor.shape)
    p.graph.nodes.append(gs.Node("QuantizeLinear", f"{name}_QuantizeLinear", inputs=[tensor, s, z], outputs=[q]))
    p.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_DequantizeLinear", inputs=[q, s, z], outputs=[dq]))
    p.act_dq[tensor.name] = dq
    return dq


def _weight_dq(p: _Placement, tensor: gs.Tensor, axis: int) -> gs.Variable:
    """A constant weight as DequantizeLinear of its per-channel int8 (or E4M3) values."""
    key = (tensor.name, axis)
    if key in p.weight_dq:
        return p.weight_dq[key]
    w = np.asarray(const_values(tensor), dtype=np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    if p.fmt == "fp8":
        scales = per_channel_scales(w, axis, 1) / np.float32(FP8_MAX)  # max|w| per channel maps to 448
        q = fp8_values(w / scales.reshape(shape))
    else:
        scales = per_channel_scales(w, axis, p.levels)
        q = np.clip(np.round(w / scales.reshape(shape)), -p.levels, p.levels).astype(np.int8)
    p.report.weight_scales[tensor.name] = scales
    name = tensor.name + p.scope
    qc = gs.Constant(f"{name}_quantized", q)
    s = gs.Constant(f"{name}_scale", scales)
    z = gs.Constant(f"{name}_zero_point", np.zeros(scales.shape, dtype=p.qtype if p.fmt == "fp8" else np.int8))
    dq = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(w.shape))
    p.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_DequantizeLinear", inputs=[qc, s, z], outputs=[dq], attrs={"axis": axis}))
    p.weight_dq[key] = dq
    return dq


def _insert_qdq(p: _Placement) -> None:
    """Pass 2: Q/DQ pairs on the planned activation slots, int8 weights, exact uint8 scalars."""
    for node in list(p.graph.nodes):
        node_plan = p.plans.get(node.name)
        if node_plan is None:
            continue
        for slot in node_plan.activations:
            node.inputs[slot] = _activation_dq(p, node.inputs[slot])
        for slot, axis in node_plan.weights:
            node.inputs[slot] = _weight_dq(p, node.inputs[slot], axis)
        for slot in node_plan.constants:
            node.inputs[slot] = _uint8_scalar(p.graph, node.inputs[slot])
        p.report.int8_nodes.append(node.name)


def _output_readers(p: _Placement, node: gs.Node, tensors: dict[str, gs.Tensor], int8: set[str]) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """The effective output of an int8 node that needs a Q (onnxruntime), and the readers that take it."""
    name = p.effective_output.get(node.name)
    if name is None or name not in tensors or tensors[name] in p.graph.outputs:
        return None
    if name not in p.ranges.tensors:
        p.report.kept_float.setdefault(f"{node.name} (output)", "no range for the output")
        return None
    tensor = tensors[name]
    readers = [c for c in tensor.outputs if c.op != "QuantizeLinear" and p.precision(c.name) == "int8"]
    if not readers or (node.op == "Concat" and any(c.name not in int8 for c in readers)):
        return None
    batched = node.op == "MatMul" and node.inputs[0].shape is not None and len(node.inputs[0].shape) >= 3
    if batched and not any(c.name in int8 for c in readers):
        # without a Q after it, onnxruntime runs DQ -> MatMul as MatMulIntegerToFloat:
        # quantizing an output that only float ops read adds error and saves nothing (a
        # transformer's projections, read by bias Adds and Reshapes). A Gemm needs its Q, and
        # so does a 2-D MatMul, which onnxruntime first fuses with its bias Add into a Gemm:
        # DQ -> Gemm -> Q becomes QGemm, DQ -> Gemm stays float (PP-OCR's classifier head)
        return None
    return tensor, readers


def _requantize_outputs(p: _Placement) -> None:
    """onnxruntime runs an op as an integer kernel only when a QuantizeLinear reads its output:
    quantize each ``output_q`` op's effective output, for every consumer (except plan-excluded
    ones). Graph outputs stay float (users read them; a detector's concatenated boxes and scores
    would share one scale), and so does a Concat read by any float op, for the same reason."""
    tensors = p.graph.tensors()
    int8 = set(p.report.int8_nodes)
    for node in [n for n in p.graph.nodes if n.name in int8 and p.rules[n.op].output_q]:
        found = _output_readers(p, node, tensors, int8)
        if found is None:
            continue
        tensor, readers = found
        dq = _activation_dq(p, tensor)
        for reader in readers:
            for slot, inp in enumerate(reader.inputs):
                if inp is tensor:
                    reader.inputs[slot] = dq


def _rewrite_hardsigmoids(p: _Placement) -> None:
    rewritten = _hardsigmoids_as_add(p.graph)
    p.report.hardsigmoids_as_add += rewritten
    counts = p.report.float_op_counts
    left = counts.get("HardSigmoid", 0) - len(rewritten)
    p.report.float_op_counts = {op: n for op, n in {**counts, "HardSigmoid": left}.items() if n > 0}


def _export(p: _Placement) -> onnx.ModelProto:
    p.graph.cleanup().toposort()
    out = gs.export_onnx(p.graph)
    out.ir_version = p.proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(p.proto.opset_import)
    record_quantization(out, p.proto, {"format": p.fmt, "target": p.target, "method": p.method})
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - would be a quantkit bug
        raise QuantkitError(f"internal error: the quantized model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return out


def _uint8_scalar(graph: gs.Graph, tensor: gs.Tensor) -> gs.Variable:
    """A scalar constant as DequantizeLinear of a uint8 constant, added to ``graph``: exact, since
    the value maps to 0 or 255 (as onnxruntime's own quantizer writes it)."""
    c = float(np.asarray(const_values(tensor)).reshape(()))
    scale, zp = _uint8_params(min(0.0, c), max(0.0, c))
    q = np.array(np.clip(np.round(c / scale) + zp, 0, 255), dtype=np.uint8)
    qc = gs.Constant(f"{tensor.name}_{len(graph.nodes)}_quantized", q)
    s, z = gs.Constant(f"{qc.name}_scale", np.array(scale, np.float32)), gs.Constant(f"{qc.name}_zero_point", np.array(zp, np.uint8))
    dq = gs.Variable(f"{qc.name}_dequantized", dtype=np.float32, shape=[])
    graph.nodes.append(gs.Node("DequantizeLinear", f"{qc.name}_DequantizeLinear", inputs=[qc, s, z], outputs=[dq]))
    return dq


def _scalar_param(tensor: gs.Tensor) -> float | None:
    v = const_values(tensor)
    return float(v.reshape(())) if v is not None and v.size == 1 else None


def _hardsigmoids_as_add(graph: gs.Graph) -> list[str]:
    """Rewrite ``DQ(x) -> HardSigmoid -> Q`` as ``DQ'(x) + beta -> Q``, which onnxruntime fuses
    into one QLinearAdd (it has no int8 HardSigmoid; the float one costs a DQ, a float pass and a
    Q per gate: a hard-swish net's largest float cost).

    Exact, not an approximation: ``DQ'`` reads the same uint8 ``x`` with ``alpha`` folded into its
    scale, so it yields ``alpha * x``; the clip to [0, 1] is the output Q's own saturation, which
    holds when its zero point is 0 (nothing below 0) and ``round(1 / scale) >= 255`` (nothing above
    1 that the clip would not also send to 255). Any other gate keeps its float HardSigmoid.
    """
    rewritten = []
    for node in [n for n in graph.nodes if n.op == "HardSigmoid"]:
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        x, y = node.inputs[0], node.outputs[0]
        while len(x.inputs) == 1 and x.inputs[0].op == "Identity" and x.inputs[0].inputs:  # no-ops (PaddlePaddle's)
            x = x.inputs[0].inputs[0]
        dq = x.inputs[0] if len(x.inputs) == 1 else None
        if not (alpha > 0 and math.isfinite(alpha) and math.isfinite(beta)) or dq is None or dq.op != "DequantizeLinear":
            continue
        if "axis" in dq.attrs or len(dq.inputs) < 3 or (s := _scalar_param(dq.inputs[1])) is None:
            continue
        readers = list(y.outputs)
        if y in graph.outputs or not readers or any(r.op != "QuantizeLinear" or len(r.inputs) < 3 for r in readers):
            continue
        params = [(_scalar_param(r.inputs[1]), _scalar_param(r.inputs[2])) for r in readers]
        if any(rs is None or not rs > 0 or rz != 0 or round(1.0 / rs) < 255 for rs, rz in params):
            continue
        scaled = gs.Variable(f"{node.name}_alpha_x", dtype=np.float32, shape=x.shape)
        scale = gs.Constant(f"{node.name}_alpha_x_scale", np.array(s * alpha, dtype=np.float32))
        inputs = [dq.inputs[0], scale, dq.inputs[2]]
        graph.nodes.append(gs.Node("DequantizeLinear", f"{node.name}_alpha_x_DequantizeLinear", inputs=inputs, outputs=[scaled]))
        offset = _uint8_scalar(graph, gs.Constant(f"{node.name}_beta", np.array(beta, dtype=np.float32)))
        graph.nodes.append(gs.Node("Add", node.name, inputs=[scaled, offset], outputs=[y]))  # a plan naming it still speaks
        node.inputs.clear()
        node.outputs.clear()
        rewritten.append(node.name)
    return rewritten


def record_quantization(out: onnx.ModelProto, source: onnx.ModelProto, facts: dict[str, str]) -> None:
    """Keep ``source``'s metadata on ``out`` and record how it was quantized (``quantkit.<key>``
    entries: a deployment script or ``quantkit build`` can tell an fp8 model from an int8 one)."""
    props = {p.key: p.value for p in source.metadata_props}
    props.update({f"quantkit.{k}": str(v) for k, v in facts.items()})
    onnx.helper.set_model_props(out, dict(sorted(props.items())))


def ranges_from_qdq(model: onnx.ModelProto) -> RangeSet:
    """Activation scales of a TensorRT-style Q/DQ model (per-tensor int8, zero point 0), as a RangeSet.

    Keyed by the tensor each QuantizeLinear reads, so a TensorRT 10 cache can be written back
    from an explicitly quantized model.
    """
    consts = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    scales: dict[str, float | None] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2:
            continue
        scale = consts.get(node.input[1])
        zero = consts.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale is None or scale.size != 1 or zero is None or zero.size != 1 or int(zero.reshape(())) != 0 or zero.dtype != np.int8:
            continue  # per-channel, asymmetric or non-constant: not expressible in a TensorRT cache
        scales[node.input[0]] = float(scale.reshape(()))
    return ranges_from_scales(scales, "qdq", {}, {"path": "", "sha256": ""})


def default_weight_bits(target: str) -> int:
    """7 for onnxruntime (no int16 saturation on CPUs without VNNI), 8 for TensorRT."""
    return 7 if target == "onnxruntime" else 8


def fp8_scale(amax: float) -> float:
    """The per-tensor E4M3 scale TensorRT and ModelOpt use: amax / 448 (a float32, never 0)."""
    scale = float(np.float32(amax / FP8_MAX))
    return scale if math.isfinite(scale) and scale >= float(np.finfo(np.float32).tiny) else 1.0


def fp8_values(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 (round to nearest even), saturated at +-448 as QuantizeLinear does."""
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def per_channel_scales(w: np.ndarray, axis: int, levels: int = 127) -> np.ndarray:
    """Symmetric scale per channel along ``axis``: max|w| / levels (1.0 for an all-zero channel)."""
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w.astype(np.float64)).max(axis=reduce_axes) if reduce_axes else np.abs(w.astype(np.float64))
    return np.array([amax_to_scale(float(a) * 127 / levels) for a in np.atleast_1d(amax)], dtype=np.float32)
