"""Optimized weight rounding: choose each INT8 weight's rounding (down or up, and beyond) so that
the layer's output on the calibration data stays closest to FP32's, instead of rounding each
weight to its nearest level (Nagel et al., 2020, AdaRound; Frantar et al., 2022, GPTQ).

For a layer y = W x with H = E[x x^T] over its inputs, the output error of weights W_q is

    err(W_q) = sum_rows (w - w_q) H (w - w_q)^T

(one quadratic per output channel). GPTQ quantizes the columns one after another and spreads each
column's rounding error over the columns not yet quantized, weighted by H^-1 (the optimal update
of the Optimal Brain Surgeon); the scale of each output channel stays the one the placement chose
(max |w| / 127), so the model keeps its Q/DQ form and only the integers change. Rows of at most
``EXACT_MAX`` weights are solved exactly instead, by enumerating every floor/ceil choice.

In a Q/DQ model the layer does not see FP32's x but x~, its input as quantized (and as the layers
before it were rounded), so the error that matters is sum ||W x - W_q x~||^2: its float optimum
W' = W C H~^-1 (C = E[x x~^T], H~ = E[x~ x~^T]; ``compensated``) takes back what the input's
quantization costs, and the error is (W' - W_q) H~ (W' - W_q)^T plus a constant, so GPTQ rounds W'
on H~ (the asymmetric calibration of Li et al., 2025, GPTAQ). Fitting FP32's inputs instead made
PP-OCRv4's detector worse than round-to-nearest once its activations were quantized (mask IoU
0.873 against 0.920). The layers are rounded in order, one pass of both models per level of
``layer_levels`` (each cut after the level's inputs), so x~ is the input the rounded model gives.
Per output channel the result is kept only where that exact error on the samples is below the
current integers' (never worse is checked, not assumed).

The sums come from Gemm and MatMul input rows (a constant [in, out] weight is rounded as its
transpose, per output column) and Conv input patches (im2col, per group; a depthwise Conv
gets small ones per channel), at most ``ROWS_PER_BATCH`` positions sampled per batch, the same
positions from both models. Conv with auto_pad or a rank other than 2-D is left to
round-to-nearest.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from quantkit._io import step_bar
from quantkit.backends.ort import ActivationRunner
from quantkit.export.statistics import layer_levels, quantized_layers, upstream
from quantkit.model import ModelInfo

#: rows of at most this many weights are rounded by exhaustive search (2^n floor/ceil choices)
EXACT_MAX = 12
#: input rows (or patches) sampled per batch and layer for H
ROWS_PER_BATCH = 2048
#: GPTQ's dampening: a fraction of H's mean diagonal added to it (Frantar et al. use 1%)
DAMP = 0.01
#: the compensation's ridge toward W, as a fraction of H~'s mean diagonal (``compensated``): with
#: GPTQ's 1% it fitted the calibration samples beyond what held out (a CTC recogniser: output SQNR
#: 26.9 dB on them, 18.5 dB held out; with 100%, 20.8 and 19.0 dB)
COMPENSATION_DAMP = 1.0
#: a layer is rounded only from at least this many sampled input rows per weight of a row (its
#: K): with fewer, the compensation and GPTQ follow the samples rather than the layer (all-MiniLM-L6
#: on 128 sentences: its MatMuls' 2-3k token rows for K = 384 and 1536 took the embedding cosine
#: from 0.987 to 0.759 held out)
MIN_ROWS_PER_WEIGHT = 8
#: layers whose H is larger than this (K x K float64) are left to round-to-nearest
MAX_K = 4608
#: a layer's GPTQ stops after this many seconds, and the layer keeps round-to-nearest
LAYER_SECONDS = 60.0
#: the time the whole rounding may take (its passes and its layers); past it, the layers left keep
#: round-to-nearest and the report says where it stopped
SECONDS = 600.0


@dataclass
class RoundingReport:
    improved: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (RTN error, new error)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = ""  # why it stopped early (its time bound)

    def summary(self) -> str:
        stopped = f"; {self.stopped}" if self.stopped else ""
        if not self.improved:
            return "optimized rounding: no layer improved on round-to-nearest" + stopped
        gain = np.mean([10 * np.log10(a / b) for a, b in self.improved.values() if a > 0 and b > 0] or [0.0])
        return (
            f"optimized rounding (GPTQ): {len(self.improved)} layer(s), output error {gain:.1f} dB below round-to-nearest "
            f"on average, {self.seconds:.1f} s{stopped}"
        )


def quadratic_error(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row: delta H delta^T."""
    return np.einsum("ik,kl,il->i", delta, h, delta)


def _per_weight(scale: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A per-row scale [rows] (int8 per channel) or a per-weight one [rows, K] (int4 blocks), as [rows, K]."""
    return np.broadcast_to(scale[:, None] if scale.ndim == 1 else scale, w.shape)


def exact_rounding(w: np.ndarray, scale: np.ndarray, h: np.ndarray, qmax: int, qmin: int | None = None) -> np.ndarray:
    """The integer rows minimising the quadratic error among floor/ceil choices (exhaustive)."""
    k, scale, qmin = w.shape[1], _per_weight(scale, w), -qmax if qmin is None else qmin
    low = np.floor(w / scale)
    choices = np.array(list(itertools.product((0.0, 1.0), repeat=k)))  # [2^k, k]
    best = np.empty_like(w)
    for r in range(w.shape[0]):
        q = np.clip(low[r][None, :] + choices, qmin, qmax)
        delta = w[r][None, :] - q * scale[r]
        best[r] = q[np.argmin(quadratic_error(delta, h))]
    return best


def gptq(
    w: np.ndarray, scale: np.ndarray, h: np.ndarray, qmax: int, qmin: int | None = None, deadline: float = math.inf
) -> np.ndarray | None:
    """GPTQ's column-by-column rounding of ``w`` [rows, K] on the fixed ``scale`` (per row, or per
    weight for block-wise formats: each column is rounded on its own block's scale); None when
    ``time.monotonic()`` passes ``deadline`` first."""
    k, scale, qmin = w.shape[1], _per_weight(scale, w), -qmax if qmin is None else qmin
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    work = w.astype(np.float64).copy()
    q = np.zeros_like(work)
    for i in range(k):
        if i % 64 == 0 and time.monotonic() > deadline:
            return None
        q[:, i] = np.clip(np.round(work[:, i] / scale[:, i]), qmin, qmax)
        err = (work[:, i] - q[:, i] * scale[:, i]) / hinv[i, i]
        work[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    return q


def round_rows(
    w: np.ndarray, scale: np.ndarray, h: np.ndarray, qmax: int, qmin: int | None = None, seconds: float = LAYER_SECONDS
) -> tuple[np.ndarray, float, float]:
    """The integers for ``w`` (exact when small, else GPTQ within ``seconds``), never worse than
    round-to-nearest per row; with the total errors (round-to-nearest's, the result's)."""
    full, qmin = _per_weight(scale, w), -qmax if qmin is None else qmin
    nearest = np.clip(np.round(w / full), qmin, qmax)
    if w.shape[1] <= EXACT_MAX:
        found = exact_rounding(w, scale, h, qmax, qmin)
    else:
        found = gptq(w, scale, h, qmax, qmin, deadline=time.monotonic() + seconds)
        if found is None:  # out of time: round-to-nearest, and both errors equal
            found = nearest
    e_near = quadratic_error(w - nearest * full, h)
    e_found = quadratic_error(w - found * full, h)
    keep = e_found < e_near
    chosen = np.where(keep[:, None], found, nearest)
    return chosen, float(e_near.sum()), float(np.minimum(e_found, e_near).sum())


def conv_patches(
    x: np.ndarray, attrs: dict[str, Any], kernel: tuple[int, int], rows: int | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """im2col of an NCHW input: [rows, C, kh * kw], one row per output position; with ``rows``, at
    most that many positions drawn by ``rng`` (gathered from a view: the full im2col of a large
    activation is never built)."""
    kh, kw = kernel
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, _, oh, ow = windows.shape[:4]
    if rows is None or n * oh * ow <= rows:
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], kh * kw)
    picked = (rng or np.random.default_rng(0)).choice(n * oh * ow, rows, replace=False)
    b, rest = np.divmod(picked, oh * ow)
    return windows[b, :, rest // ow, rest % ow].reshape(rows, x.shape[1], kh * kw)


@dataclass
class _Layer:
    node: onnx.NodeProto
    tensor: str  # its FP32 input
    weight: str  # the int8 initializer its DequantizeLinear reads
    scale: np.ndarray  # per output channel
    shape: tuple[int, ...]
    groups: int
    qmax: int  # the placement's weight levels: 127 (8 bits) or 63 (onnxruntime's 7)
    fp32_weight: np.ndarray  # [out, ...], as ``shape``
    transposed: bool = False  # stored [in, out] (a MatMul's, a Gemm's without transB): the int8 initializer is the transpose
    hessians: list[np.ndarray] = field(default_factory=list)  # per group: sum of x~ x~^T (x~: its input in the Q/DQ model)
    cross: list[np.ndarray] = field(default_factory=list)  # per group: sum of x~ x^T (x: its FP32 input)
    power: list[np.ndarray] = field(default_factory=list)  # per group: sum of (W x)^2 per output channel
    samples: int = 0

    @property
    def quantized_input(self) -> str:
        return self.node.input[0]

    @functools.cached_property
    def group_weights(self) -> list[np.ndarray]:
        """The FP32 weight as [out, K] rows, split per group (read for every batch: made once)."""
        return np.split(self.fp32_weight.astype(np.float64).reshape(self.shape[0], -1), self.groups)


def _layers(qdq: onnx.ModelProto, fp32: ModelInfo, report: RoundingReport) -> list[_Layer]:
    consts = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    layers, not_constant = quantized_layers(qdq, fp32, ("Conv", "Gemm", "MatMul"))
    report.skipped.update(dict.fromkeys(not_constant, "its FP32 weight is not a constant"))
    found = []
    readers = Counter(layer.dq.input[0] for layer in layers)
    for layer in layers:
        node, dq = layer.node, layer.dq
        if dq.input[0] not in consts:
            continue
        if readers[dq.input[0]] > 1:  # an unrolled RNN's steps: one rounding cannot be each step's own
            report.skipped[node.name] = "its int8 weight is shared with other layers"
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q, scale, w = consts[dq.input[0]], consts.get(dq.input[1]), layer.fp32_weight
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
        reason = _refusal(node, attrs, dq, q, scale, transposed) or ("" if w.shape == q.shape else "its FP32 weight has another shape")
        if reason:
            report.skipped[node.name] = reason
            continue
        q, w = (q.T, w.T) if transposed else (q, w)
        groups = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
        k = int(np.prod(q.shape[1:]))
        if k > MAX_K:
            report.skipped[node.name] = f"{k} weights per row: its H would be too large"
            continue
        found.append(
            _Layer(node, layer.fp32_input, dq.input[0], scale.astype(np.float64), q.shape, groups, int(np.abs(q).max()), w, transposed)
        )
    return found


def _refusal(
    node: onnx.NodeProto, attrs: dict[str, Any], dq: onnx.NodeProto, q: np.ndarray, scale: np.ndarray | None, transposed: bool
) -> str:
    axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
    out_axis = 1 if transposed else 0
    if q.dtype != np.int8 or scale is None or scale.ndim != 1 or axis % q.ndim != out_axis or scale.shape[0] != q.shape[out_axis]:
        return "not per-output-channel int8 weights"
    if node.op_type in ("MatMul", "Gemm") and (q.ndim != 2 or attrs.get("transA", 0)):
        return "a MatMul or Gemm whose weight is not a matrix, or with transA"
    if node.op_type == "Conv" and (q.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return "a Conv that is not 2-D with explicit pads"
    return ""


def _rows(layer: _Layer, x: np.ndarray, seed: int) -> list[np.ndarray]:
    """This batch's input rows of the layer, per group (a Gemm's rows, a Conv's patches), at most
    ``ROWS_PER_BATCH`` drawn by ``seed``: the same seed draws the same positions from the FP32 and
    the quantized input."""
    if layer.node.op_type != "Conv":
        groups = [x.reshape(-1, x.shape[-1])]
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}
        patches = conv_patches(x, attrs, layer.shape[2:], ROWS_PER_BATCH, np.random.default_rng(seed))  # [rows, C, kh * kw]
        cg = layer.shape[1]
        groups = [patches[:, g * cg : (g + 1) * cg, :].reshape(len(patches), -1) for g in range(layer.groups)]
    if len(groups[0]) > ROWS_PER_BATCH:
        picked = np.random.default_rng(seed).choice(len(groups[0]), ROWS_PER_BATCH, replace=False)
        groups = [r[picked] for r in groups]
    return [r.astype(np.float64) for r in groups]


def _accumulate(layer: _Layer, x: np.ndarray, quantized: np.ndarray, seed: int) -> None:
    """Add this batch's rows to the layer's sums of x~ x~^T and x~ x^T, per group."""
    rows, qrows = _rows(layer, x, seed), _rows(layer, quantized, seed)
    w = layer.group_weights
    if not layer.hessians:
        layer.hessians = [np.zeros((r.shape[1], r.shape[1])) for r in rows]
        layer.cross = [np.zeros((r.shape[1], r.shape[1])) for r in rows]
        layer.power = [np.zeros(len(wg)) for wg in w]
    for g, (r, q) in enumerate(zip(rows, qrows, strict=True)):
        layer.hessians[g] += q.T @ q
        layer.cross[g] += q.T @ r
        layer.power[g] += np.sum((r @ w[g].T) ** 2, axis=0)
    layer.samples += len(rows[0])


def input_hessians(model: ModelInfo, tensors: list[str], batches: Any) -> dict[str, tuple[np.ndarray, int]]:
    """E[x x^T] over the last axis of each tensor (a MatMul's input rows), from one streamed FP32
    pass, at most ``ROWS_PER_BATCH`` rows sampled per batch: tensor -> (sum of x x^T, rows)."""
    sums: dict[str, tuple[np.ndarray, int]] = {}
    runner, rng = ActivationRunner(model, tensors), np.random.default_rng(0)
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                rows = np.asarray(value).reshape(-1, np.shape(value)[-1])
                if len(rows) > ROWS_PER_BATCH:
                    rows = rows[rng.choice(len(rows), ROWS_PER_BATCH, replace=False)]
                rows = rows.astype(np.float64)
                total, count = sums.get(name, (np.zeros((rows.shape[1], rows.shape[1])), 0))
                sums[name] = (total + rows.T @ rows, count + len(rows))
    finally:
        runner.close()
    return sums


def _measure(level: list[_Layer], qdq: onnx.ModelProto, fp32: ModelInfo, batches: Callable[[], Any], report: RoundingReport) -> None:
    """One pass over the data through both models, each cut after this level's inputs: the sums
    of each layer's FP32 input x and its input x~ in the Q/DQ model as rounded so far."""
    fp_tensors = list(dict.fromkeys(layer.tensor for layer in level))
    q_tensors = list(dict.fromkeys(layer.quantized_input for layer in level))
    fp_runner = ActivationRunner(dataclasses.replace(fp32, proto=upstream(fp32.proto, fp_tensors)), fp_tensors)
    q_runner = ActivationRunner(dataclasses.replace(fp32, proto=upstream(qdq, q_tensors)), q_tensors)
    try:
        for b, batch in enumerate(batches()):
            x, quantized = fp_runner.run(batch.feeds, batch.ids), q_runner.run(batch.feeds, batch.ids)
            for k, layer in enumerate(level):
                a, q = x.get(layer.tensor), quantized.get(layer.quantized_input)
                if a is None or q is None or a.shape != q.shape:
                    report.skipped[layer.node.name] = "its FP32 and quantized inputs differ in shape"
                    continue
                _accumulate(layer, np.asarray(a), np.asarray(q), seed=b * 100_003 + k)
    finally:
        fp_runner.close()
        q_runner.close()


def optimize_rounding(
    qdq: onnx.ModelProto, fp32: ModelInfo, batches: Callable[[], Any], *, seconds: float = SECONDS, quiet: bool = True
) -> tuple[onnx.ModelProto, RoundingReport]:
    """A copy of the Q/DQ model with each Conv/Gemm's int8 weights rounded to minimise its output
    error against FP32, on its inputs in the Q/DQ model (see the module docstring); level by level,
    ``batches()`` streaming the calibration data anew for each pass, within ``seconds``."""
    start = time.perf_counter()
    deadline = time.monotonic() + seconds
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    report = RoundingReport()
    layers = {layer.node.name: layer for layer in _layers(out, fp32, report)}
    levels = [[layers[n.name] for n in level] for level in layer_levels(out.graph, set(layers))]
    weights = {i.name: i for i in out.graph.initializer}
    bar = step_bar(len(levels), "rounding", "level", quiet)
    for done, level in enumerate(levels):
        if time.monotonic() > deadline:
            report.stopped = f"stopped after {done} of {len(levels)} levels: over {seconds:.0f} s"
            break
        _measure(level, out, fp32, batches, report)
        for layer in level:
            if layer.node.name not in report.skipped:
                _round_layer(layer, weights, report, deadline)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start
    return out, report


def compensated(w: np.ndarray, h: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The float rows W' minimising mean ||W x - W' x~||^2 + damp ||W' - W||^2 over the samples:
    W' = (W C + damp W)(H~ + damp I)^-1, C = E[x x~^T], H~ = E[x~ x~^T] (``cross`` holds C^T): a
    ridge regression toward W, which keeps W where the samples say little."""
    # an input that is always 0 in the quantized model (dead, or all of it: a layer fed zeros) has a
    # zero row in H~ and C; a ridge of 1 there keeps its weight as it is, and H~ + damp invertible
    diag = np.diag(h)
    damp = np.diag(COMPENSATION_DAMP * np.mean(diag) + (diag == 0))
    return np.linalg.solve(h + damp, (w @ cross.T + w @ damp).T).T


def output_error(w_q: np.ndarray, w: np.ndarray, h: np.ndarray, cross: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Per row: the mean of (w x - w_q x~)^2 over the samples, from their sums (per sample):
    w_q H~ w_q^T - 2 w_q (sum x~ x^T) w^T + (w x)^2."""
    return np.einsum("ik,kl,il->i", w_q, h, w_q) - 2 * np.einsum("ik,kl,il->i", w_q, cross, w) + power


def _round_layer(layer: _Layer, weights: dict[str, onnx.TensorProto], report: RoundingReport, deadline: float) -> None:
    """GPTQ on the compensated rows, kept per output channel where its output error (the exact
    one, on the samples) is below that of the integers the layer has."""
    if not layer.samples:
        report.skipped[layer.node.name] = "its input was not seen"
        return
    k = len(layer.hessians[0])
    if layer.samples < MIN_ROWS_PER_WEIGHT * k:
        report.skipped[layer.node.name] = f"{layer.samples} input rows for {k} weights per row: too few to fit (more data would do)"
        return
    w = layer.fp32_weight.astype(np.float64).reshape(layer.shape[0], -1)
    stored = numpy_helper.to_array(weights[layer.weight])
    existing = (stored.T if layer.transposed else stored).reshape(layer.shape[0], -1).astype(np.float64)
    if np.any(np.abs(w - existing * layer.scale[:, None]) > 0.5 * layer.scale[:, None] * (1 + 1e-4) + 1e-7 * np.abs(w).max()):
        report.skipped[layer.node.name] = "its int8 weight is not the FP32 weight rounded (folded into by the placement)"
        return
    rows_per_group = layer.shape[0] // layer.groups
    q = existing.copy()
    before = after = 0.0
    for g in range(layer.groups):
        rows = slice(g * rows_per_group, (g + 1) * rows_per_group)
        h, cross, power = (s[g] / layer.samples for s in (layer.hessians, layer.cross, layer.power))
        seconds = min(LAYER_SECONDS, deadline - time.monotonic())
        found, _, _ = round_rows(compensated(w[rows], h, cross), layer.scale[rows], h, layer.qmax, seconds=seconds)
        scale = layer.scale[rows, None]
        e_old = output_error(existing[rows] * scale, w[rows], h, cross, power)
        e_new = output_error(found * scale, w[rows], h, cross, power)
        q[rows] = np.where((e_new < e_old)[:, None], found, existing[rows])
        before, after = before + float(e_old.sum()), after + float(np.minimum(e_new, e_old).sum())
    if after < before:
        report.improved[layer.node.name] = (before, after)
        rounded = q.reshape(layer.shape).astype(np.int8)
        weights[layer.weight].CopyFrom(numpy_helper.from_array(rounded.T if layer.transposed else rounded, layer.weight))
