"""Loading an ONNX model and describing its inputs, with clear errors for bad files."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
from google.protobuf.message import DecodeError

from quantkit.errors import QuantkitError
from quantkit.optypes import ABSORBED_OPS, CONSTANT_OPERAND_OPS, CONV_SCALE_OPS, WEIGHTED_OPS

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, shape (ints for fixed axes, str/None for dynamic ones) and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype
    # for an image input with free height/width: the total downsampling of the graph behind it,
    # which those sizes must be multiples of (a stride-32 detector concatenates its FPN levels)
    stride: int = 1
    # the axis samples are stacked along (0 for most; 1 for an RNN state [layers, batch, hidden]);
    # None for an input every sample shares (a scalar sample rate, a fixed-shape configuration)
    batch_axis: int | None = 0

    @property
    def sample_shape(self) -> tuple[int | str | None, ...]:
        """The shape of one sample: the input's shape without its batch axis."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]

    def batched(self, sample: np.ndarray, count: int = 1) -> np.ndarray:
        """One sample as a batch of ``count`` copies (an unbatched input as it is)."""
        if self.batch_axis is None:
            return sample
        return np.repeat(np.expand_dims(sample, self.batch_axis), count, axis=self.batch_axis)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def describe(self) -> str:
        dims = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model: path, proto, content hash and inputs (initializers excluded)."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    inputs: tuple[InputSpec, ...]

    @property
    def batch_axes(self) -> dict[str, int | None]:
        """Input name -> the axis its samples are stacked along (None: shared by every sample)."""
        return {i.name: i.batch_axis for i in self.inputs}

    @property
    def float_inputs(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.is_float)

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        names = ", ".join(i.name for i in self.inputs)
        raise QuantkitError(f"model {self.path} has no input named '{name}' (inputs: {names})")


def _dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError):
        return np.dtype(object)


def batch_axes(shapes: list[tuple[int | str | None, ...]]) -> list[int | None]:
    """Each input's batch axis, read from the graph's symbolic dimensions.

    With every shape fixed (a fixed-batch model), axis 0 of each input of rank >= 1 is its batch.
    Otherwise the batch dimension is the first dynamic axis 0 (its name, e.g. ``batch_size``): an
    input that carries that name elsewhere is batched there (a state [layers, batch_size, hidden]),
    one whose axis 0 is dynamic is batched on it, and a scalar or an input of fixed shape is shared
    by every sample (a sample rate, a configuration tensor).
    """
    dynamic = [s[0] for s in shapes if s and not isinstance(s[0], int)]
    name = next((d for d in dynamic if isinstance(d, str)), None)
    axes: list[int | None] = []
    for shape in shapes:
        if not shape:
            axes.append(None)
        elif not dynamic:
            axes.append(0)
        elif name is not None and name in shape:
            axes.append(shape.index(name))
        else:
            axes.append(0 if not isinstance(shape[0], int) else None)
    return axes


def value_shape(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    """A tensor's declared dims: sizes, symbolic names, or None where unknown."""
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:  # some exporters (Paddle2ONNX) write -1 for dynamic
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def lifted_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with Constant nodes' tensors as initializers (opset-11 and Paddle2ONNX exports keep
    Conv and MatMul weights there), for the rewrites that read and change weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a control-flow node (If, Loop, Scan) carries as attributes."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors that ``node``'s subgraphs read from the enclosing scope without listing them as the
    node's inputs (ONNX lets a branch read any tensor in scope), in order of first read."""
    reads: dict[str, None] = {}
    for graph in node_subgraphs(node):
        local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        for inner in graph.node:
            for name in [*inner.input, *outer_scope_reads(inner)]:
                if name and name not in local:
                    reads[name] = None
            local.update(inner.output)
    return list(reads)


def rename_outer_reads(node: onnx.NodeProto, renamed: Mapping[str, str]) -> None:
    """Point ``node``'s subgraphs' reads of enclosing-scope tensors at new names (names are unique
    across scopes in ONNX, so a read of ``old`` inside a branch is always the outer tensor)."""
    for graph in node_subgraphs(node):
        for inner in graph.node:
            inner.input[:] = [renamed.get(name, name) for name in inner.input]
            rename_outer_reads(inner, renamed)


def if_branches(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The branches of every If in ``graph`` and, recursively, in those branches (not Loop or Scan
    bodies: they run many times per inference, and nothing outside sees their tensors)."""
    found = []
    for node in graph.node:
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            for branch in node_subgraphs(node):
                found += [branch, *if_branches(branch)]
    return found


def _defined(graph: onnx.GraphProto) -> set[str]:
    return {o for node in graph.node for o in node.output if o}


def _rename_in_branch(branch: onnx.GraphProto, old: str, new: str) -> None:
    for node in branch.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
        rename_outer_reads(node, {old: new})
    for out in branch.output:
        if out.name == old:
            out.name = new


def lift_branch_tensors(
    graph: onnx.GraphProto, names: set[str], elem_types: Mapping[str, int], _ids: Iterator[int] | None = None
) -> set[str]:
    """Make the tensors of ``names`` that If branches compute visible in ``graph`` under their own
    names (in place), so that they can be graph outputs; returns the names lifted.

    onnxruntime cannot return a tensor of a subgraph. Each If gets one more output per lifted
    tensor: the branch that computes it returns it (its definition there renamed), the other
    branch an empty tensor, which the callers read as "this branch did not run". Nested Ifs are
    lifted from the inside out. The lifted model computes what the original does.
    """
    ids = itertools.count() if _ids is None else _ids  # unique suffixes: names are unique across all scopes
    lifted: set[str] = set()
    for node in [n for n in graph.node if n.op_type == "If" and n.domain in ("", "ai.onnx")]:
        branches = node_subgraphs(node)
        for branch in branches:
            lift_branch_tensors(branch, names, elem_types, ids)
        for name in sorted(names & set().union(*(_defined(b) for b in branches))):
            elem = elem_types.get(name) or onnx.TensorProto.FLOAT
            for branch in branches:
                carried = f"{name}__lifted{next(ids)}"
                if name in _defined(branch):
                    inner = f"{name}__lifted{next(ids)}"
                    _rename_in_branch(branch, name, inner)
                    branch.node.append(onnx.helper.make_node("Identity", [inner], [carried]))
                else:
                    empty = onnx.helper.make_tensor(carried, elem, [0], [])
                    branch.node.append(onnx.helper.make_node("Constant", [], [carried], value=empty))
                branch.output.append(onnx.helper.make_tensor_value_info(carried, elem, None))
            node.output.append(name)
            lifted.add(name)
    return lifted


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and everything computed from constants alone.

    These are weights and parameters (a bias reshaped at run time, a transposed weight), never
    activations: nothing to calibrate, and no activation Q/DQ.
    """
    const = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in const or i == "" for i in node.input)):
            const.update(o for o in node.output if o)
    return const


def shape_derived_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from constants and tensor shapes alone (Shape -> Gather -> ConstantOfShape -> Mul):
    their values follow from the input's size, not its contents, so no calibration sees them."""
    known = constant_tensors(graph)
    for node in graph.node:
        if node.op_type in ("Shape", "Size") or (node.input and all(i in known or i == "" for i in node.input)):
            known.update(o for o in node.output if o)
    return known


def effective_outputs(graph: onnx.GraphProto, op_types: frozenset[str] | set[str] = WEIGHTED_OPS) -> dict[str, str]:
    """Output tensor of each ``op_types`` node -> its effective output, the tensor after the ops
    fused into it.

    Walks forward through single-consumer BatchNormalization, Relu and Clip; after a weighted op,
    a bias Add with a constant operand; after a Conv (before any activation), a Mul by a constant.
    This is where an integer kernel's output would be requantized.
    """
    const = constant_tensors(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    result = {}
    for node in graph.node:
        if node.op_type not in op_types or not node.output:
            continue
        tensor = node.output[0]
        linear = node.op_type == "Conv"  # still before any activation: a constant scale folds into the conv
        while tensor not in outputs and len(users := consumers.get(tensor, [])) == 1:
            nxt = users[0]
            with_constant = all(i == tensor or i in const for i in nxt.input)
            scale = linear and nxt.op_type in CONV_SCALE_OPS and with_constant
            bias = node.op_type in WEIGHTED_OPS and nxt.op_type in CONSTANT_OPERAND_OPS and with_constant
            absorbed = nxt.op_type in ABSORBED_OPS or scale or bias
            if not absorbed or (nxt.input[0] != tensor and nxt.op_type not in CONSTANT_OPERAND_OPS and not scale):
                break
            linear = linear and nxt.op_type not in ("Relu", "Clip")
            tensor = nxt.output[0]
        result[node.output[0]] = tensor
    return result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in onnx.external_data_helper._get_all_tensors(proto) if onnx.external_data_helper.uses_external_data(t)]


def check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every external-data reference must be a regular file inside the model's own folder, and
    the bytes it names must exist: no absolute paths, no ``..``, no symbolic links."""
    folder = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in _external_tensors(proto):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r}"
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise QuantkitError(
                f"{where} keeps its data at {location!r}, outside the model's folder; only relative paths inside it are read"
            )
        target = folder / rel
        if target.is_symlink() or not target.resolve().is_relative_to(folder):
            raise QuantkitError(
                f"{where}: {location!r} is a symbolic link or leaves the model's folder; copy the data file next to the model"
            )
        if not target.is_file():
            raise QuantkitError(f"{where} keeps its data in {location!r}, which is missing; copy it next to {path.name}")
        size = sizes.setdefault(target, target.stat().st_size)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise QuantkitError(f"{where}: its external-data offset or length is not a number") from None
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise QuantkitError(f"{where}: its external data runs past the end of {location!r} ({size} bytes); the file is truncated")


def spatial_strides(proto: onnx.ModelProto, inputs: list[str]) -> dict[str, int]:
    """Per input, the multiple its free height and width must be: where the graph joins paths that
    went down to different depths (an FPN or U-Net joining an upsampled deep map with a shallow
    one), sizes only agree when the input is a multiple of the deepest path's total stride. A
    network that never joins such paths (a classifier with global pooling) takes any size: 1."""
    # tensor -> input -> (current stride, deepest stride on the way)
    reach: dict[str, dict[str, tuple[float, float]]] = {name: {name: (1.0, 1.0)} for name in inputs}
    needed = dict.fromkeys(inputs, 1.0)
    for node in proto.graph.node:
        merged: dict[str, tuple[float, float]] = {}
        depths: dict[str, set[float]] = {}
        for t in node.input:
            for source, (stride, deepest) in reach.get(t, {}).items():
                depths.setdefault(source, set()).add(deepest)
                old = merged.get(source, (0.0, 0.0))
                merged[source] = (max(old[0], stride), max(old[1], deepest))
        if not merged:
            continue
        factor = 1.0
        if node.op_type in ("Conv", "MaxPool", "AveragePool", "ConvInteger", "QLinearConv"):
            factor = float(max(next((list(a.ints) for a in node.attribute if a.name == "strides"), [1]) or [1]))
        elif node.op_type in ("Resize", "Upsample"):
            factor = 0.5  # the usual 2x FPN upsampling; its scale is often computed, not constant
        for source, (stride, deepest) in merged.items():
            if len(depths[source]) > 1:  # paths of different depths meet here
                needed[source] = max(needed[source], max(depths[source]))
            stride *= factor
            merged[source] = (stride, max(deepest, stride))
        for out in node.output:
            reach[out] = merged
    return {name: round(value) for name, value in needed.items()}


def load_model(path: str | Path) -> ModelInfo:
    """Load and check an ONNX model; every failure is a one-line QuantkitError."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise QuantkitError(f"cannot read {path} as an ONNX model ({type(exc).__name__}); is the file complete?") from None
    if _external_tensors(proto):
        check_external_data(proto, path)
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
            raise QuantkitError(f"cannot read the external data of {path}: {str(exc).splitlines()[0][:200]}") from None
    if not proto.graph.node:
        raise QuantkitError(f"{path} holds no ONNX graph nodes; is it an ONNX model file?")
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise QuantkitError(f"{path} is not a valid ONNX model: {first}") from None
    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [vi for vi in proto.graph.input if vi.name not in initializers]
    axes = batch_axes([value_shape(vi) for vi in graph_inputs])
    inputs = tuple(
        InputSpec(vi.name, value_shape(vi), _dtype(vi.type.tensor_type.elem_type), batch_axis=axis)
        for vi, axis in zip(graph_inputs, axes, strict=True)
    )
    free = [i.name for i in inputs if len(i.shape) == 4 and not all(isinstance(d, int) for d in i.shape[2:])]
    if free:
        strides = spatial_strides(proto, free)
        inputs = tuple(replace(i, stride=strides.get(i.name, 1)) for i in inputs)
    return ModelInfo(path=path, proto=proto, sha256=file_sha256(path), inputs=inputs)
