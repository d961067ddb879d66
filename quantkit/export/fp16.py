"""FP16 conversion: weights and compute in float16, graph inputs/outputs kept float32 by casts.

The result is strongly typed in TensorRT 11's sense: every op's float inputs agree in type, and
precision changes only at explicit Cast nodes. Nodes stay in FP32, with the reason recorded,
when any of these holds:
- ``precisions`` (from a plan, see ``fp16_precisions``) says fp32;
- the op type is in ``DEFAULT_KEEP_FP32`` (reductions that overflow float16, index and random
  ops, Q/DQ) or in ``keep_op_types`` (e.g. Softmax, LayerNormalization on request);
- calibrated ranges show an input or output beyond ``FP16_SAFE_MAX`` (8192, 1/8 of float16's
  65504: room for the sums and products the node computes itself), or mask sentinels;
- a constant it reads (an initializer, or a ``Constant`` node's value: a BatchNormalization
  variance of 9.8e7 in a real detector became inf and zeroed its output) exceeds
  ``FP16_SAFE_MAX``, or its non-zero values would flush to zero in float16 (any of a small
  constant such as an epsilon or a scale; more than 1% of a large one).

A float tensor without a range is recorded in ``Fp16Report.unranged``: the CLI refuses such a
conversion unless the missing ranges are collected (``--data``) or the user opts out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.errors import QuantkitError
from quantkit.model import if_branches, node_subgraphs, outer_scope_reads, rename_outer_reads, shape_derived_tensors
from quantkit.optypes import FLOAT32_ONLY_INPUTS, FP16_KEEP_FP32_OPS, QDQ_OPS
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet

#: activations and constants beyond this stay float32 (ModelOpt's AutoCast uses 512 for activations)
FP16_SAFE_MAX = 8192.0
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24: smaller non-zero values flush to zero
#: constants with at most this many elements are parameters (an epsilon, a scale): no value of them may flush
SMALL_CONSTANT = 16
DEFAULT_KEEP_FP32 = FP16_KEEP_FP32_OPS
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}


@dataclass
class Fp16Report:
    fp16_nodes: list[str] = field(default_factory=list)
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node -> reason
    casts_inserted: int = 0
    initializers_converted: int = 0
    unranged: list[str] = field(default_factory=list)  # float activations of fp16 nodes without a range (ranges given)
    qdq_fp16: int = 0  # Q/DQ nodes given float16 scales (their DequantizeLinear feeds float16 ops directly)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.fp16_nodes)} node(s) in float16, {len(self.kept_fp32)} kept in float32, {self.casts_inserted} Cast(s) inserted"
        ]
        if self.kept_fp32:
            reasons = Counter(self.kept_fp32.values())
            lines.append("kept in float32: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
        if self.qdq_fp16:
            lines.append(f"{self.qdq_fp16} Q/DQ node(s) with float16 scales: no Cast between a DequantizeLinear and its op")
        lines += self.notes
        return "\n".join(lines)


def _exceeds_fp16(ranges: RangeSet, name: str) -> bool:
    t = ranges.tensors.get(name)
    # mask sentinels (-3.4e38) were kept out of min/max but still flow through the tensor
    return t is not None and (max(abs(t.min), abs(t.max)) > FP16_SAFE_MAX or t.sentinels > 0 or t.nonfinite > 0)


def constant_problem(values: np.ndarray) -> str:
    """Why a float constant cannot become float16 ("" when it can)."""
    if values.size == 0 or values.dtype.kind != "f":
        return ""
    a = np.abs(values.astype(np.float64))
    finite = a[np.isfinite(a)]
    if finite.size and finite.max() > FP16_SAFE_MAX:
        return f"constant exceeds float16's safe range ({finite.max():.3g} > {FP16_SAFE_MAX:g})"
    nonzero = finite[finite > 0]
    flushed = int(np.count_nonzero(nonzero < FP16_TINY / 2))
    if flushed and (values.size <= SMALL_CONSTANT or flushed > 0.01 * nonzero.size):
        return f"constant values flush to zero in float16 ({flushed} below {FP16_TINY:.2g})"
    return ""


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Float initializers and Constant-node values, by tensor name."""
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_float", "value_floats"):
                    out[node.output[0]] = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
    return out


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    for g in [inferred.graph, *if_branches(inferred.graph)]:
        types.update({init.name: init.data_type for init in g.initializer})
        for vi in [*g.input, *g.value_info, *g.output]:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types


def fp16_precisions(plan: PrecisionPlan | None, names: list[str], quantized: set[str] | None = None) -> dict[str, str]:
    """Node -> fp16/fp32 for the FP16 pass, from a precision plan.

    ``fp32`` stays fp32 and ``fp16`` converts. For ``int8`` nodes there are two cases:
    - after quantization (``quantized`` given): a quantized node keeps float32 around its Q/DQ;
      one that could not be quantized goes to the plan's fallback;
    - in a plain FP16 conversion (``quantized`` None): they become fp16, the lowest precision
      available without Q/DQ.
    """
    if plan is None:
        resolved = dict.fromkeys(names, "int8")
    elif quantized is None:
        resolved = plan.resolve(names)
    else:  # after quantize_model, which validated the plan against the original model
        resolved = {n: plan.precision_of(n) for n in names}
    out = {}
    for name in names:
        p = resolved[name]
        if p == "int8":
            if quantized is None:
                p = "fp16"
            elif name in quantized:
                p = "fp32"
            else:
                p = plan.fallback if plan is not None else "fp32"
        out[name] = p
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


#: float16's smallest normal number: a scale below it loses relative precision (a depthwise Conv's
#: quiet channel at 1e-6 would be off by 6%)
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


def _subnormal_in_fp16(scale: np.ndarray | None) -> bool:
    if scale is None:
        return False
    values = np.abs(np.asarray(scale, np.float64))
    return bool(np.any((values > 0) & (values < FP16_MIN_NORMAL)))


def _qdq_follow_consumers(graph: onnx.GraphProto, fp16: set[str], c: _Conversion) -> int:
    """Q/DQ pairs whose DequantizeLinear feeds only float16 nodes take float16 scales (opset 19), so
    no Cast sits between a DequantizeLinear and its op: TensorRT's Q/DQ fusion sees the pattern, as
    ModelOpt writes it. Returns how many Q/DQ nodes went to float16."""
    report = c.report
    readers = {name: [node for node, _ in users] for name, users in _readers(graph, c.branched).items()}  # a body's reads count
    by_output = {o: n for n in graph.node for o in n.output}
    scales = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    moved, tiny = 0, []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = readers.get(dq.output[0], [])
        if not users or not all(u.name in fp16 for u in users):
            continue
        if _subnormal_in_fp16(scales.get(dq.input[1])):
            tiny.append(dq.name)
            continue
        q = by_output.get(dq.input[0])
        pair = [dq] + ([q] if q is not None and q.op_type == "QuantizeLinear" else [])
        others = [u for u in readers.get(dq.input[1], []) if u.op_type in QDQ_OPS and u not in pair]
        if any(u.name not in fp16 for u in others):
            continue  # the scale is shared with a Q/DQ that stays float32
        for node in pair:
            if node.name not in fp16:
                fp16.add(node.name)
                report.kept_fp32.pop(node.name, None)
                moved += 1
    if tiny:
        report.notes.append(
            f"{len(tiny)} DequantizeLinear node(s) keep float32 scales, below float16's normal range "
            f"({FP16_MIN_NORMAL:.1e}; e.g. {tiny[0]}): a Cast feeds their op"
        )
    return moved


def convert_fp16(
    model: onnx.ModelProto,
    *,
    precisions: dict[str, str] | None = None,
    ranges: RangeSet | None = None,
    keep_op_types: set[str] | frozenset[str] = frozenset(),
    float16_scales: bool = True,
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Return a float16 copy of ``model`` (FP32 where needed, see the module doc) and its report.

    ``float16_scales``: Q/DQ pairs read only by float16 ops take float16 scales, as TensorRT wants
    them (off for onnxruntime's placement: its integer kernels take float32 scales only, and a
    QLinearConcat fused from float16 ones does not load)."""
    src, notes = _float16_source(model) if float16_scales else (_copy(model), [])
    graph = src.graph
    for i, node in enumerate(graph.node):  # plans and reports key on node names
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    if any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer):
        raise QuantkitError("the model already holds float16 weights; convert its FP32 original instead")
    types = _tensor_types(src)
    conversion = _Conversion(
        types, {name: TensorProto.FLOAT for name, t in types.items() if t == TensorProto.FLOAT},  # tensor -> its new float type
        Fp16Report(notes=notes), precisions or {}, ranges, DEFAULT_KEEP_FP32 | set(keep_op_types),
    )  # fmt: skip
    _convert_graph(graph, conversion, qdq_fp16=float16_scales and _opset(src) >= 19)
    report = conversion.report
    _cast_outputs_back(graph, conversion.dtype_of, report)
    # value_info is stale after retyping: drop it and let shape inference recompute it
    for g in [graph, *if_branches(graph)]:
        del g.value_info[:]
    try:
        out_model = onnx.shape_inference.infer_shapes(src, strict_mode=True)
        onnx.checker.check_model(out_model)
    except Exception as exc:  # noqa: BLE001 - inference and checker raise several types
        raise QuantkitError(f"internal error: the float16 model is not type-consistent: {str(exc).splitlines()[0]}") from None
    return out_model, report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _float16_source(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model``, at opset 19 where it holds Q/DQ (float16 scales need it) and can be converted."""
    src = _copy(model)
    graphs = [src.graph, *if_branches(src.graph)]
    if _opset(src) >= 19 or not any(n.op_type == "DequantizeLinear" for g in graphs for n in g.node):
        return src, []
    try:
        converted = onnx.version_converter.convert_version(src, 19)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; Casts after DQ then stay
        return src, [f"kept opset {_opset(model)} ({str(exc).splitlines()[0][:80]}): DequantizeLinear outputs are Cast to float16"]
    return converted, [f"converted from opset {_opset(model)} to 19 for float16 Q/DQ scales"]


def _keep_reason(
    node: onnx.NodeProto, precisions: dict[str, str], ranges: RangeSet | None, keep: set[str], bad_constants: dict[str, str]
) -> str:
    """Why ``node`` stays float32 ("" when it may run in float16)."""
    if precisions.get(node.name) == "fp32":
        return "plan: fp32"
    if node.op_type in keep:
        overflow = node.op_type.startswith("Reduce") or node.op_type == "CumSum"
        return f"{node.op_type} kept in float32" + (" (may overflow float16)" if overflow else "")
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}.{node.op_type}"
    if node_subgraphs(node) and not _branches_convert(node):
        return f"control flow ({node.op_type}): its body stays float32 (run many times; no ranges reach it)"
    if ranges is not None and any(_exceeds_fp16(ranges, t) for t in [*node.input, *node.output]):
        return f"range exceeds float16's safe range ({FP16_SAFE_MAX:g})"
    if node.op_type == "Constant" and node.output and node.output[0] in bad_constants:
        return bad_constants[node.output[0]]
    return next((bad_constants[name] for name in node.input if name in bad_constants), "")


def _branches_convert(node: onnx.NodeProto) -> bool:
    """An If's branches are converted like any graph (calibration sees their tensors); Loop and Scan bodies are not."""
    return node.op_type == "If" and node.domain in ("", "ai.onnx")


@dataclass
class _Conversion:
    """What the passes over a graph and its If branches share (tensor names are unique across scopes)."""

    types: dict[str, int]
    dtype_of: dict[str, int]  # float tensor -> its type after conversion
    report: Fp16Report
    precisions: dict[str, str]
    ranges: RangeSet | None
    keep: set[str]
    bad_constants: dict[str, str] = field(default_factory=dict)  # of this graph and the enclosing ones
    derived: set[str] = field(default_factory=set)
    branched: set[str] = field(default_factory=set)  # If nodes whose branches are converted in place


def _convert_graph(graph: onnx.GraphProto, c: _Conversion, *, qdq_fp16: bool = False, scope: str = "") -> None:
    """Decide, retype and cast ``graph``, then each If branch in it (``scope`` names the Casts a branch
    adds). A branch's outputs go back to float32, so each If keeps its interface."""
    fp16 = _decide_fp16(graph, c, ran=not scope or c.ranges is None or _ran(graph, c.ranges))
    if qdq_fp16:
        c.report.qdq_fp16 += _qdq_follow_consumers(graph, fp16, c)
    _convert_initializers(graph, fp16, c)
    _retype_nodes(graph, fp16, c.dtype_of, c.report)
    _insert_casts(graph, fp16, c, scope)
    for node in [n for n in graph.node if n.name in c.branched]:
        for k, branch in enumerate(node_subgraphs(node)):
            inner = f"{scope}_{node.name}_{k}"
            for i, sub in enumerate(branch.node):
                sub.name = sub.name or f"{sub.op_type}{inner}_{i}"
            _convert_graph(branch, c, qdq_fp16=qdq_fp16, scope=inner)
            _cast_branch_outputs(branch, c, inner)


def _ran(branch: onnx.GraphProto, ranges: RangeSet) -> bool:
    return any(o in ranges.tensors for n in branch.node for o in n.output)


def _decide_fp16(graph: onnx.GraphProto, c: _Conversion, ran: bool = True) -> set[str]:
    """The nodes that run in float16; the others' reasons go to ``report.kept_fp32``. ``ran``: False for
    an If branch that the data never took, which stays float32 (no range says what it computes)."""
    constants = constant_values(graph)
    c.bad_constants.update({name: why for name, values in constants.items() if (why := constant_problem(values))})
    c.derived |= shape_derived_tensors(graph)  # from constants and shapes alone (a reshaped weight): parameters, not activations
    fp16: set[str] = set()
    for node in graph.node:
        reason = _keep_reason(node, c.precisions, c.ranges, c.keep, c.bad_constants)
        if not reason and not ran:
            reason = "in an If branch that the data never took (no ranges)"
        if not reason and c.ranges is not None and node.op_type != "Constant":
            for name in [*node.input, *node.output]:
                if name and name not in c.derived and c.types.get(name, 0) == TensorProto.FLOAT and name not in c.ranges.tensors:
                    if name not in c.report.unranged:
                        c.report.unranged.append(name)
        if reason:
            c.report.kept_fp32[node.name] = reason
        elif _branches_convert(node):
            c.branched.add(node.name)  # neither float16 nor float32 itself: its branches decide, node by node
        elif any(c.types.get(t, 0) in _FLOAT_TYPES for t in [*node.input, *node.output]) or node.op_type == "Constant":
            fp16.add(node.name)
    return fp16


#: the slot of a tensor a control-flow node's subgraph reads from the enclosing scope
OUTER_READ = -1


def _reads(node: onnx.NodeProto, branched: set[str]) -> list[tuple[int, str]]:
    """(slot, tensor) for each tensor ``node`` reads, the outer-scope reads of a body kept float32 included
    (a converted branch casts what it reads itself)."""
    outer = [] if node.name in branched else outer_scope_reads(node)
    return [*enumerate(node.input), *((OUTER_READ, name) for name in outer)]


def _readers(graph: onnx.GraphProto, branched: set[str]) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in _reads(node, branched):
            readers.setdefault(name, []).append((node, slot))
    return readers


def _wants_fp16(node: onnx.NodeProto, slot: int, fp16: set[str]) -> bool:
    return node.name in fp16 and slot != OUTER_READ and slot not in FLOAT32_ONLY_INPUTS.get(node.op_type, ())


def _convert_initializers(graph: onnx.GraphProto, fp16: set[str], c: _Conversion) -> None:
    """Initializers read only by fp16 nodes become float16; shared ones are cast where needed."""
    readers = _readers(graph, c.branched)
    dtype_of, report = c.dtype_of, c.report
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        users = readers.get(init.name, [])
        if users and all(_wants_fp16(n, slot, fp16) for n, slot in users):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
            dtype_of[init.name] = TensorProto.FLOAT16
            report.initializers_converted += 1


def _retype_attributes(node: onnx.NodeProto) -> None:
    """A float16 node's own float32 values: Constant and ConstantOfShape values, a Cast's target."""
    for attr in node.attribute:
        if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16


def _retype_nodes(graph: onnx.GraphProto, fp16: set[str], dtype_of: dict[str, int], report: Fp16Report) -> None:
    """The outputs of fp16 nodes become float16."""
    for node in graph.node:
        if node.name not in fp16:
            continue
        _retype_attributes(node)
        for out in node.output:
            if dtype_of.get(out) == TensorProto.FLOAT or (node.op_type in ("Constant", "Cast", "ConstantOfShape") and out in dtype_of):
                dtype_of[out] = TensorProto.FLOAT16
        report.fp16_nodes.append(node.name)


def _insert_casts(graph: onnx.GraphProto, fp16: set[str], c: _Conversion, scope: str = "") -> None:
    """A Cast wherever a node reads a float tensor of the other type: one per (tensor, type), before its first reader.
    A subgraph's read of a float16 tensor from the enclosing scope is pointed at its float32 Cast."""
    casts: dict[tuple[str, int], str] = {}
    body: list[onnx.NodeProto] = []
    dtype_of, report = c.dtype_of, c.report
    for node in graph.node:
        outer: dict[str, str] = {}
        for slot, name in _reads(node, c.branched):
            have = dtype_of.get(name)
            if have is None or (node.op_type == "Cast" and node.name in fp16):
                continue  # not a float tensor, or a Cast (which accepts any input type)
            want = TensorProto.FLOAT16 if _wants_fp16(node, slot, fp16) else TensorProto.FLOAT
            if have == want:
                continue
            if (name, want) not in casts:
                suffix = ("fp16" if want == TensorProto.FLOAT16 else "fp32") + scope
                casts[(name, want)] = f"{name}_cast_{suffix}"
                body.append(helper.make_node("Cast", [name], [casts[(name, want)]], name=f"{name}_Cast_{suffix}", to=want))
                report.casts_inserted += 1
            if slot == OUTER_READ:
                outer[name] = casts[(name, want)]
            else:
                node.input[slot] = casts[(name, want)]
        rename_outer_reads(node, outer)
        body.append(node)
    del graph.node[:]
    graph.node.extend(body)


def _cast_branch_outputs(branch: onnx.GraphProto, c: _Conversion, scope: str) -> None:
    """A converted branch returns float32 where its If did: a Cast before each float16 output."""
    for out in branch.output:
        if c.dtype_of.get(out.name) == TensorProto.FLOAT16:
            cast = f"{out.name}_fp32{scope}"
            branch.node.append(helper.make_node("Cast", [out.name], [cast], name=f"{out.name}_Cast_fp32{scope}", to=TensorProto.FLOAT))
            out.name = cast
            out.type.tensor_type.elem_type = TensorProto.FLOAT
            c.report.casts_inserted += 1


def _cast_outputs_back(graph: onnx.GraphProto, dtype_of: dict[str, int], report: Fp16Report) -> None:
    """Graph inputs stay float32 (the casts above read them); float16 outputs are cast back to float32."""
    for out in graph.output:
        if dtype_of.get(out.name) == TensorProto.FLOAT16:
            internal = f"{out.name}_fp16"
            for node in graph.node:
                node.output[:] = [internal if o == out.name else o for o in node.output]
                node.input[:] = [internal if i == out.name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [internal], [out.name], name=f"{out.name}_Cast_fp32", to=TensorProto.FLOAT))
            report.casts_inserted += 1
