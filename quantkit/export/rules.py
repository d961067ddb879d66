"""Q/DQ placement rules as data: for each target and format, what each op type gets and why.

As onnxruntime.quantization keeps a registry of per-op quantizers, each placement here is a table
``op type -> OpRule``. A rule's ``plan`` says which input slots get Q/DQ (activations per tensor,
weights per channel, scalar constants as exact uint8) or why the op stays float; ``output_q``
says whether the op's output is quantized where an int8 op reads it (onnxruntime runs an op as an
integer kernel only when a QuantizeLinear reads its output); ``same_scale`` says whether that
output takes its input's scale (onnxruntime drops the pair around such ops instead of having a
QLinear kernel). An op type absent from a table has no int8 placement and stays float.

``placement_rules(target, fmt)`` returns the table that ``quantize_model`` follows; ``describe``
prints it (what a user reads to know what a target quantizes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx_graphsurgeon as gs

from quantkit.optypes import EPILOGUE_OPS, ORT_INT8_OPS, ORT_SAME_SCALE_OPS, WEIGHTED_OPS

TARGETS = ("tensorrt", "onnxruntime")
FORMATS = ("int8", "fp8")


@dataclass
class NodePlan:
    """Which input slots of one node get Q/DQ."""

    activations: list[int] = field(default_factory=list)  # input slots that get activation Q/DQ
    weights: list[tuple[int, int]] = field(default_factory=list)  # (input slot, per-channel axis)
    constants: list[int] = field(default_factory=list)  # scalar constant slots, quantized per tensor (onnxruntime)


#: a rule's planner: the node's plan, or None and why it stays float ("" for no reason worth a report line)
Planner = Callable[[gs.Node], tuple[NodePlan | None, str]]


@dataclass(frozen=True)
class OpRule:
    plan: Planner
    why: str  # what the rule does and why, for ``describe`` and the docs
    output_q: bool = False  # quantize the output where an int8 op reads it (onnxruntime's requantize)
    same_scale: bool = False  # that output takes its input's scale (the pair is dropped around the op)


def const_values(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's values (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    return None


def _static_dim(tensor: gs.Tensor, index: int) -> int | None:
    shape = tensor.shape
    if shape is None or len(shape) < abs(index):
        return None
    d = shape[index]
    return d if isinstance(d, int) else None


# ---- planners of the weighted ops (both targets) ---------------------------------------------


def plan_conv(node: gs.Node) -> tuple[NodePlan | None, str]:
    """Conv/ConvTranspose: the input per tensor, the weight per output channel (axis 1 for ConvTranspose)."""
    inputs = node.inputs
    if const_values(inputs[0]) is not None:
        return None, "constant input"
    if len(inputs) < 2 or const_values(inputs[1]) is None:
        return None, "weight is not a constant"
    return NodePlan(activations=[0], weights=[(1, 1 if node.op == "ConvTranspose" else 0)]), ""


def plan_gemm(node: gs.Node) -> tuple[NodePlan | None, str]:
    """Gemm: A per tensor; a constant B per output channel, an activation B per tensor."""
    inputs = node.inputs
    if const_values(inputs[0]) is not None:
        return None, "constant input"
    p = NodePlan(activations=[0])
    if const_values(inputs[1]) is not None:
        p.weights.append((1, 0 if node.attrs.get("transB", 0) else 1))
    else:
        p.activations.append(1)
    return p, ""


def plan_matmul(node: gs.Node) -> tuple[NodePlan | None, str]:
    """MatMul: as Gemm, but a GEMV shape (M or N = 1) stays float (no int8 kernel pays there)."""
    inputs = node.inputs
    a_const, b_const = const_values(inputs[0]), const_values(inputs[1])
    if a_const is not None:
        return None, "constant first input"
    m, n = _static_dim(inputs[0], -2), (b_const.shape[-1] if b_const is not None and b_const.ndim >= 1 else _static_dim(inputs[1], -1))
    if m == 1 or n == 1:
        return None, "GEMV-shaped MatMul (M or N = 1)"
    p = NodePlan(activations=[0])
    if b_const is None:
        p.activations.append(1)
    elif b_const.ndim < 2:
        return None, "1-d weight"
    else:
        p.weights.append((1, b_const.ndim - 1))
    return p, ""


def keep_float(reason: str) -> Planner:
    """A planner that leaves the op in float, for ``reason``."""
    return lambda node: (None, reason)


# ---- TensorRT's residual Add -------------------------------------------------------------------

#: ops whose int8 kernels take a residual Add into their epilogue in TensorRT (Conv + Add [+ ReLU]).
#: A transformer's MatMul/Gemm + residual Add is fused by Myelin, which keeps the residual stream in
#: float: quantizing that Add's input only adds error (all-MiniLM-L6-v2, mse ranges: embedding cosine 0.980
#: with it, 0.985 without, bench/encoder.py)
RESIDUAL_FUSING_OPS = frozenset({"Conv", "ConvTranspose"})


def _weighted_branch(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` comes straight from a conv (through BN / a constant bias add), i.e.
    TensorRT can fuse the consuming Add into that conv's epilogue."""
    while len(tensor.inputs) == 1 and len(tensor.outputs) == 1:
        producer = tensor.inputs[0]
        if producer.op in RESIDUAL_FUSING_OPS:
            return True
        if producer.op in WEIGHTED_OPS:
            return False
        if producer.op in EPILOGUE_OPS or (producer.op == "Add" and any(const_values(t) is not None for t in producer.inputs)):
            tensor = next(t for t in producer.inputs if const_values(t) is None)
            continue
        return False
    return False


def _distances_back(tensor: gs.Tensor, limit: int = 256) -> dict[int, int]:
    """Activations above ``tensor`` (by id, itself included) -> the fewest nodes between them and it."""
    dist = {id(tensor): 0}
    frontier, step = [tensor], 0
    while frontier and step < limit:
        step += 1
        nxt = []
        for t in frontier:
            for producer in t.inputs:
                for i in producer.inputs:
                    if const_values(i) is None and id(i) not in dist:
                        dist[id(i)] = step
                        nxt.append(i)
        frontier = nxt
    return dist


def _shortcut_slot(add: gs.Node) -> int:
    """Of an Add whose two inputs both come from convs, the shortcut's slot: the branch with fewer
    nodes back to where the two branches fork (a projection conv, against the main path's stack)."""
    a, b = (_distances_back(t) for t in add.inputs[:2])
    common = set(a) & set(b)
    if not common:
        return 1
    fork = min(common, key=lambda n: (a[n] + b[n], a[n]))
    if a[fork] == b[fork]:
        return 1
    return 0 if a[fork] < b[fork] else 1


def plan_residual_add(node: gs.Node) -> tuple[NodePlan | None, str]:
    """The input of a skip-connection Add that the conv's epilogue does not take: TensorRT fuses Conv+Add."""
    if len(node.inputs) != 2 or any(const_values(t) is not None for t in node.inputs):
        return None, ""
    a, b = (_weighted_branch(t) for t in node.inputs)
    if a and b:  # both from convs: the main path's conv fuses, the shortcut's input is quantized
        return NodePlan(activations=[_shortcut_slot(node)]), ""
    if a or b:
        return NodePlan(activations=[1 if a else 0]), ""
    return None, "Add without a conv branch"


# ---- onnxruntime's CPU provider -----------------------------------------------------------------


def _conv_fed(tensor: gs.Tensor, limit: int = 16) -> bool:
    """Whether a conv produces ``tensor`` through ops without weights (activations, BN, pools, gates,
    Add/Mul), with no MatMul/Gemm closer on that path: an Add/Mul of a conv net, where onnxruntime's
    QLinearAdd/QLinearMul pay, rather than of a transformer block (residual stream, GELU, mask
    arithmetic), where int8 collapsed all-MiniLM-L6-v2 to -0.8 dB (bench/encoder.py)."""
    frontier, seen = [tensor], set()
    for _ in range(limit):
        step = []
        for t in frontier:
            if id(t) in seen or not t.inputs:
                continue
            seen.add(id(t))
            producer = t.inputs[0]
            if producer.op in RESIDUAL_FUSING_OPS:
                return True
            if producer.op not in WEIGHTED_OPS:
                step += [i for i in producer.inputs if const_values(i) is None]
        frontier = step
    return False


def _activation_slots(node: gs.Node) -> list[int]:
    return [i for i, t in enumerate(node.inputs) if const_values(t) is None and t.name]


def plan_activation_inputs(node: gs.Node) -> tuple[NodePlan | None, str]:
    """Every activation input per tensor (Concat, pooling: QLinearConcat, QLinearAveragePool, MaxPool)."""
    return NodePlan(activations=_activation_slots(node)), ""


def plan_arithmetic(node: gs.Node) -> tuple[NodePlan | None, str]:
    """Add/Mul of a conv net: two activations (QLinearAdd/QLinearMul), or x * a / x + b with a
    scalar constant as an exact uint8 constant (it maps to 0 or 255), as onnxruntime's own
    quantizer writes it. Transformer arithmetic stays float."""
    slots = _activation_slots(node)
    if not any(_conv_fed(node.inputs[i]) for i in slots):
        return None, f"{node.op} not fed by a Conv (arithmetic outside conv blocks, e.g. a transformer's, stays float)"
    if len(slots) == 2:
        return NodePlan(activations=slots), ""
    scalars = [i for i, t in enumerate(node.inputs) if (v := const_values(t)) is not None and v.size == 1]
    if len(slots) == 1 and len(scalars) == 1 and len(node.inputs) == 2:
        return NodePlan(activations=slots, constants=scalars), ""
    return None, f"{node.op} with a constant operand"


def plan_resize(node: gs.Node) -> tuple[NodePlan | None, str]:
    """A nearest Resize reads uint8 at its input's scale; onnxruntime interpolates any other mode in float."""
    mode = node.attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":  # onnxruntime 1.3x drops the pair only around a nearest Resize (checked on its optimized graph)
        return None, f"Resize in {mode} mode (onnxruntime interpolates it in float)"
    return NodePlan(activations=[0]), ""  # X; roi, scales and sizes are shapes


_WEIGHTED_WHY = "int8 input per tensor, weight per output channel"

#: TensorRT's Q/DQ guide (shared/reference/tensorrt-facts.md section 4): Q/DQ on the inputs of the
#: weighted ops, and on the residual input of a conv's Add; never on their outputs. Everything
#: else (BN, activations, Softmax, LayerNorm, pooling, Concat) stays float: TensorRT propagates
#: Q/DQ through the ops that commute with them.
TENSORRT_RULES: Mapping[str, OpRule] = MappingProxyType(
    {
        "Conv": OpRule(plan_conv, _WEIGHTED_WHY),
        "ConvTranspose": OpRule(plan_conv, _WEIGHTED_WHY + " (axis 1)"),
        "Gemm": OpRule(plan_gemm, _WEIGHTED_WHY),
        "MatMul": OpRule(plan_matmul, _WEIGHTED_WHY + "; GEMV shapes stay float"),
        "Add": OpRule(plan_residual_add, "the residual input of a conv's skip Add (TensorRT fuses Conv+Add)"),
    }
)

_ORT_OTHER_OPS = sorted(ORT_INT8_OPS - WEIGHTED_OPS - {"Add", "Mul", "Resize"})

#: onnxruntime's CPU provider (its QDQ selectors): uint8 activations on the inputs of every op it
#: has an integer kernel for, each op's output requantized where an int8 op reads it
ONNXRUNTIME_RULES: Mapping[str, OpRule] = MappingProxyType(
    {
        "Conv": OpRule(plan_conv, _WEIGHTED_WHY + " (QLinearConv)", output_q=True),
        # no QDQ selector fuses it (onnxruntime 1.2x-1.3x): DQ -> ConvTranspose -> Q would run in
        # float, with the weights dequantized at every run, and only add error
        "ConvTranspose": OpRule(keep_float("ConvTranspose (onnxruntime's CPU provider has no integer kernel for it)"), "stays float"),
        "Gemm": OpRule(plan_gemm, _WEIGHTED_WHY + " (QGemm)", output_q=True),
        "MatMul": OpRule(plan_matmul, _WEIGHTED_WHY + " (QLinearMatMul, MatMulIntegerToFloat)", output_q=True),
        "Add": OpRule(plan_arithmetic, "QLinearAdd in conv nets", output_q=True),
        "Mul": OpRule(plan_arithmetic, "QLinearMul in conv nets", output_q=True),
        "Resize": OpRule(plan_resize, "nearest only, at its input's scale", output_q=True, same_scale="Resize" in ORT_SAME_SCALE_OPS),
        **{op: OpRule(plan_activation_inputs, "uint8 inputs", output_q=True, same_scale=op in ORT_SAME_SCALE_OPS) for op in _ORT_OTHER_OPS},
    }
)

_RULES = {("tensorrt", "int8"): TENSORRT_RULES, ("tensorrt", "fp8"): TENSORRT_RULES, ("onnxruntime", "int8"): ONNXRUNTIME_RULES}


def placement_rules(target: str, fmt: str = "int8") -> Mapping[str, OpRule]:
    """The op table of a target and format (fp8 is TensorRT's, placed as its int8)."""
    try:
        return _RULES[(target, fmt)]
    except KeyError:
        raise ValueError(f"no placement for target {target!r} in format {fmt!r}") from None


def describe(target: str, fmt: str = "int8") -> str:
    """One line an op type: what the placement does with it."""
    rules = placement_rules(target, fmt)
    return "\n".join(f"{op}: {rule.why}" + (" -> output requantized" if rule.output_q else "") for op, rule in sorted(rules.items()))
