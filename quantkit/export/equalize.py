"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"): rescale the output
channels of one Conv and the matching input channels of the next so that both weight tensors have
the same per-channel range, which per-tensor and per-channel INT8 then both represent better.

For a pair Conv1 -> f -> Conv2 with f positively homogeneous (f(x / s) = f(x) / s for s > 0:
ReLU, LeakyReLU, PReLU, or nothing), output channel i of Conv1 (weights and bias) is divided by

    s_i = sqrt(r1_i / r2_i),    r1_i = max |W1[i, ...]|,  r2_i = max |W2[:, i, ...]|

and input channel i of Conv2 multiplied by it, so that both ranges become sqrt(r1_i * r2_i). The
network computes the same function in exact arithmetic (float32 rounding aside). ReLU6 / Clip is
not homogeneous (clipping at 6 / s_i would need a per-channel bound), so such pairs are left as
they are rather than changed into ReLU as the paper does. Conv2 may be depthwise (its input
channel i is its weight W2[i]); grouped Convs otherwise, and Convs with a shared or non-constant
weight, are skipped. BatchNormalization is folded into its Conv first. Sweeps repeat until the
scales stop changing (chains of several pairs converge together, as in the paper's algorithm).

High-bias absorption (the paper's section 4.1) follows: where BatchNorm was folded into Conv1, its
output channel i is about N(beta_i, gamma_i^2), so it is at least c_i = max(0, beta_i - 3|gamma_i|)
(scaled by the equalization). Every op allowed between the pair is the identity on [0, inf), so
c_i moves from Conv1's bias into Conv2's (b2 += W2 c): the activation after Conv1 loses c_i of its
range, and the function is unchanged wherever the channel stays above c_i, which is what the paper
assumes. Conv2 must be unpadded: a padded border would read zeros where it read c_i.

Depthwise equalization (``equalize_depthwise_inputs``, with data; its own algorithm): a depthwise Conv's output channel c
reads its input channel c alone, and its weights are quantized per output channel, so multiplying
input channel c by t_c and dividing weight slice c by t_c costs the weights nothing and changes no
output. With t_c = M / m_c (m_c = max |x_c| over the data, M the largest), every channel reaches
the per-tensor INT8 range instead of the few widest ones: a depthwise Conv fed by a non-homogeneous
activation (hardswish, SiLU: what CLE cannot pass) loses its small channels no more. The product
is an inserted Mul by a constant, which TensorRT fuses into the producer's pointwise epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantkit.export.statistics import channel_maxima
from quantkit.graph.passes import fold_batchnorm
from quantkit.model import ModelInfo, lifted_constants

#: ops between the two Convs through which the equalization stays exact
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
SWEEPS = 20
#: a depthwise input channel is raised by at most this factor (a near-silent channel stays near silent)
MAX_GAIN = 256.0
#: sweeps stop once every scale is within this of 1
CONVERGED = 1e-4


@dataclass
class EqualizeReport:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # Conv -> why it has no partner
    folded: int = 0
    sweeps: int = 0
    absorbed: dict[str, int] = field(default_factory=dict)  # Conv1 -> channels whose high bias moved on

    def summary(self) -> str:
        line = f"cross-layer equalization: {len(self.pairs)} Conv pair(s) equalized in {self.sweeps} sweep(s)"
        if self.folded:
            line += f", after folding {self.folded} BatchNormalization node(s)"
        if self.absorbed:
            line += f"; high biases absorbed on {sum(self.absorbed.values())} channel(s) of {len(self.absorbed)} Conv(s)"
        return line


@dataclass
class DepthwiseReport:
    spread: dict[str, float] = field(default_factory=dict)  # depthwise Conv -> its input's widest / median channel before

    def summary(self) -> str:
        if not self.spread:
            return "depthwise equalization: no depthwise Conv input to equalize"
        return (
            f"depthwise equalization: {len(self.spread)} depthwise Conv input(s) brought to one range per channel "
            f"(widest / median channel was {np.median(list(self.spread.values())):.1f}x, the median over them)"
        )


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _input_slices(w2: np.ndarray, depthwise: bool) -> np.ndarray:
    """max |W2| per input channel: over dims 0, 2.. (group 1) or per output channel (depthwise)."""
    if depthwise:
        return np.abs(w2).reshape(w2.shape[0], -1).max(axis=1)
    return np.abs(w2).transpose(1, 0, *range(2, w2.ndim)).reshape(w2.shape[1], -1).max(axis=1)


def _pairs(model: onnx.ModelProto, report: EqualizeReport) -> list[tuple[onnx.NodeProto, onnx.NodeProto, bool]]:
    """(Conv1, Conv2, Conv2 is depthwise) for every pair joined by at most one homogeneous op."""
    graph = model.graph
    consts = {i.name for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    outputs = {o.name for o in graph.output}
    weight_uses = {t: len(r) for t, r in readers.items() if t in consts}
    found = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        reason = _pair_refusal(conv, consts, weight_uses)
        nxt = readers.get(conv.output[0], [])
        if not reason and (len(nxt) != 1 or conv.output[0] in outputs):
            reason = "its output has other readers"
        if not reason and nxt[0].op_type in HOMOGENEOUS:
            act = nxt[0]
            after = readers.get(act.output[0], [])
            if act.op_type == "PRelu" and act.input[1] not in consts:
                reason = "PRelu with a non-constant slope"
            elif len(after) != 1 or act.output[0] in outputs:
                reason = f"its {act.op_type} output has other readers"
            nxt = after
        if not reason:
            reason = _partner_refusal(nxt[0], consts, weight_uses)
        if reason:
            report.skipped[conv.name] = reason
            continue
        depthwise = _attr(nxt[0], "group", 1) > 1
        found.append((conv, nxt[0], depthwise))
    return found


def _pair_refusal(conv: onnx.NodeProto, consts: set[str], uses: dict[str, int]) -> str:
    if len(conv.input) < 2 or conv.input[1] not in consts:
        return "its weight is not a constant"
    if uses.get(conv.input[1], 0) != 1:
        return "its weight is shared"
    return ""


def _partner_refusal(node: onnx.NodeProto, consts: set[str], uses: dict[str, int]) -> str:
    if node.op_type != "Conv":
        return f"its output goes to {node.op_type}, not a Conv (through ReLU/LeakyReLU/PRelu at most)"
    refused = _pair_refusal(node, consts, uses)
    if refused:
        return "the next Conv: " + refused
    return ""


def _equalize_pair(
    inits: dict[str, onnx.TensorProto], conv1: onnx.NodeProto, conv2: onnx.NodeProto, depthwise: bool, scales: dict[str, np.ndarray]
) -> float:
    """Rescale one pair in place (``scales``: each Conv1's output channels' divisors so far);
    returns how far the scales were from 1 (max |log s|)."""
    w1 = numpy_helper.to_array(inits[conv1.input[1]]).astype(np.float64)
    w2 = numpy_helper.to_array(inits[conv2.input[1]]).astype(np.float64)
    if depthwise and (w2.shape[1] != 1 or w2.shape[0] != w1.shape[0]):
        return 0.0  # grouped, or depthwise with a channel multiplier: an input channel is not one weight slice
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = _input_slices(w2, depthwise)
    if r1.shape != r2.shape:
        return 0.0
    usable = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    scales[conv1.name] = scales.get(conv1.name, 1.0) * s
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    w1 /= s.reshape(shape1)
    if depthwise:
        w2 *= s.reshape(shape1)
    else:
        w2 *= s.reshape((1, -1) + (1,) * (w2.ndim - 2))
    dtype = numpy_helper.to_array(inits[conv1.input[1]]).dtype
    inits[conv1.input[1]].CopyFrom(numpy_helper.from_array(w1.astype(dtype), conv1.input[1]))
    inits[conv2.input[1]].CopyFrom(numpy_helper.from_array(w2.astype(dtype), conv2.input[1]))
    if len(conv1.input) > 2 and conv1.input[2] in inits:
        b1 = numpy_helper.to_array(inits[conv1.input[2]]).astype(np.float64) / s
        inits[conv1.input[2]].CopyFrom(numpy_helper.from_array(b1.astype(dtype), conv1.input[2]))
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, EqualizeReport]:
    """The model with BatchNorm folded and every eligible Conv pair equalized (a copy)."""
    folded, fusions = fold_batchnorm(lifted_constants(model))
    report = EqualizeReport(folded=len(fusions))
    out = onnx.ModelProto()
    out.CopyFrom(folded)
    pairs = _pairs(out, report)
    report.pairs = [(a.name, b.name) for a, b, _ in pairs]
    inits = {i.name: i for i in out.graph.initializer}
    scales: dict[str, np.ndarray] = {}
    for sweep in range(1, SWEEPS + 1):
        moved = max((_equalize_pair(inits, a, b, dw, scales) for a, b, dw in pairs), default=0.0)
        report.sweeps = sweep
        if moved < CONVERGED:
            break
    statistics = _batchnorm_statistics(model, fusions)
    for conv1, conv2, depthwise in pairs:
        if conv1.name in statistics:
            beta, gamma = statistics[conv1.name]
            s = scales.get(conv1.name, 1.0)
            absorbed = _absorb_high_bias(out.graph, inits, conv1, conv2, depthwise, np.maximum(0.0, (beta - 3 * gamma) / s))
            if absorbed:
                report.absorbed[conv1.name] = absorbed
    return out, report


def _batchnorm_statistics(model: onnx.ModelProto, fusions: list[tuple[str, str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv -> (beta, |gamma|) of the BatchNormalization folded into it: its output's per-channel
    mean and standard deviation as the trained network saw them."""
    lifted = lifted_constants(model)
    inits = {i.name: i for i in lifted.graph.initializer}
    nodes = {n.name: n for n in lifted.graph.node}
    found = {}
    for conv, bn in fusions:
        node = nodes.get(bn)
        if node is None or node.op_type != "BatchNormalization" or not {node.input[1], node.input[2]} <= inits.keys():
            continue
        gamma, beta = (numpy_helper.to_array(inits[node.input[k]]).astype(np.float64) for k in (1, 2))
        found[conv] = (beta, np.abs(gamma))
    return found


def _absorb_high_bias(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], conv1: onnx.NodeProto, conv2: onnx.NodeProto, depthwise: bool, c: np.ndarray
) -> int:
    """Move c from Conv1's bias into Conv2's (b2 += W2 c); the number of channels moved."""
    unpadded = not any(_attr(conv2, "pads", [])) and _attr(conv2, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
    if not unpadded or len(conv1.input) < 3 or conv1.input[2] not in inits or not np.any(c > 0):
        return 0
    w2 = numpy_helper.to_array(inits[conv2.input[1]]).astype(np.float64)
    if c.shape != (w2.shape[0] if depthwise else w2.shape[1],):
        return 0
    dtype = numpy_helper.to_array(inits[conv1.input[2]]).dtype
    taps = w2.reshape(w2.shape[0], -1).sum(axis=1) * c if depthwise else np.einsum("oik,i->o", w2.reshape(w2.shape[0], w2.shape[1], -1), c)
    b1 = numpy_helper.to_array(inits[conv1.input[2]]).astype(np.float64) - c
    inits[conv1.input[2]].CopyFrom(numpy_helper.from_array(b1.astype(dtype), conv1.input[2]))
    if len(conv2.input) > 2 and conv2.input[2] in inits:
        b2 = numpy_helper.to_array(inits[conv2.input[2]]).astype(np.float64) + taps
        inits[conv2.input[2]].CopyFrom(numpy_helper.from_array(b2.astype(dtype), conv2.input[2]))
    else:
        name = f"{conv2.name}_absorbed_bias"
        tensor = numpy_helper.from_array(taps.astype(dtype), name)
        graph.initializer.append(tensor)
        inits[name] = graph.initializer[-1]
        conv2.input.extend([""] * (2 - len(conv2.input)) + [name])
    return int(np.sum(c > 0))


def _depthwise_convs(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Depthwise Convs (one input channel per output channel) with a constant weight of their own."""
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for t in node.input:
            uses[t] = uses.get(t, 0) + 1
    found = []
    for node in (n for n in graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits):
        dims = list(inits[node.input[1]].dims)
        if len(dims) == 4 and dims[1] == 1 and _attr(node, "group", 1) == dims[0] > 1 and uses[node.input[1]] == 1:
            found.append(node)
    return found


def has_depthwise_convs(model: onnx.ModelProto) -> bool:
    return bool(_depthwise_convs(lifted_constants(model).graph))


def equalize_depthwise_inputs(model: ModelInfo, batches: Any) -> tuple[onnx.ModelProto, DepthwiseReport]:
    """A copy of the model whose depthwise Convs read their input channels brought to one range
    (see the module docstring), from one FP32 pass over ``batches``; Constant weights are lifted."""
    out = lifted_constants(model.proto)
    report = DepthwiseReport()
    convs = _depthwise_convs(out.graph)
    maxima = channel_maxima(model, {c.input[0]: 1 for c in convs}, batches)
    inits = {i.name: i for i in out.graph.initializer}
    inserted = {}
    for conv in convs:
        x_max, w = maxima.get(conv.input[0]), numpy_helper.to_array(inits[conv.input[1]])
        if x_max is None or x_max.shape != (w.shape[0],) or not np.any(x_max > 0):
            continue
        gain = np.ones_like(x_max)
        alive = x_max > 0
        gain[alive] = np.minimum(x_max.max() / x_max[alive], MAX_GAIN)
        if np.all(gain < 1.01):
            continue
        report.spread[conv.name] = float(x_max.max() / max(np.median(x_max), 1e-30))
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w / gain.reshape(-1, 1, 1, 1)).astype(w.dtype), conv.input[1]))
        name = f"{conv.name}_input_gain"
        out.graph.initializer.append(numpy_helper.from_array(gain.reshape(1, -1, 1, 1).astype(w.dtype), name))
        inserted[f"{name}_out"] = helper.make_node("Mul", [conv.input[0], name], [f"{name}_out"], name=f"{conv.name}_InputGain")
        conv.input[0] = f"{name}_out"
    nodes = list(out.graph.node)
    del out.graph.node[:]
    for node in nodes:  # each Mul just before its Conv: the order stays topological
        if node.op_type == "Conv" and node.input[0] in inserted:
            out.graph.node.append(inserted[node.input[0]])
        out.graph.node.append(node)
    return out, report
