"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights before INT8.

For a MatMul/Gemm Y = X W with a constant W [K, N], per input channel k:
    s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)
and Y = (X / s) (s W): the product is unchanged, the activation's outlier channels shrink and the
weights' rows grow, which per-channel weight quantization absorbs. Every MatMul reading the same X
(Q, K and V projections) shares one s, from the largest weight row among them.

alpha is chosen per activation by default ("auto"): on a fixed-size row sample of X kept during
the same streamed pass, the INT8 error of X W (per-tensor activation scale from X's observed
maxima, per-channel weights) is measured for no smoothing and for each alpha of ``ALPHA_GRID``,
and the smallest wins. One alpha for every layer is the paper's recipe for decoder LLMs; on a
post-LN encoder it hurts (all-MiniLM-L6-v2, bench/encoder.py: embedding cosine 0.973 at alpha 0.5,
0.993 at 0.8, against 0.985 without smoothing), because the best alpha differs by layer.

1/s is folded into X's producer where it is a LayerNormalization (its scale and bias) or a Mul by
a constant and the MatMuls are X's only readers; otherwise a Mul by 1/s is inserted before the
MatMuls (a post-LN encoder's LayerNorm output also feeds the residual Add, which needs X itself).
s is folded into the weights. The smoothed FP32 model computes the original function (up to float
rounding); then calibrate and quantize it. ``channel_statistics`` collects the maxima and the row
sample in one streamed pass (memory bounded by ``SAMPLE_ROWS``, independent of the sample count).
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
from quantkit.model import ModelInfo, lifted_constants

MIN_SCALE, MAX_SCALE = 1e-5, 1e5  # keep s away from 0 and inf for dead or tiny channels
#: the alphas "auto" tries per activation, besides leaving it unsmoothed
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
#: rows of each activation kept (reservoir-sampled) for the alpha search
SAMPLE_ROWS = 512


@dataclass
class SmoothReport:
    alpha: float | str  # the requested alpha, or "auto"
    smoothed: dict[str, list[str]] = field(default_factory=dict)  # activation -> the MatMuls that share its scale
    folded_into: dict[str, str] = field(default_factory=dict)  # activation -> LayerNormalization / Mul node, or "inserted Mul"
    outlier_ratio: dict[str, tuple[float, float]] = field(default_factory=dict)  # activation -> max/median channel absmax, before/after
    chosen_alpha: dict[str, float | None] = field(default_factory=dict)  # activation -> alpha applied (None: left as it was)
    #: activation -> INT8 SQNR (dB) of its MatMuls' outputs on the row sample, without and with smoothing
    matmul_sqnr: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self, limit: int = 12) -> str:
        count = sum(len(v) for v in self.smoothed.values())
        kept = sum(1 for a in self.chosen_alpha.values() if a is None)
        lines = [f"SmoothQuant (alpha {self.alpha}): {count} MatMul/Gemm on {len(self.smoothed)} activation(s)"]
        if kept:
            lines[0] += f"; {kept} activation(s) left unsmoothed (smoothing did not lower their INT8 error)"
        for act in list(self.chosen_alpha)[:limit]:
            before, after = self.matmul_sqnr.get(act, (float("nan"), float("nan")))
            alpha = self.chosen_alpha[act]
            if alpha is None:
                lines.append(f"  {act}: unsmoothed, INT8 MatMul SQNR {before:.1f} dB")
                continue
            ratio = self.outlier_ratio[act]
            lines.append(
                f"  {act}: alpha {alpha:g}, INT8 MatMul SQNR {before:.1f} -> {after:.1f} dB, "
                f"channel max/median {ratio[0]:.1f} -> {ratio[1]:.1f} ({self.folded_into[act]})"
            )
        if len(self.chosen_alpha) > limit:
            lines.append(f"  ... and {len(self.chosen_alpha) - limit} more")
        return "\n".join(lines)


class RowReservoir:
    """A uniform sample of at most ``capacity`` rows from a stream (reservoir sampling, seeded, so
    the same stream gives the same sample)."""

    def __init__(self, capacity: int = SAMPLE_ROWS, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.rows: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        n = len(rows)
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        room = max(0, self.capacity - len(self.rows))
        if room:
            self.rows = np.concatenate([self.rows, rows[:room].astype(np.float32)])
        rest = np.arange(room, n)
        if len(rest):
            slots = self._rng.integers(0, self.seen + rest + 1)  # row t replaces slot j < capacity with p = capacity / (t + 1)
            hit = slots < self.capacity
            self.rows[slots[hit]] = rows[rest[hit]]  # in stream order: a later row wins a shared slot
        self.seen += n


def channel_statistics(
    model: ModelInfo, tensors: Sequence[str], batches: Iterable[Any], sample_rows: int = SAMPLE_ROWS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per tensor: max |x| per channel of the last axis over every batch, and a reservoir sample
    of its rows (one FP32 pass; both mergeable: an element-wise max, a reservoir)."""
    runner = ActivationRunner(model, list(dict.fromkeys(tensors)))
    found: dict[str, np.ndarray] = {}
    samples: dict[str, RowReservoir] = {}
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                rows = np.asarray(value).reshape(-1, value.shape[-1])
                amax = np.abs(rows.astype(np.float64)).max(axis=0)
                found[name] = np.maximum(found[name], amax) if name in found else amax
                if sample_rows:
                    samples.setdefault(name, RowReservoir(sample_rows)).add(rows)
    finally:
        runner.close()
    if not found:
        raise QuantkitError("SmoothQuant needs calibration data: the data yielded no batch", option="data")
    return found, {k: r.rows for k, r in samples.items() if r.rows is not None}


def _quantize_symmetric(x: np.ndarray, scale: np.ndarray | float, qmax: int = 127) -> np.ndarray:
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale


def int8_matmul_error(rows: np.ndarray, x_max: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray | None) -> tuple[float, float]:
    """Squared error of INT8 X/s · (s W) against X W, summed over ``weights`` ([K, N] each), and the
    reference energy. The activation's scale comes from its observed channel maxima (what a
    max-based calibration of the smoothed model gives), the weights' per output channel."""
    x = rows.astype(np.float64)
    s = np.ones(x.shape[1]) if s is None else s
    amax = float(np.max(x_max / s))
    xq = _quantize_symmetric(x / s, max(amax, 1e-30) / 127)
    err = energy = 0.0
    for w in weights:
        ws = w.astype(np.float64) * s[:, None]
        w_scale = np.maximum(np.abs(ws).max(axis=0), 1e-30) / 127
        ref = x @ w
        err += float(np.sum((xq @ _quantize_symmetric(ws, w_scale[None, :]) - ref) ** 2))
        energy += float(np.sum(ref**2))
    return err, energy


def _sqnr(err: float, energy: float) -> float:
    return float("inf") if err == 0 else 10 * np.log10(max(energy, 1e-300) / err)


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    s = np.where((x_max > 0) & (w_max > 0), x_max**alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(s, MIN_SCALE, MAX_SCALE)


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def smoothable(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation -> the MatMuls (and Gemms without transA) reading it with a constant 2-D weight (an
    initializer, or a Constant node's tensor) that nothing else reads."""
    consts = _weights(lifted_constants(proto))
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[0] in consts or node.input[1] not in consts:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or consts[node.input[1]].ndim != 2:
            continue
        groups.setdefault(node.input[0], []).append(node)
    readers: dict[str, set[int]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(id(node))
    # a weight also read elsewhere (an unrolled RNN's steps share one) would be copied per reader:
    # the model would grow by a copy of it per step, so such an activation is left as it is
    return {act: mms for act, mms in groups.items() if all(readers[m.input[1]] <= {id(n) for n in mms} for m in mms)}


def check_alpha(alpha: Any) -> float | str:
    """``alpha`` as smooth_model takes it: "auto", or a number in [0, 1] (a string from the CLI too)."""
    if isinstance(alpha, str):
        if alpha.strip().lower() == "auto":
            return "auto"
        try:
            alpha = float(alpha)
        except ValueError:
            raise QuantkitError(f"alpha must be 'auto' or a number in [0, 1], got {alpha!r}", option="alpha") from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QuantkitError(f"alpha must be 'auto' or a number in [0, 1], got {alpha!r}", option="alpha")
    return float(alpha)


def smooth_model(model: ModelInfo, batches: Iterable[Any], alpha: float | str = "auto") -> tuple[onnx.ModelProto, SmoothReport]:
    """The smoothed FP32 model (see the module docstring) and what was done."""
    alpha = check_alpha(alpha)
    proto = lifted_constants(model.proto)  # a copy, whose weights are all initializers
    groups = smoothable(proto)
    if not groups:
        raise QuantkitError(
            f"{model.path} has no MatMul/Gemm with a constant weight to smooth (a weight that other nodes read too, as an "
            "unrolled RNN's steps share theirs, is left: smoothing would copy it per reader)"
        )
    stats, samples = channel_statistics(model, list(groups), batches)
    inits = {i.name: i for i in proto.graph.initializer}
    consts = _weights(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    report = SmoothReport(alpha)
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (inserted Mul, the node it goes before)
    for act, matmuls in groups.items():
        kn = [_as_kn(consts[m.input[1]], m) for m in matmuls]  # each MatMul's weight as [K, N]
        w_max = np.max([np.abs(w).max(axis=1) for w in kn], axis=0).astype(np.float64)
        x_max = stats.get(act)
        if x_max is None or x_max.shape != w_max.shape:
            continue
        s = _chosen_scale(report, act, samples.get(act), x_max, w_max, kn, alpha)
        if s is None:
            continue
        _scale_weights(matmuls, s, consts, inits)
        # other readers (a post-LN transformer's residual Add) need the original X: the MatMuls then
        # read X/s through an inserted Mul, and the producer keeps its constants
        shared = {id(r) for r in readers.get(act, [])} != {id(m) for m in matmuls}
        inv = (1.0 / s).astype(np.float32)
        producer = producers.get(act)
        folded = _fold_into(producer, inv, inits, readers) if producer is not None and not shared else None
        if folded is None:
            new_nodes.append((_divide_input(proto, act, inv, matmuls), matmuls[0]))
            folded = "inserted Mul"
        report.smoothed[act] = [m.name for m in matmuls]
        report.folded_into[act] = folded
        report.outlier_ratio[act] = (_ratio(x_max), _ratio(x_max / s))
    if new_nodes:  # each Mul right before the first MatMul that reads it, so the order stays topological
        nodes = list(proto.graph.node)
        for mul, before in new_nodes:
            nodes.insert(next(i for i, n in enumerate(nodes) if n is before), mul)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto, report


def _transposed(m: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in m.attribute)


def _as_kn(w: np.ndarray, m: onnx.NodeProto) -> np.ndarray:
    return w.T if _transposed(m) else w


def _chosen_scale(
    report: SmoothReport, act: str, rows: np.ndarray | None, x_max: np.ndarray, w_max: np.ndarray, kn: list[np.ndarray], alpha: float | str
) -> np.ndarray | None:
    """The smoothing scale for one activation (None: leave it), recording alpha and the MatMuls' SQNR before and after.

    ``alpha="auto"``: the grid's alpha with the smallest INT8 MatMul error on the sampled rows, or
    none where no alpha beats the unsmoothed error."""
    plain = int8_matmul_error(rows, x_max, kn, None) if rows is not None else (float("nan"), float("nan"))
    if alpha == "auto":
        if rows is None:
            return None
        tried = {a: int8_matmul_error(rows, x_max, kn, smoothing_scale(x_max, w_max, a)) for a in ALPHA_GRID}
        best = min(tried, key=lambda a: tried[a][0])
        if tried[best][0] >= plain[0]:
            report.chosen_alpha[act] = None
            report.matmul_sqnr[act] = (_sqnr(*plain), _sqnr(*plain))
            return None
        chosen, after_err = best, tried[best]
    else:
        chosen = alpha
        after_err = int8_matmul_error(rows, x_max, kn, smoothing_scale(x_max, w_max, alpha)) if rows is not None else plain
    report.chosen_alpha[act] = chosen
    report.matmul_sqnr[act] = (_sqnr(*plain), _sqnr(*after_err))
    return smoothing_scale(x_max, w_max, chosen)


def _scale_weights(matmuls: list[onnx.NodeProto], s: np.ndarray, consts: dict, inits: dict) -> None:
    """W' = diag(s) W: each input channel's row grows by s (in place: ``smoothable`` keeps only weights
    that their MatMuls alone read)."""
    for m in matmuls:
        w = consts[m.input[1]].astype(np.float64)
        scaled = (w * s[None, :]) if _transposed(m) else (w * s[:, None])
        inits[m.input[1]].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), m.input[1]))


def _divide_input(proto: onnx.ModelProto, act: str, inv: np.ndarray, matmuls: list[onnx.NodeProto]) -> onnx.NodeProto:
    """X / s through an inserted Mul that the MatMuls read instead of X; returns the Mul (not yet placed)."""
    scaled_act, scale_name = f"{act}_smoothed", f"{act}_smooth_scale"
    proto.graph.initializer.append(numpy_helper.from_array(inv, scale_name))
    for m in matmuls:
        m.input[0] = scaled_act
    return helper.make_node("Mul", [act, scale_name], [scaled_act], name=f"{act}_SmoothQuant")


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
