"""Per-channel moments of activations, streamed over the data in one FP32 pass (the statistics
the weight algorithms need: int4's clip search weighs channels by E[x^2], bias correction shifts
biases by E[x])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from quantkit.backends.ort import ActivationRunner
from quantkit.export.fp16 import constant_values
from quantkit.model import ModelInfo


def channel_moments(model: ModelInfo, axes: dict[str, int], batches: Any, power: int) -> dict[str, np.ndarray]:
    """E[x_c ** power] per channel c of each tensor, the channel being ``axes[tensor]`` (e.g. 1 for
    a Conv's NCHW input, -1 for a MatMul's), over every other axis and every batch."""
    if not axes:
        return {}
    runner = ActivationRunner(model, list(axes))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(axes, 0)
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                rows = np.moveaxis(np.asarray(value, np.float64), axes[name], -1)
                rows = rows.reshape(-1, rows.shape[-1])
                sums[name] = sums.get(name, 0.0) + np.sum(rows**power, axis=0)
                counts[name] += len(rows)
    finally:
        runner.close()
    return {n: sums[n] / counts[n] for n in axes if counts[n]}


def channel_maxima(model: ModelInfo, axes: dict[str, int], batches: Any) -> dict[str, np.ndarray]:
    """max |x_c| per channel c of each tensor (``axes`` as in ``channel_moments``), over every batch."""
    if not axes:
        return {}
    runner = ActivationRunner(model, list(axes))
    found: dict[str, np.ndarray] = {}
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                rows = np.moveaxis(np.abs(np.asarray(value, np.float64)), axes[name], -1)
                amax = rows.reshape(-1, rows.shape[-1]).max(axis=0)
                found[name] = np.maximum(found[name], amax) if name in found else amax
    finally:
        runner.close()
    return found


@dataclass
class QuantizedLayer:
    """A Conv/Gemm of a Q/DQ model whose weight comes through a DequantizeLinear, with what its
    FP32 original reads (the weight algorithms compare the two)."""

    node: onnx.NodeProto  # in the Q/DQ model
    dq: onnx.NodeProto  # the DequantizeLinear of its weight
    fp32_input: str  # its activation input in the FP32 model
    fp32_weight: np.ndarray


def quantized_layers(
    qdq: onnx.ModelProto, fp32: ModelInfo, ops: tuple[str, ...] = ("Conv", "Gemm")
) -> tuple[list[QuantizedLayer], list[str]]:
    """Every node of ``ops`` (Conv, Gemm; MatMul where asked) with a dequantized weight as its
    second input and an FP32 original of the same name, and the names of those whose FP32 weight
    is not a constant (initializers and Constant nodes count: opset-11 exports keep weights in
    Constant nodes)."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    originals = {n.name: n for n in fp32.proto.graph.node}
    fp32_consts = constant_values(fp32.proto.graph)
    found, not_constant = [], []
    for node in qdq.graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ops and len(node.input) > 1 else None
        original = originals.get(node.name)
        if dq is None or dq.op_type != "DequantizeLinear" or original is None:
            continue  # a weight left float, or a node the placement renamed
        if original.input[1] not in fp32_consts:
            not_constant.append(node.name)
            continue
        found.append(QuantizedLayer(node, dq, original.input[0], fp32_consts[original.input[1]]))
    return found, not_constant


def layer_levels(graph: onnx.GraphProto, targets: set[str]) -> list[list[onnx.NodeProto]]:
    """The ``targets`` (node names) grouped by how many targets lie on their longest path from the
    inputs: a level's means depend only on the biases of the levels before it, so one pass per
    level corrects them all as a pass per layer would (graph order is topological in ONNX)."""
    depth: dict[str, int] = {}
    levels: list[list[onnx.NodeProto]] = []
    for node in graph.node:
        level = max((depth.get(t, 0) for t in node.input), default=0)
        if node.name in targets:
            level += 1
            if len(levels) < level:
                levels.append([])
            levels[level - 1].append(node)
        for out in node.output:
            depth[out] = level
    return levels


def upstream(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing ``tensors`` and what they need, nothing after: the early
    levels' passes run a small part of the network (a graph with subgraphs is kept whole, as its
    nodes read outer tensors implicitly)."""
    graph = model.graph
    keep = [True] * len(graph.node)
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        needed, keep = set(tensors), [False] * len(graph.node)
        for i in range(len(graph.node) - 1, -1, -1):
            node = graph.node[i]
            if needed.intersection(node.output):
                keep[i] = True
                needed.update(node.input)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:]
    pruned.graph.node.extend(n for n, k in zip(graph.node, keep, strict=True) if k)
    del pruned.graph.output[:]
    pruned.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    return pruned
