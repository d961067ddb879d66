"""Collecting statistics: the model runs over the data and every activation streams into a histogram.

- ``select_calibration_tensors`` chooses the tensors (what TensorRT and onnxruntime's integer
  kernels read and requantize);
- ``collect_statistics`` runs one pass, with memory independent of the number of samples;
- ``CalibrationStats`` is the mergeable result: two shards merged equal one run over both;
- a ``Collector`` is anything that turns the batches of a source into ``CalibrationStats``:
  ``LocalCollector`` here, ``quantkit.scaleout.ray.RayCollector`` on a Ray cluster.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from quantkit.backends.ort import ActivationRunner, make_session, with_outputs
from quantkit.calibration.histogram import Scratch, TensorHistogram
from quantkit.data.batching import Batch, batches, fixed_batch
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo, constant_tensors, effective_outputs, if_branches, node_subgraphs
from quantkit.optypes import QUANTIZABLE_OP_TYPES, RESIDUAL_ONLY_OPS

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type shape inference can tell (0 where unknown), If branches included."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are checked at run time
        inferred = model
    types = {}
    for graph in [inferred.graph, *if_branches(inferred.graph)]:
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def select_calibration_tensors(model: onnx.ModelProto, all_tensors: bool = False) -> list[str]:
    """Names of the activations to calibrate, in graph order.

    Default: float graph inputs and outputs, and for every quantizable op
    (``QUANTIZABLE_OP_TYPES``; Add only when both operands are activations) its float inputs and
    its effective output (after BN/bias/ReLU, see ``effective_outputs``), where an int8 kernel
    requantizes. Weights are excluded. ``all_tensors``: every float activation.
    Tensors of unknown type are included and filtered by dtype at run time. The ops inside If
    branches count too (a VAD or a merged decoder runs its whole network there): the collection
    lifts their tensors out (``with_outputs``).
    """
    graph = model.graph
    types = _elem_types(model)
    chosen: dict[str, None] = {}

    def consider(name: str, const: set[str]) -> None:
        if name and name not in const and types.get(name, 0) in _FLOAT_TYPES | {0}:
            chosen.setdefault(name, None)

    def select(graph: onnx.GraphProto, outer_const: set[str]) -> None:
        const = constant_tensors(graph) | outer_const
        effective = effective_outputs(graph, QUANTIZABLE_OP_TYPES)
        for node in graph.node:
            if all_tensors:
                for name in list(node.input) + list(node.output):
                    consider(name, const)
            elif node.op_type in QUANTIZABLE_OP_TYPES:
                if node.op_type in RESIDUAL_ONLY_OPS and any(i in const for i in node.input):
                    continue
                for name in node.input:
                    consider(name, const)
                if node.output:
                    consider(effective[node.output[0]], const)
            if node.op_type == "If":
                for branch in node_subgraphs(node):
                    select(branch, const)

    top_const = constant_tensors(graph)
    for vi in graph.input:
        consider(vi.name, top_const)
    select(graph, set())
    for vi in graph.output:
        consider(vi.name, top_const)
    return list(chosen)


@dataclass
class CalibrationStats:
    """What one collection pass produced: per-tensor statistics plus the provenance of the data."""

    histograms: dict[str, TensorHistogram]
    num_samples: int = 0
    batch_size: int = 0
    input_shapes: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain form, to send a shard's statistics between processes."""
        return {
            "histograms": {n: h.to_dict() for n, h in self.histograms.items()},
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "input_shapes": self.input_shapes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationStats:
        hists = {n: TensorHistogram.from_dict(h) for n, h in d["histograms"].items()}
        return cls(hists, int(d["num_samples"]), int(d["batch_size"]), {k: [list(s) for s in v] for k, v in d["input_shapes"].items()})

    def joined(self, other: CalibrationStats, order: Sequence[str]) -> CalibrationStats:
        """Statistics of other tensors over the same samples (a second pass over the data), in ``order``."""
        both = {**self.histograms, **other.histograms}
        histograms = {name: both[name] for name in order if name in both}
        return CalibrationStats(histograms, self.num_samples, self.batch_size, self.input_shapes)

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of two shards together (exact: equal to collecting both in one run)."""
        names = list(self.histograms) + [n for n in other.histograms if n not in self.histograms]
        merged = {}
        for name in names:
            mine, theirs = self.histograms.get(name), other.histograms.get(name)
            merged[name] = mine.merge(theirs) if mine is not None and theirs is not None else (mine or theirs).copy()  # type: ignore[union-attr]
        shapes = {k: list(v) for k, v in self.input_shapes.items()}
        for k, v in other.input_shapes.items():
            shapes.setdefault(k, [])
            shapes[k] += [s for s in v if s not in shapes[k]]
        return CalibrationStats(merged, self.num_samples + other.num_samples, max(self.batch_size, other.batch_size), shapes)


def collect_statistics(
    model: ModelInfo,
    data: Iterable[Batch],
    tensors: Sequence[str] | None = None,
    *,
    bins: int = 2048,
    all_tensors: bool = False,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    on_batch: Callable[[Batch], None] | None = None,
    runner: ActivationRunner | None = None,
) -> CalibrationStats:
    """Run ``model`` over ``data`` and fold every activation into its streaming histogram.

    ``runner`` reuses an existing session (a distributed worker keeps one across its shards).
    Histogram updates run on a worker thread while onnxruntime computes the next batch (it
    releases the GIL), so statistics cost little beyond inference. At most three batches of
    activations exist at once (one folded, one queued, one computed), so memory does not depend
    on the number of samples.
    """
    if runner is None:
        tensors = list(tensors) if tensors is not None else select_calibration_tensors(model.proto, all_tensors)
        if not tensors:
            raise QuantkitError(f"model {model.path} has no float activations to calibrate")
        runner = ActivationRunner(model, tensors, providers=providers, threads=threads)
        own_runner = True
    else:
        tensors, own_runner = runner.tensors, False
    histograms = {name: TensorHistogram(bins=bins) for name in tensors}
    stats = CalibrationStats(histograms)
    pending: queue.Queue[dict[str, np.ndarray] | None] = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def fold() -> None:
        scratch = Scratch()
        while (item := pending.get()) is not None:
            if failure:
                continue  # drain so the producer never blocks
            try:
                for name, values in item.items():
                    histograms[name].update(values, scratch)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
                failure.append(exc)

    worker = threading.Thread(target=fold, name="quantkit-histograms", daemon=True)
    worker.start()
    try:
        for batch in data:
            outputs = runner.run(batch.feeds, batch.ids)
            if failure:
                break
            pending.put(outputs)
            stats.num_samples += len(batch)
            stats.batch_size = max(stats.batch_size, len(batch))
            for name, arr in batch.feeds.items():
                shape = list(arr.shape)
                known = stats.input_shapes.setdefault(name, [])
                if shape not in known:
                    known.append(shape)
            if on_batch is not None:
                on_batch(batch)
    finally:
        pending.put(None)
        worker.join()
        if own_runner:
            runner.close()
    if failure:
        raise failure[0]
    # Tensors that never produced float values (integer-typed, or empty) have nothing to calibrate.
    stats.histograms = {n: h for n, h in histograms.items() if h.count or h.nonfinite or h.sentinels}
    return stats


@dataclass(frozen=True)
class SourceSpec:
    """How to open the calibration data again: a worker process opens its own copy."""

    data: Any  # a path or hf: name (what workers can reopen), or a Python iterable / dataset (this process only)
    preprocess: PreprocessSpec | None = None
    input_name: str | None = None
    shuffle: bool = True
    seed: int = 0

    def open(self, model: ModelInfo) -> Any:
        return open_source(self.data, model, self.preprocess, input_name=self.input_name, shuffle=self.shuffle, seed=self.seed)


@dataclass
class CollectRequest:
    """What a collector is asked for: which tensors, over which samples, in what batches."""

    spec: SourceSpec
    tensors: Sequence[str]
    batch_size: int
    num_samples: int | None
    bins: int
    warnings: list[str] = field(default_factory=list)  # notes for the summary, appended by the collector
    on_samples: Callable[[int], None] = lambda n: None  # progress


class Collector(Protocol):
    """Turns a data source into statistics; the pipeline does not care where the model runs."""

    def collect(self, model: ModelInfo, source: Any, request: CollectRequest) -> CalibrationStats: ...


@dataclass(frozen=True)
class LocalCollector:
    """Collects in this process (one onnxruntime session, histograms folded on a worker thread)."""

    providers: Sequence[str] | None = None
    threads: int | None = None

    def collect(self, model: ModelInfo, source: Any, request: CollectRequest) -> CalibrationStats:
        r = request
        stream = batches(source, model, r.batch_size, r.num_samples, source.description, r.warnings)
        return collect_statistics(
            model, stream, r.tensors, bins=r.bins, providers=self.providers, threads=self.threads, on_batch=lambda b: r.on_samples(len(b))
        )


#: batches in flight during collection besides the one onnxruntime computes: one queued, one folded
_QUEUED_BATCHES = 2
#: copies of its fetched tensors one run holds at its peak: onnxruntime's buffers and the numpy arrays
#: they are copied into (measured: VmHWM of repeated runs on a real CNN fetching every tensor is 2x them)
_RUN_COPIES = 2
MAX_AUTO_BATCH = 256


def tensor_bytes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of every intermediate tensor (and output) for one run on ``feeds``.

    From ONNX shape inference with the inputs' concrete shapes. Tensors whose shape inference
    cannot tell (behind a Reshape to a computed shape, as in every exported transformer) are
    measured: one run on ``feeds`` with those tensors as outputs. Left out, they made a MiniLM
    encoder's estimate 0.9 MB a sample where its run held 30 MB, and calibration 3.8 GB under a 1 GB budget.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    for vi in proto.graph.input:
        if vi.name in feeds:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in feeds[vi.name].shape:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: every tensor is measured
        inferred = proto
    sizes = _inferred_sizes(inferred)
    graphs = [model.graph, *if_branches(model.graph)]  # an If's branches hold activations too (measured lifted out)
    const = set().union(*(constant_tensors(g) for g in graphs))
    unknown = [o for g in graphs for n in g.node for o in n.output if o and o not in sizes and o not in const]
    if unknown:
        sizes.update(_measured_sizes(model, feeds, unknown))
    return sizes


def _measured_sizes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    """Bytes of ``names`` in one onnxruntime run on ``feeds`` (none where the run fails)."""
    try:
        session = make_session(with_outputs(model, names).SerializeToString(), arena=False)
        wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
        return {name: int(np.asarray(value).nbytes) for name, value in zip(wanted, session.run(wanted, feeds), strict=True)}
    except Exception:  # noqa: BLE001 - an estimate: a model that cannot run here fails later with its own message
        return {}


def _inferred_sizes(inferred: onnx.ModelProto) -> dict[str, int]:
    sizes = {}
    graph = inferred.graph
    for vi in [*graph.value_info, *graph.output, *(v for g in if_branches(graph) for v in g.value_info)]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if not tt.HasField("shape") or any(d < 0 for d in dims):
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except (KeyError, TypeError):
            continue
        sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return sizes


def activation_bytes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tensors: Sequence[str]) -> tuple[int, int]:
    """Bytes of (every intermediate tensor, the calibrated tensors) for one run on ``feeds``: an
    upper bound of onnxruntime's activations (it reuses buffers)."""
    sizes = tensor_bytes(model, feeds)
    return _run_bytes(model.graph, sizes), _run_bytes(model.graph, sizes, set(tensors))


def _run_bytes(graph: onnx.GraphProto, sizes: dict[str, int], only: set[str] | None = None) -> int:
    """The bytes of ``graph``'s node outputs (those in ``only``) in one run: of each If, only its larger branch runs."""
    total = sum(sizes.get(o, 0) for n in graph.node for o in n.output if o and (only is None or o in only))
    for node in (n for n in graph.node if n.op_type == "If"):
        total += max(_run_bytes(branch, sizes, only) for branch in node_subgraphs(node))
    return total


def tensor_groups(model: ModelInfo, sample: dict[str, np.ndarray], tensors: Sequence[str], max_memory: int) -> list[list[str]]:
    """The calibrated tensors in groups, each collected in its own pass over the data, so that one
    sample's activations stay near ``max_memory`` when they do not fit it in one pass.

    A pass keeps its group's tensors until the run ends (they are the run's outputs) and queues
    them for the histograms, while onnxruntime frees the others as it goes: a group costs about
    (run copies + queued batches) x its bytes, plus twice the model's largest tensor for the run itself.
    A tensor too large for any group gets one of its own. Order is kept, so the ranges are the
    same bytes as one pass's."""
    specs = {i.name: i for i in model.inputs}
    sizes = tensor_bytes(model.proto, {k: specs[k].batched(v) for k, v in sample.items()})
    room = max_memory - 2 * max(sizes.values(), default=0)
    groups: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        cost = (_RUN_COPIES + _QUEUED_BATCHES) * sizes.get(name, 0)
        if groups[-1] and used + cost > room:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += cost
    return groups


def batch_size_for(model: ModelInfo, sample: dict[str, np.ndarray], tensors: Sequence[str], max_memory: int) -> tuple[int, int]:
    """The largest batch whose activations fit ``max_memory``, and the bytes one sample needs.

    A sample costs its intermediate tensors (onnxruntime's run), the copy of the calibrated ones
    the run hands back, and those of the batches queued for the histograms. A model with a fixed
    batch dimension keeps it.
    """
    fixed = fixed_batch(model)
    specs = {i.name: i for i in model.inputs}
    one = {k: specs[k].batched(v, fixed or 1) for k, v in sample.items()}
    total, chosen = activation_bytes(model.proto, one, tensors)
    per_sample = (total + (_RUN_COPIES - 1 + _QUEUED_BATCHES) * chosen) // (fixed or 1)
    if fixed is not None:
        return fixed, per_sample
    if per_sample <= 0:
        return 32, 0  # no estimate: the former default
    return max(1, min(MAX_AUTO_BATCH, max_memory // per_sample)), per_sample
