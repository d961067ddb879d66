"""Running the FP32 model through onnxruntime with the activations to calibrate exposed as outputs."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo, constant_tensors, effective_outputs

#: Ops whose float inputs TensorRT (implicit INT8 or Q/DQ placement) may read in int8: the
#: weighted ops, and the pooling, concat, resize and residual-add ops around them. BatchNorm
#: and activations (ReLU, Clip, and the Add/Mul/Div inside SiLU or hard-swish) are not listed:
#: TensorRT fuses them into the preceding convolution, so the tensors between them disappear
#: and need no range. ``all_tensors`` still collects everything.
QUANTIZABLE_OP_TYPES = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv",
        "Add", "Concat", "Resize",
        "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool",
    }
)  # fmt: skip
#: Of these, Add counts only as a skip connection: both operands computed from the inputs
#: (``x + 3`` inside hard-swish, or a bias add, is part of a fused pointwise epilogue).
_RESIDUAL_ONLY = frozenset({"Add"})
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type shape inference can tell (0 where unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are checked at run time
        inferred = model
    graph = inferred.graph
    types = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def select_calibration_tensors(model: onnx.ModelProto, all_tensors: bool = False) -> list[str]:
    """Names of the activations to calibrate, in graph order.

    Default: float graph inputs and outputs, and for every quantizable op
    (``QUANTIZABLE_OP_TYPES``; Add only when both operands are activations) its float inputs and
    its effective output (after BN/bias/ReLU, see ``effective_outputs``), where an int8 kernel
    requantizes. Weights are excluded. ``all_tensors``: every float activation.
    Tensors of unknown type are included and filtered by dtype at run time.
    """
    graph = model.graph
    types = _elem_types(model)
    const = constant_tensors(graph)
    chosen: dict[str, None] = {}
    effective = effective_outputs(graph, QUANTIZABLE_OP_TYPES)

    def consider(name: str) -> None:
        if name and name not in const and types.get(name, 0) in _FLOAT_TYPES | {0}:
            chosen.setdefault(name, None)

    for vi in graph.input:
        consider(vi.name)
    for node in graph.node:
        if all_tensors:
            for name in list(node.input) + list(node.output):
                consider(name)
        elif node.op_type in QUANTIZABLE_OP_TYPES:
            if node.op_type in _RESIDUAL_ONLY and any(i in const for i in node.input):
                continue
            for name in node.input:
                consider(name)
            if node.output:
                consider(effective[node.output[0]])
    for vi in graph.output:
        consider(vi.name)
    return list(chosen)


class ActivationRunner:
    """An onnxruntime session over the model with ``tensors`` added as graph outputs.

    ``run(feeds)`` returns tensor name -> array for the requested tensors that came back as
    floats (integer or boolean tensors of unknown type are dropped).
    """

    def __init__(
        self, model: ModelInfo, tensors: Sequence[str], providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        self.model = model
        self.tensors = list(tensors)
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        existing = {o.name for o in proto.graph.output}
        for name in self.tensors:
            if name not in existing:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Every batch returns many large, short-lived activation arrays; onnxruntime's arena keeps
        # growing to hold them, while the plain allocator gives the memory back (peak RSS stays flat).
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        try:
            self.session = ort.InferenceSession(self._serialize(proto), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types; one line for the user
            raise QuantkitError(f"onnxruntime cannot load {model.path}: {_first_line(exc)}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _serialize(self, proto: onnx.ModelProto) -> bytes | str:
        if proto.ByteSize() < 1_900_000_000:
            return proto.SerializeToString()
        # Over protobuf's 2 GB limit: write weights as external data into a temporary folder.
        self._tmpdir = tempfile.TemporaryDirectory(prefix="quantkit-")
        path = Path(self._tmpdir.name) / "augmented.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, location="weights.bin")
        return str(path)

    def run(self, feeds: dict[str, np.ndarray], sample_ids: Sequence[str] = ()) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001
            where = f" on samples {sample_ids[0]} .. {sample_ids[-1]}" if sample_ids else ""
            raise QuantkitError(f"running {self.model.path} failed{where}: {_first_line(exc)}") from None
        wanted = set(self.tensors)
        return {
            n: v
            for n, v in zip(self.output_names, values, strict=True)
            if n in wanted and isinstance(v, np.ndarray) and v.dtype.kind == "f"
        }

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
