"""Test helper: simulate int8 activations by inserting QuantizeLinear/DequantizeLinear pairs.

Every calibrated activation gets a symmetric int8 Q/DQ (zero point 0, scale = amax/127 from the
ranges), weights stay FP32. This measures the quality of the *ranges* alone, independently of
any Q/DQ placement policy, by running the result in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantkit.ranges import RangeSet


def activation_fakequant(model: onnx.ModelProto, ranges: RangeSet, method: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph_outputs = {o.name for o in graph.output}
    new_nodes = []
    renamed: dict[str, str] = {}
    for name in ranges.tensors:
        if name in graph_outputs:
            continue
        scale = ranges.tensors[name].scale(method)
        q, dq = f"{name}__q", f"{name}__dq"
        graph.initializer.append(helper.make_tensor(f"{name}__scale", TensorProto.FLOAT, [], [scale]))
        graph.initializer.append(helper.make_tensor(f"{name}__zp", TensorProto.INT8, [], [0]))
        new_nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}__scale", f"{name}__zp"], [q]))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, f"{name}__scale", f"{name}__zp"], [dq]))
        renamed[name] = dq
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp in renamed:
                node.input[i] = renamed[inp]
    # Q/DQ of graph inputs go first; the others right after their producers (toposort by insertion)
    nodes = list(graph.node)
    del graph.node[:]
    produced_by: dict[str, list[onnx.NodeProto]] = {}
    for qnode, dqnode in zip(new_nodes[::2], new_nodes[1::2], strict=True):
        produced_by[qnode.input[0]] = [qnode, dqnode]
    for name in [i.name for i in graph.input]:
        graph.node.extend(produced_by.pop(name, []))
    for node in nodes:
        graph.node.append(node)
        for o in node.output:
            graph.node.extend(produced_by.pop(o, []))
    return out


def top1(session, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    name = session.get_inputs()[0].name
    preds = np.concatenate([session.run(None, {name: images[i : i + batch]})[0].argmax(1) for i in range(0, len(images), batch)])
    return float((preds == labels).mean())
