"""Placement by measurement on this CPU: int8 only where onnxruntime's integer kernels are faster.

onnxruntime's CPU integer kernels are not faster than its float ones everywhere. Measured on an
AVX2 CPU without VNNI (PP-OCR's classifier, batch 32): a depthwise QLinearConv took 4.2x the
time of the float NCHWc depthwise conv, and the dense QLinearConvs 1.35x. Whether int8 pays
depends on the CPU and the batch, so it is decided by timing, here, where the model will run
(``quantize --target onnxruntime --measure-speed``):

1. the nodes the onnxruntime placement quantizes are put in groups by kernel kind (depthwise,
   grouped, 1x1 and other convolutions, MatMul/Gemm, and the other int8 ops by type);
2. starting from the all-int8 placement, each group in turn is kept in float, and the change
   stays when the model is then faster by more than ``margin`` at every batch size measured
   (each candidate timed interleaved with the current best, median of rounds);
3. the result is compared with FP32 itself, so a CPU where int8 does not pay is named as such.

Nothing is quantized that the plain placement leaves float: a group kept in float drops its own
quantization error (a borderline sample's top-1 may still move either way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantkit.backends.ort import make_session
from quantkit.evaluation.latency import interleaved_batch_ms
from quantkit.export.apply import AppliedPlan, apply_plan
from quantkit.export.fp16 import constant_values
from quantkit.model import ModelInfo
from quantkit.options import ExportOptions
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


def _group_of(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> str:
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            return "depthwise Conv" if w.shape[1] == 1 else "grouped Conv"
        return "1x1 Conv" if all(k == 1 for k in w.shape[2:]) else "Conv"
    if node.op_type in ("MatMul", "Gemm"):
        return "MatMul/Gemm"
    return node.op_type


def kernel_groups(model: ModelInfo, int8_nodes: Sequence[str]) -> dict[str, list[str]]:
    """The quantized nodes by the kind of kernel onnxruntime runs them with, largest group first."""
    weights = constant_values(model.proto.graph)  # initializers and Constant nodes (PaddlePaddle's exports)
    wanted = set(int8_nodes)
    groups: dict[str, list[str]] = {}
    for node in model.proto.graph.node:
        if node.name in wanted:
            groups.setdefault(_group_of(node, weights), []).append(node.name)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def compare_ms(
    models: Sequence[onnx.ModelProto],
    sample: dict[str, np.ndarray],
    batches: Sequence[int],
    threads: int | None = None,
    axes: dict[str, int | None] | None = None,
) -> list[dict[int, float]]:
    """Median latency (ms) of each model at each batch size, timed interleaved."""
    return interleaved_batch_ms([make_session(m, threads=threads, spinning=False) for m in models], sample, batches, axes=axes)


@dataclass
class SpeedChoice:
    applied: AppliedPlan  # the chosen model, with its quantize report
    kept_float: dict[str, list[str]]  # group -> its nodes, kept float because int8 was slower here
    groups: dict[str, int]  # group -> node count
    fp32_ms: dict[int, float]
    all_int8_ms: dict[int, float]
    chosen_ms: dict[int, float]
    plan: PrecisionPlan | None = None  # the plan that builds ``model`` (the user's, plus the float groups)
    trials: list[dict] = field(default_factory=list)

    @property
    def model(self) -> onnx.ModelProto:
        return self.applied.model

    @property
    def int8_pays(self) -> bool:
        return all(self.chosen_ms[b] < self.fp32_ms[b] for b in self.fp32_ms)

    def summary(self) -> str:
        def ms(d: dict[int, float]) -> str:
            return ", ".join(f"batch {b} {v:.2f} ms" for b, v in d.items())

        lines = [
            f"measured on this CPU: FP32 {ms(self.fp32_ms)}; all-int8 {ms(self.all_int8_ms)}; chosen {ms(self.chosen_ms)}",
        ]
        if self.kept_float:
            lines.append("kept in float, int8 slower here: " + "; ".join(f"{g} ({len(n)} node(s))" for g, n in self.kept_float.items()))
        if not self.int8_pays:
            lines.append(
                "warning: no int8 placement is faster than FP32 on this CPU at every batch measured; "
                "its integer kernels do not pay here (a CPU with VNNI/AMX int8 instructions may differ): "
                "deploy the FP32 model, or INT8 for size"
            )
        return "\n".join(lines)


def fastest_placement(
    model: ModelInfo,
    ranges: RangeSet,
    options: ExportOptions,
    sample: dict[str, np.ndarray],
    batches: Sequence[int] = (1,),
    *,
    plan: PrecisionPlan | None = None,
    margin: float = 0.03,
    threads: int | None = None,
    range_aware_fp16: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SpeedChoice:
    """The onnxruntime placement with each kernel group kept in float where that is faster here."""
    base = plan or PrecisionPlan()

    def plan_keeping(kept: list[str]) -> PrecisionPlan:
        nodes = dict(base.nodes)
        for name in kept:
            nodes.setdefault(name, "fp32")  # the user's plan wins where it names a node
        return PrecisionPlan(default=base.default, nodes=nodes, fallback=base.fallback)

    def build(kept: list[str]) -> AppliedPlan:
        return apply_plan(model, ranges, plan_keeping(kept), options, range_aware_fp16=range_aware_fp16)

    best = build([])
    groups = kernel_groups(model, best.quantize.int8_nodes)
    fp32_ms, best_ms = compare_ms([model.proto, best.model], sample, batches, threads=threads, axes=model.batch_axes)
    all_int8_ms = dict(best_ms)
    kept_groups: dict[str, list[str]] = {}
    trials: list[dict] = []
    for group, nodes in groups.items():
        candidate = build([n for g in [*kept_groups, group] for n in groups[g]])
        best_again, cand_ms = compare_ms([best.model, candidate.model], sample, batches, threads=threads, axes=model.batch_axes)
        faster = all(cand_ms[b] < best_again[b] * (1 - margin) for b in batches)
        trials.append({"float": group, "nodes": len(nodes), "ms": cand_ms, "against_ms": best_again, "kept": faster})
        if progress:
            progress(
                f"{group} ({len(nodes)} nodes) in float: " + ", ".join(f"b{b} {cand_ms[b]:.2f} vs {best_again[b]:.2f} ms" for b in batches)
            )
        if faster:
            best, best_ms, kept_groups[group] = candidate, cand_ms, nodes
    if kept_groups:  # the verdict against FP32 from one interleaved measurement of both
        fp32_ms, best_ms = compare_ms([model.proto, best.model], sample, batches, threads=threads, axes=model.batch_axes)
    chosen = plan_keeping([n for nodes in kept_groups.values() for n in nodes]) if kept_groups else plan
    return SpeedChoice(best, kept_groups, {g: len(n) for g, n in groups.items()}, fp32_ms, all_int8_ms, best_ms, chosen, trials)
