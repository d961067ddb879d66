"""Network structure optimization: the passes of ``quantkit.passes`` in TensorRT's order, with layer counts.

``optimize_model`` runs scale fusion (BN folding), vertical fusion, tensor merging (horizontal
fusion) and concat removal, each switchable. After every step it records the layer count (nodes
by op type), the way TensorRT's verbose builder log reports "After vertical fusions: N layers".
It also records the list of fusions and the Concats TensorRT would remove by writing in place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from quantkit.errors import QuantkitError
from quantkit.graph.passes import Fusion, export_graph, fold_concats, fold_scales, fuse_vertical, inplace_concats, merge_horizontal
from quantkit.model import ModelInfo

#: pass name -> the label TensorRT's builder log uses for the step
PASSES = {
    "fold-bn": "After scale fusion",
    "vertical": "After vertical fusions",
    "horizontal": "After tensor merging",
    "concat": "After concat removal",
}
_IGNORED_OPS = ("Constant",)  # not layers: TensorRT turns them into weights
#: pointwise activations TensorRT fuses into a preceding convolution (its documented fusions)
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Selu", "Softplus", "HardSwish"})
_CONVS = frozenset({"Conv", "ConvTranspose", "FusedConv"})


def layer_counts(graph: gs.Graph) -> Counter[str]:
    return Counter(n.op for n in graph.nodes if n.op not in _IGNORED_OPS)


def tensorrt_layer_estimate(graph: gs.Graph, inplace: int = 0) -> int:
    """An estimate of TensorRT's layer count: the ONNX nodes less what its documented fusions
    absorb. BatchNorm, a constant bias Add, a residual Add and a pointwise activation following
    a convolution fuse into it (Conv+BN+ReLU, Conv+Add+ReLU); Q/DQ fold into their neighbours;
    Concats written in place disappear. Other fusions (Myelin's, for transformers) are not modelled."""
    absorbed = 0
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            absorbed += 1
            continue
        if node.op not in _CONVS:
            continue
        tensor = node.outputs[0] if node.outputs else None
        steps = {"BatchNormalization": 1, "Add": 1, "activation": 1}
        while tensor is not None and len(tensor.outputs) == 1 and not tensor.is_empty():
            nxt = tensor.outputs[0]
            kind = "activation" if nxt.op in _FUSED_ACTIVATIONS else nxt.op
            if kind not in steps or steps[kind] == 0 or (kind == "Add" and len(nxt.inputs) != 2):
                break
            steps[kind] -= 1
            absorbed += 1
            tensor = nxt.outputs[0] if nxt.outputs else None
            if kind == "activation":
                break
    return sum(layer_counts(graph).values()) - absorbed - inplace


@dataclass
class OptimizeReport:
    steps: list[tuple[str, Counter[str]]] = field(default_factory=list)  # (label, op counts)
    fusions: list[Fusion] = field(default_factory=list)
    inplace_concats: list[str] = field(default_factory=list)
    tensorrt_estimate: int | None = None

    def table(self) -> str:
        """ONNX node counts after each step, then per op type (the seed article's before/after table)."""
        lines = [f"{label}: {sum(c.values())} ONNX nodes" for label, c in self.steps]
        if self.tensorrt_estimate is not None:
            lines.append(
                f"TensorRT estimate: about {self.tensorrt_estimate} layers (its documented Conv+BN+activation, Conv+Add, Q/DQ "
                f"and in-place Concat fusions applied to these nodes; {len(self.inplace_concats)} Concat(s) written in place)"
            )
        ops = sorted({op for _, c in self.steps for op in c})
        header = "| op type | " + " | ".join(label for label, _ in self.steps) + " |"
        lines += ["", header, "|---|" + "---|" * len(self.steps)]
        for op in ops:
            lines.append(f"| {op} | " + " | ".join(str(c.get(op, 0)) for _, c in self.steps) + " |")
        lines.append("| **total** | " + " | ".join(str(sum(c.values())) for _, c in self.steps) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [self.table(), ""]
        kinds = Counter(f.kind for f in self.fusions)
        lines.append("fusions: " + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"))
        lines += [f"  {f.describe()}" for f in self.fusions]
        if self.inplace_concats:
            lines.append(f"{len(self.inplace_concats)} Concat(s) TensorRT removes by writing in place: {', '.join(self.inplace_concats)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": [{"step": label, "layers": sum(c.values()), "by_op": dict(sorted(c.items()))} for label, c in self.steps],
            "fusions": [{"kind": f.kind, "result": f.result, "replaced": f.replaced} for f in self.fusions],
            "inplace_concats": self.inplace_concats,
            "tensorrt_layer_estimate": self.tensorrt_estimate,
        }


def optimize_model(
    model: ModelInfo | onnx.ModelProto, passes: list[str] | tuple[str, ...] = tuple(PASSES)
) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Apply ``passes`` (in TensorRT's order, whatever order they are given in); return the model and report."""
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise QuantkitError(f"unknown optimization pass(es) {', '.join(unknown)}; choose from {', '.join(PASSES)}")
    proto = model.proto if isinstance(model, ModelInfo) else model
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        raise QuantkitError("the model is already quantized; optimize its FP32 original, then calibrate the optimized model")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto, strict_mode=False))  # residual fusion compares shapes
    for i, node in enumerate(graph.nodes):  # reports key on node names
        node.name = node.name or f"{node.op}_{i}"
    report = OptimizeReport(steps=[("Original", layer_counts(graph))])
    for name, label in PASSES.items():
        if name not in passes:
            continue
        if name == "fold-bn":
            report.fusions += fold_scales(graph)
        elif name == "vertical":
            report.fusions += fuse_vertical(graph)
        elif name == "horizontal":
            report.fusions += merge_horizontal(graph, opset)
        else:
            report.fusions += fold_concats(graph)
        report.steps.append((label, layer_counts(graph)))
    report.inplace_concats = inplace_concats(graph)
    report.tensorrt_estimate = tensorrt_layer_estimate(graph, len(report.inplace_concats))
    out = export_graph(graph, proto)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - would be a quantkit bug
        raise QuantkitError(f"internal error: the optimized model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return out, report
