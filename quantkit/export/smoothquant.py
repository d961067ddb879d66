"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights before INT8.

For a MatMul/Gemm Y = X W with a constant W [K, N], per input channel k:
    s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)
and Y = (X / s) (s W): the product is unchanged, the activation's outlier channels shrink and the
weights' rows grow, which per-channel weight quantization absorbs. Every MatMul reading the same X
(Q, K and V projections) shares one s, from the largest weight row among them.

1/s is folded into X's producer where it is a LayerNormalization (its scale and bias) or a Mul by
a constant; otherwise a Mul by 1/s is inserted. s is folded into the weights. The smoothed FP32
model computes the original function (up to float rounding); then calibrate and quantize it.
``channel_absmax`` collects the statistic in one streamed pass (mergeable: an element-wise max).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantkit.backends.ort import ActivationRunner
from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo

MIN_SCALE, MAX_SCALE = 1e-5, 1e5  # keep s away from 0 and inf for dead or tiny channels


@dataclass
class SmoothReport:
    alpha: float
    smoothed: dict[str, list[str]] = field(default_factory=dict)  # activation -> the MatMuls that share its scale
    folded_into: dict[str, str] = field(default_factory=dict)  # activation -> LayerNormalization / Mul node, or "inserted Mul"
    outlier_ratio: dict[str, tuple[float, float]] = field(default_factory=dict)  # activation -> max/median channel absmax, before/after

    def summary(self) -> str:
        count = sum(len(v) for v in self.smoothed.values())
        lines = [f"SmoothQuant (alpha {self.alpha}): {count} MatMul/Gemm on {len(self.smoothed)} activation(s)"]
        for act, (before, after) in list(self.outlier_ratio.items())[:10]:
            lines.append(f"  {act}: channel max/median {before:.1f} -> {after:.1f} ({self.folded_into[act]})")
        return "\n".join(lines)


def channel_absmax(model: ModelInfo, tensors: Sequence[str], batches: Iterable[Any]) -> dict[str, np.ndarray]:
    """max |x| per channel of the last axis, for each tensor, over every batch (one FP32 pass)."""
    runner = ActivationRunner(model, list(dict.fromkeys(tensors)))
    found: dict[str, np.ndarray] = {}
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                amax = np.abs(np.asarray(value, np.float64).reshape(-1, value.shape[-1])).max(axis=0)
                found[name] = np.maximum(found[name], amax) if name in found else amax
    finally:
        runner.close()
    if not found:
        raise QuantkitError("SmoothQuant needs calibration data: the data yielded no batch", option="data")
    return found


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def smoothable(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation -> the MatMuls (and Gemms without transA) reading it with a constant 2-D weight."""
    consts = _weights(proto)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[0] in consts or node.input[1] not in consts:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or consts[node.input[1]].ndim != 2:
            continue
        groups.setdefault(node.input[0], []).append(node)
    return groups


def smooth_model(model: ModelInfo, batches: Iterable[Any], alpha: float = 0.5) -> tuple[onnx.ModelProto, SmoothReport]:
    """The smoothed FP32 model (see the module docstring) and what was done."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QuantkitError(f"alpha must be in [0, 1], got {alpha!r}", option="alpha")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    groups = smoothable(proto)
    if not groups:
        raise QuantkitError(f"{model.path} has no MatMul/Gemm with a constant weight to smooth")
    stats = channel_absmax(model, list(groups), batches)
    inits = {i.name: i for i in proto.graph.initializer}
    consts = _weights(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    report = SmoothReport(float(alpha))
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (inserted Mul, the node it goes before)
    for act, matmuls in groups.items():
        # only when every reader of the activation is a smoothed MatMul: other readers need the original X
        if {id(r) for r in readers.get(act, [])} != {id(m) for m in matmuls}:
            continue
        rows = []
        for m in matmuls:
            w = consts[m.input[1]]
            transposed = any(a.name == "transB" and a.i for a in m.attribute)
            rows.append(np.abs(w.T if transposed else w).max(axis=1))
        w_max = np.max(rows, axis=0).astype(np.float64)
        x_max = stats[act]
        if x_max.shape != w_max.shape:
            continue
        s = np.where((x_max > 0) & (w_max > 0), x_max**alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, MIN_SCALE, MAX_SCALE)
        inv = (1.0 / s).astype(np.float32)
        for m in matmuls:  # W' = diag(s) W: each input channel's row grows by s
            transposed = any(a.name == "transB" and a.i for a in m.attribute)
            w = consts[m.input[1]].astype(np.float64)
            scaled = (w * s[None, :]) if transposed else (w * s[:, None])
            name = m.input[1] if len([r for r in readers.get(m.input[1], [])]) == 1 else f"{m.input[1]}_{m.name}_smoothed"
            if name == m.input[1]:
                inits[name].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))
            else:
                proto.graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), name))
                m.input[1] = name
        producer = producers.get(act)
        folded = _fold_into(producer, inv, inits, readers) if producer is not None else None
        if folded is None:
            scaled_act = f"{act}_smoothed"
            scale_name = f"{act}_smooth_scale"
            proto.graph.initializer.append(numpy_helper.from_array(inv, scale_name))
            mul = helper.make_node("Mul", [act, scale_name], [scaled_act], name=f"{act}_SmoothQuant")
            for m in matmuls:
                m.input[0] = scaled_act
            new_nodes.append((mul, matmuls[0]))
            folded = "inserted Mul"
        report.smoothed[act] = [m.name for m in matmuls]
        report.folded_into[act] = folded
        after = x_max / s
        report.outlier_ratio[act] = (_ratio(x_max), _ratio(after))
    if new_nodes:  # each Mul right before the first MatMul that reads it, so the order stays topological
        nodes = list(proto.graph.node)
        for mul, before in new_nodes:
            nodes.insert(next(i for i, n in enumerate(nodes) if n is before), mul)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto, report


def _ratio(amax: np.ndarray) -> float:
    median = float(np.median(amax))
    return float(amax.max() / median) if median > 0 else float("inf")


def _fold_into(producer: onnx.NodeProto, inv: np.ndarray, inits: dict[str, onnx.TensorProto], readers: dict) -> str | None:
    """Scale the producer's output by ``inv`` through its own constants; the node's name, or None."""

    def can_scale(name: str | None) -> bool:
        if name is None or name not in inits or len(readers.get(name, [])) != 1:
            return False
        return numpy_helper.to_array(inits[name]).shape in ((inv.shape[0],), (1,), ())

    def scale(name: str) -> None:
        value = numpy_helper.to_array(inits[name]).astype(np.float64)
        inits[name].CopyFrom(numpy_helper.from_array((np.broadcast_to(value, inv.shape) * inv).astype(np.float32), name))

    if producer.op_type == "LayerNormalization" and len(producer.input) >= 2:
        beta = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
        if can_scale(producer.input[1]) and (beta is None or can_scale(beta)):  # both checked before either changes
            scale(producer.input[1])
            if beta is not None:
                scale(beta)
            return f"LayerNormalization {producer.name}"
        return None
    if producer.op_type == "Mul" and len(producer.input) == 2:
        for slot in (1, 0):
            if can_scale(producer.input[slot]):
                scale(producer.input[slot])
                return f"Mul {producer.name}"
    return None
