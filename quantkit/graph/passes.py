"""Graph passes, each numerically exact up to float rounding (the seed article's layer and tensor fusion).

Every pass works on an onnx-graphsurgeon graph and returns the ``Fusion``s it made. A fused node
takes over the output tensor names of what it replaced, so calibrated ranges keyed by tensor
name stay valid. These are the tensors TensorRT keeps after its own fusions.

- ``fold_scales``: BatchNormalization, and per-channel constant Muls and bias Adds, folded into
  the preceding Conv's weights and bias (TensorRT's "scale fusion"). The onnxruntime Q/DQ placement
  needs it: with the weight behind a DequantizeLinear, onnxruntime can no longer fold BN, and a
  BN between Conv and QuantizeLinear blocks its integer Conv kernel.
- ``fuse_vertical``: Conv + activation, and Conv + residual Add + activation, into one
  ``com.microsoft.FusedConv`` ("CBR"). It runs on onnxruntime only; TensorRT makes this fusion
  itself.
- ``merge_horizontal``: sibling convolutions reading the same tensor with the same kernel,
  strides, padding, dilation, group and activation, merged into one wider convolution followed
  by a Split (the Inception block's 1x1 branches).
- ``fold_concats``: Concat chains on one axis become one Concat, and a Concat that re-joins all
  of a Split's outputs in order disappears. ``inplace_concats`` lists the Concats TensorRT
  removes by letting each producer write into its slice of a preallocated buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

MS_DOMAIN = "com.microsoft"
#: activations onnxruntime's FusedConv takes, with how to read their parameters
_FUSABLE_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")
_CONVS = ("Conv", "FusedConv")


@dataclass
class Fusion:
    """One rewrite: which nodes became which."""

    kind: str  # scale, vertical, horizontal, concat
    result: str  # the node that remains (or the tensor, for a cancelled Concat)
    replaced: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind}: {' + '.join(self.replaced)} -> {self.result}"


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _single_use(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return len(tensor.outputs) == 1 and tensor not in graph.outputs


def _take_outputs(keeper: gs.Node, node: gs.Node) -> None:
    """``keeper`` produces ``node``'s output tensor from now on; ``node`` goes at the next cleanup."""
    y = node.outputs[0]
    node.outputs.clear()
    keeper.outputs[0] = y


def _set_bias(conv: gs.Node, bias: gs.Constant) -> None:
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias
    else:
        conv.inputs.append(bias)


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` with ``like``'s IR version and opsets (plus com.microsoft if used)."""
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    if any(n.domain == MS_DOMAIN for n in out.graph.node) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return out


# ---- scale fusion ------------------------------------------------------------------------------
def _conv_then_channel_constant(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node, np.ndarray, np.ndarray, np.ndarray] | None:
    """For a binary ``node`` reading a Conv's single-use output and a per-channel constant: the
    Conv, its weight, its bias (zeros when it has none) and the constant; else None."""
    x, c = node.inputs if _constant(node.inputs[1]) is not None else node.inputs[::-1]
    value = _constant(c)
    if value is None or len(x.inputs) != 1 or x.inputs[0].op != "Conv" or not _single_use(x, graph):
        return None
    conv = x.inputs[0]
    w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
    b = _constant(conv.inputs[2]) if len(conv.inputs) > 2 else (np.zeros(w.shape[0], w.dtype) if w is not None else None)
    if w is None or b is None or not _per_channel(value, w.shape[0], w.ndim):
        return None
    return conv, w, b, value


def fold_scales(graph: gs.Graph) -> list[Fusion]:
    """Fold BatchNormalization, per-channel constant Muls (scales) and bias Adds into the preceding Conv."""
    graph.fold_constants(error_ok=True).cleanup()  # BN parameters may come from Constant nodes
    fusions: list[Fusion] = []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Conv" or not _single_use(x, graph):
            continue
        conv = x.inputs[0]
        params = [_constant(t) for t in bn.inputs[1:5]]
        w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
        b = _constant(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if w is None or any(p is None for p in params) or len(conv.inputs[1].outputs) != 1 or (len(conv.inputs) > 2 and b is None):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        b = b.astype(np.float64) if b is not None else np.zeros_like(mean)
        conv.inputs[1] = gs.Constant(f"{conv.inputs[1].name}_bnfolded", (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        _set_bias(conv, gs.Constant(f"{conv.name}_bias_bnfolded", ((b - mean) * factor + beta).astype(w.dtype)))
        _take_outputs(conv, bn)
        fusions.append(Fusion("scale", conv.name, [conv.name, bn.name]))
    for mul in [n for n in graph.nodes if n.op == "Mul" and len(n.inputs) == 2]:
        # Conv -> Mul(per-channel constant): a learnable scale (PP-LCNetV3's affine blocks)
        found = _conv_then_channel_constant(mul, graph)
        if found is None:
            continue
        conv, w, b, factor = found
        f = np.broadcast_to(factor.reshape(-1).astype(np.float64), (w.shape[0],))
        conv.inputs[1] = gs.Constant(f"{conv.inputs[1].name}_mulfolded", (w * f.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
        _set_bias(conv, gs.Constant(f"{conv.name}_bias_mulfolded", (b * f).astype(w.dtype)))
        _take_outputs(conv, mul)
        fusions.append(Fusion("scale", conv.name, [conv.name, mul.name]))
    for add in [n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2]:
        # Conv -> Add(per-channel constant): the bias that exporters such as Paddle2ONNX emit separately
        found = _conv_then_channel_constant(add, graph)
        if found is None:
            continue
        conv, w, b, bias_add = found
        _set_bias(conv, gs.Constant(f"{conv.name}_bias_addfolded", (b + np.broadcast_to(bias_add.reshape(-1), b.shape)).astype(w.dtype)))
        _take_outputs(conv, add)
        fusions.append(Fusion("scale", conv.name, [conv.name, add.name]))
    graph.cleanup()
    return fusions


def _per_channel(bias: np.ndarray, channels: int, rank: int) -> bool:
    """A scalar, or a constant shaped like [C], [C,1,1] or [1,C,1,1] against an NC... output."""
    if bias.size == 1:
        return True
    if bias.size != channels or bias.ndim > rank:
        return False
    shape = (1,) * (rank - bias.ndim) + bias.shape
    return shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1)


def if_branch_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The branches of every If in ``graph``, nested ones included (``quantkit.model.if_branches`` for graphsurgeon)."""
    found = []
    for node in graph.nodes:
        if node.op == "If" and node.domain in (None, "", "ai.onnx"):
            for branch in (node.attrs["then_branch"], node.attrs["else_branch"]):
                found += [branch, *if_branch_graphs(branch)]
    return found


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """``fold_scales`` on a model and its If branches: the folded model and the (conv, folded node) name pairs."""
    graph = gs.import_onnx(model)
    fusions = [f for g in [graph, *if_branch_graphs(graph)] for f in fold_scales(g)]
    return export_graph(graph, model), [(f.result, f.replaced[1]) for f in fusions]


# ---- vertical fusion -----------------------------------------------------------------------------
def _activation(node: gs.Node) -> tuple[str, list[float]] | None:
    """FusedConv's (activation, activation_params) for ``node``, or None if it has no such form."""
    if node.op in ("Relu", "Sigmoid", "Tanh"):
        return node.op, []
    if node.op == "LeakyRelu":
        return "LeakyRelu", [float(node.attrs.get("alpha", 0.01))]
    if node.op == "HardSigmoid":
        return "HardSigmoid", [float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))]
    if node.op == "Clip":
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            if len(node.inputs) > i and node.inputs[i].name:
                value = _constant(node.inputs[i])
                if value is None:
                    return None
                bounds.append(float(value.reshape(())))
            else:
                bounds.append(float(node.attrs.get("min" if i == 1 else "max", default)))
        return "Clip", bounds
    return None


def fuse_vertical(graph: gs.Graph) -> list[Fusion]:
    """Conv (+ residual Add) + activation -> com.microsoft.FusedConv, named after the Conv."""
    fusions: list[Fusion] = []
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        y = conv.outputs[0]
        if not _single_use(y, graph) or len(conv.inputs) < 2 or _constant(conv.inputs[1]) is None:
            continue
        nxt, feed = y.outputs[0], y  # the activation candidate and the tensor it must read
        replaced, z = [conv.name], None
        if nxt.op == "Add" and len(nxt.inputs) == 2 and _single_use(nxt.outputs[0], graph):
            other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
            if _constant(other) is None and other.shape is not None and other.shape == y.shape:
                after = nxt.outputs[0].outputs[0]
                if _activation(after) is not None:
                    replaced.append(nxt.name)
                    z, feed, nxt = other, nxt.outputs[0], after
        act = _activation(nxt)
        if act is None or nxt.inputs[0] is not feed:
            continue
        attrs = dict(conv.attrs)
        attrs["activation"] = act[0]
        if act[1]:
            attrs["activation_params"] = act[1]
        inputs = list(conv.inputs)
        if z is not None:
            if len(inputs) == 2:  # FusedConv's Z comes after B: give it a zero bias
                w = _constant(inputs[1])
                inputs.append(gs.Constant(f"{conv.name}_zero_bias", np.zeros(w.shape[0], dtype=w.dtype)))
            inputs.append(z)
        fused = gs.Node("FusedConv", conv.name, attrs=attrs, inputs=inputs, outputs=[nxt.outputs[0]], domain=MS_DOMAIN)
        conv.inputs.clear()
        conv.outputs.clear()
        nxt.outputs.clear()
        graph.nodes.append(fused)
        fusions.append(Fusion("vertical", fused.name, [*replaced, nxt.name]))
    graph.cleanup().toposort()
    return fusions


# ---- horizontal fusion ---------------------------------------------------------------------------
def _signature(conv: gs.Node) -> tuple | None:
    w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if w is None or (len(conv.inputs) > 2 and conv.inputs[2].name and _constant(conv.inputs[2]) is None) or len(conv.inputs) > 3:
        return None  # a Z input or a computed bias: not mergeable
    if int(conv.attrs.get("group", 1)) != 1 or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    spatial = w.ndim - 2
    attrs = tuple(
        (k, tuple(conv.attrs.get(k, default)))
        for k, default in (("strides", [1] * spatial), ("pads", [0] * 2 * spatial), ("dilations", [1] * spatial))
    )
    act = (conv.attrs.get("activation"), tuple(conv.attrs.get("activation_params", ())))
    return conv.op, w.shape[1:], w.dtype.str, attrs, act


#: elementwise activations: f(Split(x)) == Split(f(x)), so one applied to the merged output serves every branch
_POINTWISE_ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Gelu", "Mish"}
)


def _same_activation(members: list[gs.Node], graph: gs.Graph) -> list[gs.Node] | None:
    """The activation each member's output goes to alone, if it is one and the same op for all
    (same type, attributes and constant operands); else None."""
    acts = []
    for m in members:
        y = m.outputs[0]
        if not _single_use(y, graph) or y.outputs[0].op not in _POINTWISE_ACTIVATIONS or y.outputs[0].inputs[0] is not y:
            return None
        acts.append(y.outputs[0])
    first = acts[0]

    def operands(node: gs.Node) -> list:
        return [None if not t.name else (_constant(t).tobytes() if _constant(t) is not None else t) for t in node.inputs[1:]]

    for a in acts[1:]:
        if a.op != first.op or a.domain != first.domain or a.attrs != first.attrs or len(a.inputs) != len(first.inputs):
            return None
        if any(x is not y and not (isinstance(x, bytes) and x == y) for x, y in zip(operands(a), operands(first), strict=True)):
            return None
    if any(isinstance(x, gs.Tensor) for x in operands(first)):
        return None  # a computed bound: not known to be the same for every branch
    return acts


def merge_horizontal(graph: gs.Graph, opset: int) -> list[Fusion]:
    """Merge sibling convolutions on one input into one wider convolution + Split.

    When every branch goes on into the same pointwise activation, that activation moves in front
    of the Split, applied once to the merged output: the Split then sits after Conv+activation,
    which TensorRT fuses into one layer, instead of cutting that fusion into one Conv and k
    activations. A Concat that takes all of the Split's outputs in order reads the merged tensor
    itself (``fold_concats``)."""
    fusions: list[Fusion] = []
    local = {id(n) for n in graph.nodes}  # an If branch's convs read the enclosing graph's tensors too: they stay apart
    for tensor in list(graph.tensors().values()):
        groups: dict[tuple, list[gs.Node]] = {}
        for node in tensor.outputs:
            if id(node) in local and node.op in _CONVS and node.inputs and node.inputs[0] is tensor:
                sig = _signature(node)
                if sig is not None:
                    groups.setdefault(sig, []).append(node)
        for members in groups.values():
            if len(members) < 2:
                continue
            weights = [_constant(m.inputs[1]) for m in members]
            biases = [
                _constant(m.inputs[2]) if len(m.inputs) > 2 else np.zeros(w.shape[0], w.dtype)
                for m, w in zip(members, weights, strict=True)
            ]
            first = members[0]
            name = f"{first.name}_hmerged"
            merged_out = gs.Variable(f"{name}_output", dtype=first.outputs[0].dtype)
            merged = gs.Node(
                first.op,
                name,
                attrs=dict(first.attrs),
                inputs=[tensor, gs.Constant(f"{name}_W", np.concatenate(weights)), gs.Constant(f"{name}_B", np.concatenate(biases))],
                outputs=[merged_out],
                domain=first.domain,
            )
            sizes = [w.shape[0] for w in weights]
            outputs = [m.outputs[0] for m in members]
            acts = _same_activation(members, graph)
            for m in members:
                m.inputs.clear()
                m.outputs.clear()
            replaced = [m.name for m in members]
            if acts is not None:
                activated = gs.Variable(f"{name}_{acts[0].op.lower()}_output", dtype=merged_out.dtype)
                hoisted = gs.Node(
                    acts[0].op, f"{name}_{acts[0].op.lower()}", attrs=dict(acts[0].attrs), domain=acts[0].domain,
                    inputs=[merged_out, *acts[0].inputs[1:]], outputs=[activated],
                )  # fmt: skip
                outputs = [a.outputs[0] for a in acts]
                for a in acts:
                    a.inputs.clear()
                    a.outputs.clear()
                graph.nodes.append(hoisted)
                merged_out = activated
                replaced += [a.name for a in acts]
            if opset >= 13:
                split = gs.Node(
                    "Split",
                    f"{name}_split",
                    attrs={"axis": 1},
                    inputs=[merged_out, gs.Constant(f"{name}_sizes", np.array(sizes, np.int64))],
                    outputs=outputs,
                )
            else:
                split = gs.Node("Split", f"{name}_split", attrs={"axis": 1, "split": sizes}, inputs=[merged_out], outputs=outputs)
            graph.nodes += [merged, split]
            fusions.append(Fusion("horizontal", name, replaced))
    graph.cleanup().toposort()
    return fusions


# ---- hard-swish for onnxruntime's integer Mul -----------------------------------------------------
def _scalar(tensor: gs.Tensor) -> float | None:
    value = _constant(tensor)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _sixth(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether ``node`` divides ``tensor`` by 6 (a Div by 6, or a Mul by 1/6)."""
    if len(node.inputs) != 2 or node.inputs[0] is not tensor:
        return False
    k = _scalar(node.inputs[1])
    return k is not None and ((node.op == "Div" and k == 6.0) or (node.op == "Mul" and abs(k * 6 - 1) < 1e-6))


def hardswish_as_gate(graph: gs.Graph) -> list[tuple[str, str, str]]:
    """Hard-swish as ``x * HardSigmoid(x)``, so that onnxruntime runs the product as QLinearMul.

    - A decomposed ``x * (Clip(x + 3, 0, 6) / 6)`` keeps its ``Mul`` and loses three float ops:
      ``Add``, ``Clip`` and ``Div`` (or ``Mul`` by 1/6) become one ``HardSigmoid(alpha=1/6,
      beta=0.5)`` that writes the same tensor, so its calibrated range stays valid.
    - ``(x * Clip(x + 3, 0, 6)) / 6`` (PaddlePaddle's form) becomes ``x * HardSigmoid(x)``,
      writing the Div's output tensor.
    - A ``HardSwish`` node becomes ``HardSigmoid`` + ``Mul`` (onnxruntime makes the same split
      when it optimizes, but then behind one DequantizeLinear, in float).

    Both are exact up to float rounding. Returns (tensor, x, "hardsigmoid" or "hardswish") for
    each tensor that may have no calibrated range (a new gate; PaddlePaddle's output, once a
    Div's; a HardSwish output that no int8 op reads): its range follows from x's.
    """
    derived: list[tuple[str, str, str]] = []
    changed = False
    for node in list(graph.nodes):
        if node.op == "HardSwish" and node.outputs and node.inputs:
            derived += _split_hardswish(graph, node)
        elif node.op == "Add" and len(node.inputs) == 2 and node.outputs:
            changed = _gate_from_add_three(graph, node, derived) or changed
    if derived or changed:
        graph.cleanup().toposort()
    return derived


def _hardsigmoid_node(name: str, x: gs.Tensor, gate: gs.Tensor) -> gs.Node:
    return gs.Node("HardSigmoid", name, {"alpha": 1 / 6, "beta": 0.5}, [x], [gate])


def _detach(*nodes: gs.Node) -> None:
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()


def _split_hardswish(graph: gs.Graph, node: gs.Node) -> list[tuple[str, str, str]]:
    """A HardSwish node as HardSigmoid + Mul; both new tensors' ranges follow from x's."""
    x, y = node.inputs[0], node.outputs[0]
    gate = gs.Variable(f"{y.name}_gate", dtype=y.dtype, shape=y.shape)
    _detach(node)
    graph.nodes.append(_hardsigmoid_node(f"{node.name}_gate", x, gate))
    graph.nodes.append(gs.Node("Mul", node.name, inputs=[x, gate], outputs=[y]))  # a plan naming it still speaks
    # a HardSwish read by no int8 op has no calibrated range
    return [(gate.name, x.name, "hardsigmoid"), (y.name, x.name, "hardswish")]


def _gate_from_add_three(graph: gs.Graph, node: gs.Node, derived: list[tuple[str, str, str]]) -> bool:
    """Rewrite the decomposed gate that starts at ``x + 3`` (either form); whether the graph changed."""
    three = [i for i, t in enumerate(node.inputs) if _scalar(t) == 3.0]
    if len(three) != 1:
        return False
    x = node.inputs[1 - three[0]]
    shifted = node.outputs[0]
    if not _single_use(shifted, graph) or shifted.outputs[0].op != "Clip":
        return False
    clip = shifted.outputs[0]
    bounds = [_scalar(t) if t.name else None for t in clip.inputs[1:3]] if len(clip.inputs) >= 3 else []
    if bounds != [0.0, 6.0] or not clip.outputs or not _single_use(clip.outputs[0], graph):
        return False
    nxt = clip.outputs[0].outputs[0]
    if _sixth(nxt, clip.outputs[0]):  # x * (Clip(x + 3, 0, 6) / 6): the gate tensor stays
        gate = nxt.outputs[0]
        if not any(c.op == "Mul" and x in c.inputs and gate in c.inputs for c in gate.outputs):
            return False
        _detach(node, clip, nxt)
        graph.nodes.append(_hardsigmoid_node(f"{node.name}_hardsigmoid", x, gate))
        return True
    if not (nxt.op == "Mul" and x in nxt.inputs and _single_use(nxt.outputs[0], graph)):
        return False
    last = nxt.outputs[0].outputs[0]  # (x * Clip(x + 3, 0, 6)) / 6
    if not _sixth(last, nxt.outputs[0]):
        return False
    y = last.outputs[0]
    gate = gs.Variable(f"{y.name}_gate", dtype=y.dtype, shape=y.shape)
    _detach(node, clip, nxt, last)
    graph.nodes.append(_hardsigmoid_node(f"{node.name}_hardsigmoid", x, gate))
    graph.nodes.append(gs.Node("Mul", nxt.name, inputs=[x, gate], outputs=[y]))
    derived += [(gate.name, x.name, "hardsigmoid"), (y.name, x.name, "hardswish")]  # y was a Div's output
    return False


# ---- concat elimination --------------------------------------------------------------------------
def fold_concats(graph: gs.Graph) -> list[Fusion]:
    """Flatten Concat chains on one axis; a Concat that re-joins all of a Split's outputs in order reads the
    Split's input instead (the whole Concat goes when those are all its inputs)."""
    fusions: list[Fusion] = []
    while _flatten_one_concat(graph, fusions):
        pass
    for concat in [n for n in graph.nodes if n.op == "Concat" and n.outputs]:
        # a run of the Concat's inputs that is all of one Split's outputs, in order, is that Split's input
        for start, inp in enumerate(concat.inputs):
            split = inp.inputs[0] if len(inp.inputs) == 1 else None
            if split is None or split.op != "Split" or not split.outputs or inp is not split.outputs[0]:
                continue
            if _rejoins_split(graph, concat, split, start):
                _read_split_input(graph, concat, split, start, fusions)
                break
    graph.cleanup().toposort()
    return fusions


def _flatten_one_concat(graph: gs.Graph, fusions: list[Fusion]) -> bool:
    """Merge one single-use inner Concat on the same axis into the Concat that reads it; whether one was found."""
    for concat in [n for n in graph.nodes if n.op == "Concat" and n.outputs]:
        axis = concat.attrs.get("axis")
        for i, inp in enumerate(concat.inputs):
            inner = inp.inputs[0] if len(inp.inputs) == 1 else None
            if inner is not None and inner.op == "Concat" and inner.attrs.get("axis") == axis and _single_use(inp, graph):
                new_inputs = list(concat.inputs[:i]) + list(inner.inputs) + list(concat.inputs[i + 1 :])
                concat.inputs.clear()
                concat.inputs.extend(new_inputs)
                inner.inputs.clear()
                inner.outputs.clear()
                fusions.append(Fusion("concat", concat.name, [inner.name, concat.name]))
                return True
    return False


def _rejoins_split(graph: gs.Graph, concat: gs.Node, split: gs.Node, start: int) -> bool:
    run = list(concat.inputs[start : start + len(split.outputs)])
    return (
        run == list(split.outputs)
        and split.attrs.get("axis", 0) == concat.attrs.get("axis")
        and all(_single_use(t, graph) for t in split.outputs)
    )


def _read_split_input(graph: gs.Graph, concat: gs.Node, split: gs.Node, start: int, fusions: list[Fusion]) -> None:
    """The Concat reads the Split's input in place of its outputs (its readers read it, when that was all of it)."""
    source = split.inputs[0]
    if len(split.outputs) == len(concat.inputs):
        out = concat.outputs[0]
        if out in graph.outputs:
            return
        for reader in list(out.outputs):
            for slot, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[slot] = source
        concat.outputs.clear()
    else:
        new_inputs = [*concat.inputs[:start], source, *concat.inputs[start + len(split.outputs) :]]
        concat.inputs.clear()
        concat.inputs.extend(new_inputs)
    split.outputs.clear()
    fusions.append(Fusion("concat", source.name, [split.name, concat.name]))


def inplace_concats(graph: gs.Graph) -> list[str]:
    """Concats whose every input is produced by a single-use node: TensorRT has each producer write
    straight into its slice of the output buffer and drops the Concat ("concat removal")."""
    found = []
    for concat in graph.nodes:
        if concat.op == "Concat" and concat.inputs and all(len(t.inputs) == 1 and len(t.outputs) == 1 for t in concat.inputs):
            found.append(concat.name)
    return found
