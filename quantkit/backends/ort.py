"""onnxruntime, the runtime everything but the TensorRT engine build runs on.

The one place that creates onnxruntime sessions (``make_session``) and maps quantkit's runtime
names to execution providers (``runtime_providers``). Also:
- ``ActivationRunner``: the model with chosen intermediate tensors exposed as outputs
  (``with_outputs``), as calibration and per-layer error need it;
- ``build_ort``: the model with onnxruntime's graph optimizations applied and saved, plus the
  session settings that ``eval`` and users' deployments load it with;
- ``optimized_graph_check``: which nodes of a Q/DQ model onnxruntime's CPU provider really runs as
  integer kernels, and the float ops left between them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from quantkit._deps import install_hint
from quantkit._io import write_bytes_atomic
from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo, if_branches, lift_branch_tensors

RUNTIMES = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def runtime_providers(runtime: str) -> list[str]:
    """onnxruntime providers for a runtime, or a clear error naming what to install."""
    if runtime not in RUNTIMES:
        raise QuantkitError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}", option="runtime")
    wanted = RUNTIMES[runtime]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        extra = install_hint("onnxruntime_gpu") + (" (with tensorrt)" if runtime == "tensorrt" else "")
        raise QuantkitError(
            f"runtime {runtime} needs onnxruntime's {wanted[0]}, which is not available here (have: {', '.join(available)}); {extra}",
            option="runtime",
        )
    return [p for p in wanted if p in available]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: activation Q/DQ types that only TensorRT runs natively: onnxruntime's CPU provider must run them as
#: exact fake quantization (its extended optimizations give wrong results with float8 Q/DQ: 15.1 for 11.6
#: on a two-conv test graph, tests/export/test_fp8.py)
_FAKE_QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}


def has_signed_activation_qdq(model: onnx.ModelProto) -> bool:
    """Whether an activation QuantizeLinear quantizes to int8 or float8 (TensorRT's formats)."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    consts = {o: n for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        if len(node.input) < 3 or not node.input[2]:
            return False if node.attribute and any(a.name == "output_dtype" for a in node.attribute) else True  # default uint8
        zp = node.input[2]
        dtype = inits.get(zp)
        if dtype is None and zp in consts:
            dtype = next((a.t.data_type for a in consts[zp].attribute if a.name == "value"), None)
        if dtype in _FAKE_QUANT_TYPES:
            return True
    # int4 weights: onnxruntime's MatMulNBits fusion quantizes the activations too (0.34 off on a
    # 256x64 test MatMul); TensorRT's weight-only INT4 computes in float, as the plain graph does
    return any(
        n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
        for n in model.graph.node
    )


#: intra-op threads of sessions that are not given any (the CLI's --threads sets it for every command)
_default_threads: int | None = None


def set_default_threads(threads: int | None) -> None:
    global _default_threads
    _default_threads = threads


def set_ort_verbosity(verbose: bool) -> None:
    """onnxruntime's own log (its process-wide logger, e.g. "Failed to persist telemetry device ID"
    in a read-only home): errors only, warnings too with -v. Sessions log errors only either way."""
    ort.set_default_logger_severity(2 if verbose else 3)


set_ort_verbosity(False)


def make_session(
    model: onnx.ModelProto | bytes | str | Path,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    arena: bool = True,
    spinning: bool = True,
    optimization: str | None = None,
    optimized_model_path: str | Path | None = None,
    source: str | Path | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session; every failure is a one-line QuantkitError naming ``source``.

    ``arena=False`` gives activation memory back after every run (calibration returns many
    large short-lived arrays, which the arena would keep growing to hold). ``spinning=False``
    keeps idle sessions off the cores (sessions timed in interleaved rounds).

    A model in TensorRT's Q/DQ format (int8 activations) runs as exact fake quantization: only
    basic graph optimizations, so no DequantizeLinear is fused into an integer kernel. Its
    accuracy is then what TensorRT computes (int8 products, exact int32 accumulation), not what
    onnxruntime's CPU integer kernels give: on CPUs without VNNI they sum u8 x s8 products in
    pairs into int16, which saturates for 8-bit weights (errors of 100x the quantization step
    on this machine's QGemm; tests/backends/test_ort.py).
    """
    if optimization is None and optimized_model_path is None:
        proto = model if isinstance(model, onnx.ModelProto) else None
        if proto is None:
            try:
                proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
            except Exception:  # noqa: BLE001 - unreadable files are reported by onnxruntime below
                proto = None
        if proto is not None and has_signed_activation_qdq(proto):
            optimization = "ORT_ENABLE_BASIC"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not arena:
        options.enable_cpu_mem_arena = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = threads or _default_threads
    if threads:
        options.intra_op_num_threads = threads
    if optimization is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types; one line for the user
        where = source if source is not None else (model if isinstance(model, str) else "the model")
        raise QuantkitError(f"onnxruntime cannot load {where}: {first_line(exc)}") from None


def _branch_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort: an unknown type is taken as float32
        return {}
    return {vi.name: vi.type.tensor_type.elem_type for g in if_branches(inferred.graph) for vi in [*g.value_info, *g.output]}


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` added as graph outputs (types left to onnxruntime).

    Tensors inside If branches are lifted out under their own names (``lift_branch_tensors``): a
    run where their branch did not execute returns them empty."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    graph = proto.graph
    top = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    inner = {t for t in tensors if t not in top}
    if inner and if_branches(graph):
        lift_branch_tensors(graph, inner, _branch_elem_types(model))
    existing = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return proto


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
        proto = with_outputs(model.proto, self.tensors)
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        # peak RSS stays flat in the sample count only without the arena (see make_session)
        self.session = make_session(self._serialize(proto), providers, threads=threads, arena=False, source=model.path)
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
            raise QuantkitError(f"running {self.model.path} failed{where}: {first_line(exc)}") from None
        wanted = set(self.tensors)
        return {
            n: v
            for n, v in zip(self.output_names, values, strict=True)
            if n in wanted and isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size  # empty: its If branch did not run
        }

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


#: onnxruntime's integer kernels: what its QDQ selectors (qdq_selector_action_transformer.cc) fuse
#: a DequantizeLinear -> op -> QuantizeLinear group into, and the integer ops of its contrib set
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
        "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
        "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean",
        "DynamicQuantizeMatMul", "MatMulNBits", "NhwcMaxPool", "QLinearConvTranspose",
    }
)  # fmt: skip
#: nodes that only change layout or shape: counted apart from float compute
_LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape"})


@dataclass
class OptimizedGraphCheck:
    """What onnxruntime's CPU provider runs once it has optimized a Q/DQ model: which nodes became
    integer kernels, and which float ops are left between them (each one costs a DequantizeLinear
    before it and a QuantizeLinear after it, and cuts the integer chain's NHWC layout)."""

    integer_kernels: dict[str, int]
    float_between: dict[str, int]  # float compute ops fed (through float ops) by a DQ and feeding a Q
    quantize: int
    dequantize: int
    layout_changes: int  # Transpose / NCHWc reorders left in the optimized graph
    float_nodes: int  # every float compute node of the optimized graph

    def summary(self) -> str:
        kernels = sum(self.integer_kernels.values())
        between = sum(self.float_between.values())
        lines = [
            f"onnxruntime's optimized CPU graph: {kernels} integer kernel(s) ("
            + ", ".join(f"{op} x{n}" for op, n in sorted(self.integer_kernels.items(), key=lambda kv: (-kv[1], kv[0])))
            + f"), {self.quantize} QuantizeLinear + {self.dequantize} DequantizeLinear left, {self.layout_changes} layout change(s)"
        ]
        if between:
            lines.append(
                f"  {between} float op(s) run between integer kernels, each behind a DequantizeLinear and before a QuantizeLinear: "
                + ", ".join(f"{op} x{n}" for op, n in sorted(self.float_between.items(), key=lambda kv: (-kv[1], kv[0])))
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "integer_kernels": dict(sorted(self.integer_kernels.items())),
            "float_between_integer_kernels": dict(sorted(self.float_between.items())),
            "quantize_linear": self.quantize,
            "dequantize_linear": self.dequantize,
            "layout_changes": self.layout_changes,
            "float_nodes": self.float_nodes,
        }


def _is_float(n: onnx.NodeProto) -> bool:
    return n.op_type not in INTEGER_KERNELS and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")


def _between_qdq(nodes: list[onnx.NodeProto]) -> set[int]:
    """Float nodes (by id) that are reached from a DequantizeLinear and reach a QuantizeLinear."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    after_dq: set[int] = set()
    stack = [c for n in nodes if n.op_type == "DequantizeLinear" for o in n.output for c in consumers.get(o, [])]
    while stack:
        n = stack.pop()
        if id(n) in after_dq or not _is_float(n):
            continue
        after_dq.add(id(n))
        if n.op_type != "Shape":  # a shape is metadata: the Slice/Concat computing a Reshape's target are no activations
            stack += [c for o in n.output for c in consumers.get(o, [])]
    before_q: set[int] = set()
    stack = [producer[i] for n in nodes if n.op_type == "QuantizeLinear" for i in n.input[:1] if i in producer]
    while stack:
        n = stack.pop()
        if id(n) in before_q or not _is_float(n):
            continue
        before_q.add(id(n))
        stack += [producer[i] for i in n.input if i in producer]
    return after_dq & before_q


def optimized_graph_check(model: onnx.ModelProto | bytes | str | Path, threads: int | None = None) -> OptimizedGraphCheck:
    """Load ``model`` the way a CPU deployment does (all graph optimizations), save onnxruntime's
    optimized graph (``optimized_model_filepath``) and read what it made of the Q/DQ nodes."""
    with tempfile.TemporaryDirectory(prefix="quantkit-ortopt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        make_session(model, threads=threads, optimization="ORT_ENABLE_ALL", optimized_model_path=path)
        optimized = onnx.load(str(path), load_external_data=False)
    graphs = [optimized.graph, *if_branches(optimized.graph)]  # onnxruntime optimizes If branches as graphs of their own
    nodes = [n for g in graphs for n in g.node]
    between_qdq = set().union(*(_between_qdq(list(g.node)) for g in graphs))
    between: dict[str, int] = {}
    kernels: dict[str, int] = {}
    for n in nodes:
        if n.op_type in INTEGER_KERNELS:
            kernels[n.op_type] = kernels.get(n.op_type, 0) + 1
        elif id(n) in between_qdq and n.op_type not in _LAYOUT_OPS:
            between[n.op_type] = between.get(n.op_type, 0) + 1
    return OptimizedGraphCheck(
        integer_kernels=kernels,
        float_between=between,
        quantize=sum(n.op_type == "QuantizeLinear" for n in nodes),
        dequantize=sum(n.op_type == "DequantizeLinear" for n in nodes),
        layout_changes=sum(n.op_type in ("Transpose", "ReorderInput", "ReorderOutput") for n in nodes),
        float_nodes=sum(_is_float(n) and n.op_type not in _LAYOUT_OPS for n in nodes),
    )


ORT_RUNTIMES = {"ort-cpu": "ort-cpu", "ort-cuda": "ort-cuda", "ort-tensorrt": "tensorrt"}


@dataclass
class OrtBuild:
    model: Path
    settings: Path
    providers: list[str]


def build_ort(onnx_path: str | Path, output: str | Path, runtime: str = "ort-cpu", threads: int | None = None) -> OrtBuild:
    """Write ``output`` (the optimized model) and ``<output>.session.json`` (providers, options).

    Optimizations stop at EXTENDED: the ALL level adds CPU-specific layouts (NCHWc) that
    onnxruntime says should not leave the machine they were made on.
    """
    if runtime not in ORT_RUNTIMES:
        raise QuantkitError(f"unknown onnxruntime runtime '{runtime}'; choose from {', '.join(ORT_RUNTIMES)}")
    providers = runtime_providers(ORT_RUNTIMES[runtime])
    output = Path(output)
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        make_session(str(onnx_path), providers, optimization="ORT_ENABLE_EXTENDED", optimized_model_path=optimized)
        write_bytes_atomic(output, optimized.read_bytes())
    settings = {
        "format": "quantkit.ort_session",
        "model": output.name,
        "providers": providers,
        "graph_optimization_level": "ORT_ENABLE_EXTENDED",
        "intra_op_num_threads": threads or 0,
        "note": "load with these providers; the saved model is already optimized (you may set ORT_DISABLE_ALL)",
    }
    settings_path = output.with_suffix(".session.json")
    write_bytes_atomic(settings_path, (json.dumps(settings, indent=1) + "\n").encode())
    return OrtBuild(output, settings_path, providers)
