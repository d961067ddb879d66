"""INT4 weight-only quantization, block-wise, for MatMul/Gemm weights (TensorRT's and onnxruntime's
weight-only path for MatMul-heavy models).

Each constant weight [K, N] becomes int4 values in blocks of ``block_size`` along K, with one
float32 scale per block and output column, read by an opset-21 ``DequantizeLinear`` with
``block_size``; activations stay float. Values are symmetric in [-8, 7], scale = clip * amax / 7.

Rounding is round-to-nearest. The clip search (AWQ-style, ``clip_search``) picks each block's
clip ratio to minimise the MatMul's output error: with per-input-channel activation second
moments m_k = E[x_k^2] (from ``activation_moments``, one pass over calibration data), the
expected squared output error of a column is sum_k m_k (w_k - q_k)^2 for uncorrelated channels,
so channels that carry large activations are kept accurate first. Without data every channel
weighs the same (plain weight MSE).

With ``rounding`` data, the integers are chosen by GPTQ (``quantkit.export.rounding``) on the
scales the clip search chose: H = E[x x^T] of each MatMul's input from one more FP32 pass, each
input row rounded on its own block's scale and its error spread over the rows not yet rounded;
per output column the result is kept only where its output error is below round-to-nearest's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.errors import QuantkitError
from quantkit.export.qdq import prepare_model, record_quantization
from quantkit.export.rounding import input_hessians, round_rows
from quantkit.export.statistics import channel_moments
from quantkit.model import ModelInfo
from quantkit.options import INT4_BLOCK_SIZES
from quantkit.plan import NodeFilter

INT4_OPSET = 21  # DequantizeLinear with block_size and the int4 type
CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))


@dataclass
class Int4Report:
    block_size: int
    clip_search: bool
    weighted_by_activations: bool
    quantized: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (K, N)
    kept_float: dict[str, str] = field(default_factory=dict)
    weight_error_db: dict[str, float] = field(default_factory=dict)  # node -> SQNR of the dequantized weight
    bytes_before: int = 0
    bytes_after: int = 0
    rounding: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (RTN output error, GPTQ's)

    def summary(self) -> str:
        how = "clip search weighted by activations" if self.weighted_by_activations else "clip search" if self.clip_search else "rounding"
        lines = [
            f"{len(self.quantized)} MatMul/Gemm weight(s) in int4 (blocks of {self.block_size} along K, "
            f"{how}): "
            f"weights {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB"
        ]
        if self.weight_error_db:
            worst = min(self.weight_error_db, key=self.weight_error_db.get)  # type: ignore[arg-type]
            lines.append(f"worst weight SQNR {self.weight_error_db[worst]:.1f} dB ({worst})")
        if self.rounding:
            gains = [10 * np.log10(a / b) for a, b in self.rounding.values() if a > 0 and b > 0]
            lines.append(
                f"optimized rounding (GPTQ): {len(self.rounding)} weight(s), output error "
                f"{np.mean(gains or [0.0]):.1f} dB below round-to-nearest on average"
            )
        if self.kept_float:
            lines += [f"left in float: {n} ({r})" for n, r in list(self.kept_float.items())[:10]]
        return "\n".join(lines)


def quantize_blocks(w: np.ndarray, block_size: int, moments: np.ndarray | None, clip_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """int4 values [K, N] and scales [K / block_size, N] for w [K, N]; see the module docstring."""
    k, n = w.shape
    blocks = w.astype(np.float64).reshape(k // block_size, block_size, n)
    weights = moments.reshape(k // block_size, block_size, 1) if moments is not None else np.ones((k // block_size, block_size, 1))
    amax = np.abs(blocks).max(axis=1)  # [blocks, N]
    best_err = np.full(amax.shape, np.inf)
    best_scale = np.where(amax > 0, amax / 7.0, 1.0)
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scale = np.where(amax > 0, ratio * amax / 7.0, 1.0)
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7)
        err = np.sum(weights * (blocks - q * scale[:, None, :]) ** 2, axis=1)
        better = err < best_err - 1e-15  # ties keep the larger ratio (less clipping)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    scale32 = best_scale.astype(np.float32)
    q = np.clip(np.round(blocks / scale32[:, None, :].astype(np.float64)), -8, 7).astype(np.int8)
    return q.reshape(k, n), scale32


def _gptq_blocks(
    w: np.ndarray, q: np.ndarray, scales: np.ndarray, hessian: tuple[np.ndarray, int], report: Int4Report, name: str
) -> np.ndarray:
    """GPTQ's integers for w [K, N] on the block scales [K / block, N], never worse than ``q`` (round-to-nearest)."""
    total, rows = hessian
    if not rows or total.shape[0] != w.shape[0]:
        return q
    per_weight = np.repeat(scales.astype(np.float64), w.shape[0] // scales.shape[0], axis=0)  # [K, N]
    found, before, after = round_rows(w.T.astype(np.float64), per_weight.T, total / rows, qmax=7, qmin=-8)
    if after >= before:
        return q
    report.rounding[name] = (before, after)
    return found.T.astype(np.int8)


def activation_moments(model: ModelInfo, tensors: Sequence[str], batches: Any) -> dict[str, np.ndarray]:
    """E[x_k^2] over the last axis of each tensor, streamed over ``batches`` (one FP32 pass)."""
    return channel_moments(model, dict.fromkeys(tensors, -1), batches, power=2)


def _weight_of(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, bool] | None:
    """The constant [K, N] weight of a MatMul/Gemm (and whether Gemm stores it transposed)."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in consts and node.input[0] not in consts:
        w = consts[node.input[1]]
        return (w, False) if w.ndim == 2 else None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in consts:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        w = consts[node.input[1]]
        return (w.T, True) if attrs.get("transB", 0) else (w, False)
    return None


def _candidates(
    proto: onnx.ModelProto, consts: dict[str, np.ndarray], block_size: int, filters: NodeFilter | None, report: Int4Report
) -> dict[str, onnx.NodeProto]:
    """The MatMul/Gemm nodes whose weights can go to int4; why each other one stays float."""
    candidates = {}
    for node in proto.graph.node:
        found = _weight_of(node, consts)
        if found is None:
            continue
        w, _ = found
        refused = filters.refusal(node.name, node.op_type) if filters is not None else ""
        if refused:
            report.kept_float[node.name] = refused
        elif w.dtype != np.float32:
            report.kept_float[node.name] = f"weight is {w.dtype}"
        elif w.shape[0] % block_size:
            report.kept_float[node.name] = f"K = {w.shape[0]} is not a multiple of the block size {block_size}"
        else:
            candidates[node.name] = node
    return candidates


def quantize_int4_weights(
    model: ModelInfo,
    *,
    block_size: int = 128,
    clip_search: bool = True,
    calibration: Any = None,
    filters: NodeFilter | None = None,
    rounding: Any = None,
) -> tuple[onnx.ModelProto, Int4Report]:
    """The model with its MatMul/Gemm weights in block-wise int4 (see the module docstring).

    ``calibration``: batches (``quantkit.data.batches``) for the activation moments of the clip
    search; None weighs every input channel the same. ``filters``: the nodes it may quantize.
    ``rounding``: batches for GPTQ's H (a second pass); None rounds to nearest.
    """
    if isinstance(block_size, bool) or block_size not in INT4_BLOCK_SIZES:
        raise QuantkitError(
            f"block_size must be one of {INT4_BLOCK_SIZES} (TensorRT's INT4 block sizes), got {block_size!r}", option="block_size"
        )
    proto, _ = prepare_model(model, INT4_OPSET)
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    report = Int4Report(block_size, clip_search, calibration is not None)
    candidates = _candidates(proto, consts, block_size, filters, report)
    if not candidates:
        why = "; ".join(sorted({r for r in report.kept_float.values()}))[:200] or "none has a constant 2-D weight"
        raise QuantkitError(
            f"{model.path}: no MatMul/Gemm is left to quantize to int4 ({why}); check the node filters and the block size",
            option="format",
        )
    moments = activation_moments(model, [n.input[0] for n in candidates.values()], calibration) if calibration is not None else {}
    hessians = input_hessians(model, list(dict.fromkeys(n.input[0] for n in candidates.values())), rounding) if rounding else {}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for t in node.input:
            users[t] = users.get(t, 0) + 1
    new_inits, new_nodes = [], []
    for name, node in candidates.items():
        w, transposed = _weight_of(node, consts)  # type: ignore[misc]
        q, scales = quantize_blocks(w, block_size, moments.get(node.input[0]), clip_search)
        if node.input[0] in hessians:
            q = _gptq_blocks(w, q, scales, hessians[node.input[0]], report, name)
        back = (q.reshape(-1, block_size, w.shape[1]).astype(np.float32) * scales[:, None, :]).reshape(w.shape)
        noise = float(np.sum((back.astype(np.float64) - w) ** 2))
        report.weight_error_db[name] = 10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / noise) if noise > 0 else float("inf")
        base = f"{node.input[1]}_int4" if users.get(node.input[1], 0) == 1 else f"{name}_{node.input[1]}_int4"
        new_inits.append(helper.make_tensor(f"{base}_values", TensorProto.INT4, list(q.shape), q.ravel().tolist()))
        new_inits.append(numpy_helper.from_array(scales, f"{base}_scale"))
        dq_out = f"{base}_dequantized"
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{base}_values", f"{base}_scale"],
                [dq_out],
                name=f"{base}_DequantizeLinear",
                axis=0,
                block_size=block_size,
            )
        )
        if transposed:  # Gemm(transB=1) reads W^T: feed it the [K, N] form and clear transB
            for a in node.attribute:
                if a.name == "transB":
                    a.i = 0
        node.input[1] = dq_out
        report.quantized[name] = (int(w.shape[0]), int(w.shape[1]))
        report.bytes_before += w.size * 4
        report.bytes_after += (w.size + 1) // 2 + scales.size * 4
    proto.graph.initializer.extend(new_inits)
    used = {t for n in proto.graph.node for t in n.input}
    kept = [i for i in proto.graph.initializer if i.name in used or i.name in {x.name for x in new_inits}]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes + nodes)  # the DQs read only initializers: first is topological
    record_quantization(proto, proto, {"format": "int4-weights", "block_size": block_size, "clip_search": clip_search})
    onnx.checker.check_model(proto)
    return proto, report
