"""Graph passes that are numerically exact up to float rounding.

``fold_batchnorm``: BatchNormalization, and per-channel constant bias Adds, folded into the
preceding Conv's weights and bias. The folded Conv takes over the folded node's output tensor
name, so calibrated ranges keyed by tensor name still apply. The onnxruntime Q/DQ placement needs this: with the weight behind a
DequantizeLinear, onnxruntime can no longer fold BN itself, and a BN between Conv and
QuantizeLinear blocks its integer Conv kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _absorb(conv: gs.Node, node: gs.Node, bias: gs.Constant) -> None:
    """Give ``conv`` the new bias and let it produce ``node``'s output tensor (ranges stay valid);
    ``node`` is left without outputs and removed by the next cleanup."""
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias
    else:
        conv.inputs.append(bias)
    y = node.outputs[0]
    node.outputs.clear()
    conv.outputs[0] = y


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """Return the model with Conv -> BatchNormalization and Conv -> Add(per-channel constant bias)
    pairs folded into the Conv, and the (conv, folded node) names."""
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup()  # BN parameters may come from Constant nodes
    folded: list[tuple[str, str]] = []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1 or len(x.outputs) != 1 or x.inputs[0].op != "Conv" or x in graph.outputs:
            continue
        conv = x.inputs[0]
        params = [_constant(t) for t in bn.inputs[1:5]]
        w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w is None or any(p is None for p in params) or len(conv.inputs[1].outputs) != 1:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        factor = gamma / np.sqrt(var + eps)
        b = _constant(conv.inputs[2]).astype(np.float64) if len(conv.inputs) > 2 else np.zeros_like(mean)
        if b is None:
            continue
        new_w = (w.astype(np.float64) * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        new_b = ((b - mean) * factor + beta).astype(w.dtype)
        conv.inputs[1] = gs.Constant(f"{conv.inputs[1].name}_bnfolded", new_w)
        _absorb(conv, bn, gs.Constant(f"{conv.name}_bias_bnfolded", new_b))
        folded.append((conv.name, bn.name))
    for add in [n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2]:
        # Conv -> Add(per-channel constant): the bias exporters such as Paddle2ONNX emit separately
        x, c = add.inputs if _constant(add.inputs[1]) is not None else add.inputs[::-1]
        bias_add = _constant(c)
        if bias_add is None or len(x.inputs) != 1 or len(x.outputs) != 1 or x.inputs[0].op != "Conv" or x in graph.outputs:
            continue
        conv = x.inputs[0]
        w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
        channels = w.shape[0] if w is not None else None
        rank = len(x.shape) if x.shape is not None else (w.ndim if w is not None else 0)
        if w is None or bias_add.size not in (1, channels) or bias_add.ndim > rank:
            continue
        shape = (1,) * (rank - bias_add.ndim) + bias_add.shape
        if bias_add.size == channels and (len(shape) < 2 or shape[1] != channels):
            continue  # not a per-output-channel bias
        b = _constant(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(channels, dtype=w.dtype)
        if b is None:
            continue
        new_b = (b + np.broadcast_to(bias_add.reshape(-1), (channels,))).astype(w.dtype)
        _absorb(conv, add, gs.Constant(f"{conv.name}_bias_addfolded", new_b))
        folded.append((conv.name, add.name))
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out, folded
