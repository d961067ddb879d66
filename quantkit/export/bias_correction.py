"""Bias correction (Nagel et al., 2019, section 4.2; NNCF's "fast bias correction"): quantizing a
layer's weights shifts the expected value of its output, and the shift is the same for every
sample on average, so it can be taken back in the bias.

For y = W x + b with quantized weights W_q = W + dW, the expected output shift per output channel is

    E[y_q - y] = dW E[x]     (Gemm; for a Conv, the kernel's dW summed over its window, times
                              each input channel's mean E[x_c]: exact away from the padded border)

with E[x] the per-channel mean of the layer's FP32 input over the calibration data (one streamed
pass). The corrected bias is b - dW E[x]. dW is read from the Q/DQ model itself (its
DequantizeLinear weights against the FP32 weights), so the correction is exactly for the weights
it ships, at their bit width. Only the weight term is corrected (the empirical form's activation
quantization noise is not): the cheap form the issue asks for first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantkit.export.statistics import channel_moments, quantized_layers
from quantkit.model import ModelInfo


@dataclass
class BiasReport:
    corrected: dict[str, float] = field(default_factory=dict)  # node -> largest |shift| / its output's weight scale
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"bias correction: {len(self.corrected)} layer(s) corrected for the mean shift of their quantized weights"
        return line + (f" ({len(self.skipped)} skipped)" if self.skipped else "")


def expected_shift(delta_w: np.ndarray, input_mean: np.ndarray, op: str, group: int = 1, trans_b: int = 0) -> np.ndarray:
    """E[W_q x - W x] per output channel (see the module docstring)."""
    if op == "Gemm":
        return delta_w @ input_mean if trans_b else input_mean @ delta_w
    summed = delta_w.reshape(delta_w.shape[0], delta_w.shape[1], -1).sum(axis=2)  # [out, in/group]
    if group == 1:
        return summed @ input_mean
    per_group = summed.shape[1]
    out_per_group = delta_w.shape[0] // group
    channels = np.arange(delta_w.shape[0]) // out_per_group  # the group of each output channel
    means = np.stack([input_mean[g * per_group : (g + 1) * per_group] for g in channels])
    return np.sum(summed * means, axis=1)


def _dequantized(dq: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The DequantizeLinear's constant weights as floats, and its scale broadcast to them."""
    if any(t not in consts for t in dq.input[:2]):
        return None
    q, scale = consts[dq.input[0]].astype(np.float64), consts[dq.input[1]].astype(np.float64)
    zero = consts[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] in consts else 0.0
    axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return (q - zero) * scale, np.broadcast_to(scale, q.shape)


def _rounding_only(delta: np.ndarray, step: np.ndarray, w: np.ndarray) -> bool:
    """Whether W_q is W rounded to its grid: every error within half a step (a scale folded in by
    the placement, e.g. BatchNorm for onnxruntime, moves weights much further)."""
    return bool(np.all(np.abs(delta) <= 0.5 * step * (1 + 1e-4) + 1e-7 * np.abs(w).max()))


def _targets(qdq: onnx.ModelProto, fp32: ModelInfo, report: BiasReport) -> list[tuple[onnx.NodeProto, np.ndarray, str, int]]:
    """(node in the Q/DQ model, dW, FP32 input tensor, channel axis) for every correctable layer."""
    consts = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    found = []
    for layer in quantized_layers(qdq, fp32)[0]:
        node, dq = layer.node, layer.dq
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            report.skipped[node.name] = "Gemm with transA"
            continue
        read = _dequantized(dq, consts)
        w = layer.fp32_weight.astype(np.float64)
        if read is None or read[0].shape != w.shape:
            report.skipped[node.name] = "its weight is not a constant of the FP32 model's shape"
            continue
        delta = read[0] - w
        if not _rounding_only(delta, read[1], w):
            report.skipped[node.name] = "its quantized weight is not the FP32 weight rounded (folded into by the placement)"
            continue
        found.append((node, delta, layer.fp32_input, 1 if node.op_type == "Conv" else -1))
    return found


def _set_bias(qdq: onnx.ModelProto, node: onnx.NodeProto, shift: np.ndarray) -> None:
    """bias - shift, written as a new initializer of this node (a shared bias stays as it was)."""
    inits = {i.name: i for i in qdq.graph.initializer}
    old = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
    dtype = old.dtype if old is not None else np.float32
    base = old.astype(np.float64).reshape(-1) if old is not None else np.zeros(shift.shape)
    name = f"{node.name}_bias_corrected"
    qdq.graph.initializer.append(numpy_helper.from_array((base - shift).astype(dtype), name))
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def correct_biases(qdq: onnx.ModelProto, fp32: ModelInfo, batches: Any) -> tuple[onnx.ModelProto, BiasReport]:
    """A copy of the Q/DQ model ``qdq`` (made from ``fp32``) with each quantized Conv/Gemm's bias
    corrected by the expected shift of its quantized weights, E[x] from ``batches``."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    report = BiasReport()
    targets = _targets(out, fp32, report)
    means = channel_moments(fp32, {t: axis for _, _, t, axis in targets}, batches, power=1)
    for node, delta_w, tensor, _ in targets:
        mean = means.get(tensor)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        width = delta_w.shape[1] * int(attrs.get("group", 1)) if node.op_type == "Conv" else None
        if mean is None or (width is not None and mean.shape[0] != width):
            report.skipped[node.name] = "no mean for its input"
            continue
        shift = expected_shift(delta_w, mean, node.op_type, int(attrs.get("group", 1)), int(attrs.get("transB", 0)))
        if len(node.input) > 2 and node.input[2]:
            bias_shape = next((i.dims for i in out.graph.initializer if i.name == node.input[2]), None)
            if bias_shape is None or list(bias_shape) != [shift.shape[0]]:
                report.skipped[node.name] = "its bias is not a constant vector"
                continue
        _set_bias(out, node, shift)
        report.corrected[node.name] = float(np.max(np.abs(shift)))
    used = {t for n in out.graph.node for t in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out, report
