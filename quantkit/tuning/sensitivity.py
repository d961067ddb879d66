"""Per-node sensitivity: which quantized nodes cost accuracy, keyed by ONNX node name.

For every node the placement quantizes, three measures:
- enable-one: the loss when only that node is INT8 (everything else FP32);
- disable-one: the loss recovered when only that node stays in high precision (everything else INT8);
- output SQNR: FP32 vs all-INT8 activation at the node's output, from a single pass.

Accuracy is the task metric where labels exist and top-1 agreement with FP32 otherwise. SQNR of
the model's first output is recorded always. Variants are built by toggling the Q/DQ of one node
through a precision plan, and calibration is reused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from quantkit.backends.ort import make_session, with_outputs
from quantkit.data.batching import Batch, batches
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.metrics import METRICS, Metric, sqnr_db, top1_agreement
from quantkit.evaluation.variants import CalibrationInput
from quantkit.export.apply import apply_plan
from quantkit.export.qdq import quantize_model
from quantkit.model import ModelInfo, load_model
from quantkit.options import DataOptions, ExportOptions
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


@dataclass
class Score:
    accuracy: float  # the task metric, or top-1 agreement with FP32 without labels
    agreement: float
    sqnr_db: float
    latency_ms: float | None = None


class Evaluator:
    """Runs candidate models on validation batches against the FP32 reference, counting evaluations."""

    def __init__(
        self,
        model: ModelInfo,
        data: Sequence[Batch],
        metric: tuple[str, Metric] | None,
        labels: Sequence | None,
        *,
        reference: list[np.ndarray] | None = None,
        parent: Evaluator | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.data = list(data)
        self.metric = metric if labels is not None else None
        self.labels = list(labels) if labels is not None else None
        self.parent = parent
        self.threads = threads
        self.evaluations = 0  # passes over this evaluator's samples
        self.cost = 0.0  # in passes over the full validation set (subset passes count fractionally)
        self.samples = sum(len(b) for b in self.data)
        self.reference = reference if reference is not None else self._run(model.proto)
        self.baseline = self.score_outputs(self.reference)

    def subset(self, samples: int) -> Evaluator:
        """An evaluator on the first batches holding at least ``samples`` samples, whose passes count
        toward this one's cost as the fraction of the data they cover."""
        taken, n = [], 0
        for batch in self.data:
            if n >= samples:
                break
            taken.append(batch)
            n += len(batch)
        if n >= self.samples:
            return self
        reference = [r[:n] for r in self.reference]
        return Evaluator(self.model, taken, self.metric, self.labels[:n] if self.labels else None, reference=reference, parent=self)

    @property
    def accuracy_name(self) -> str:
        return self.metric[0] if self.metric else "top-1 agreement"

    def _session(self, proto: onnx.ModelProto) -> Any:
        return make_session(proto, threads=self.threads, source=self.model.path)

    def _run(self, proto: onnx.ModelProto, session: Any = None) -> list[np.ndarray]:
        session = session or self._session(proto)
        outs = [session.run(None, b.feeds) for b in self.data]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]

    def score_outputs(self, outputs: list[np.ndarray]) -> Score:
        agreement = top1_agreement(self.reference[0], outputs[0])
        accuracy = float(self.metric[1](outputs, self.labels)) if self.metric else agreement
        return Score(accuracy, agreement, sqnr_db(self.reference[0], outputs[0]))

    def account(self) -> None:
        """Count one pass over this evaluator's samples (also when a remote worker made it)."""
        self.evaluations += 1
        root, share = self, 1.0
        while root.parent is not None:
            share *= root.samples / root.parent.samples
            root = root.parent
        root.cost += share

    def evaluate(self, proto: onnx.ModelProto, latency: bool = False) -> Score:
        self.account()
        session = self._session(proto)
        score = self.score_outputs(self._run(proto, session))
        if latency:
            one = {k: v[:1] for k, v in self.data[0].feeds.items()}
            for _ in range(3):
                session.run(None, one)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                session.run(None, one)
                times.append((time.perf_counter() - start) * 1000)
            score.latency_ms = float(np.median(times))
        return score

    def standard_error(self, accuracy: float) -> float:
        """Binomial standard error of an accuracy on this many samples, in points."""
        return 100 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(self.samples, 1))


def build_candidate(
    model: ModelInfo, ranges: RangeSet, plan: PrecisionPlan, *, method: str | None, target: str, allow_missing: bool = True
) -> onnx.ModelProto:
    """The model with ``plan`` applied (see ``quantkit.export.apply.apply_plan``)."""
    return apply_plan(model, ranges, plan, ExportOptions(method, target, allow_missing), range_aware_fp16=False).model


class SensitivityTimeout(Exception):
    """The analysis ran past its deadline."""


class TrialExecutor(Protocol):
    """Evaluates precision plans: here (``LocalExecutor``) or on Ray workers (``scaleout.ray.RayExecutor``)."""

    workers: int
    notes: list[str]

    def map(self, evaluator: Evaluator, plans: Sequence[PrecisionPlan], latency: bool = False) -> list[Score]: ...


class LocalExecutor:
    """Evaluates precision plans one after another in this process (``RayExecutor`` spreads them)."""

    workers = 1

    def __init__(self, model: ModelInfo, ranges: RangeSet, method: str | None, target: str) -> None:
        self.model, self.ranges, self.method, self.target = model, ranges, method, target
        self.notes: list[str] = []

    def map(self, evaluator: Evaluator, plans: Sequence[PrecisionPlan], latency: bool = False) -> list[Score]:
        return [
            evaluator.evaluate(build_candidate(self.model, self.ranges, p, method=self.method, target=self.target), latency) for p in plans
        ]


@dataclass
class NodeSensitivity:
    name: str
    op_type: str
    enable_one_loss: float  # accuracy points lost when only this node is INT8
    disable_one_gain: float  # accuracy points recovered when only this node stays FP32
    enable_one_sqnr_db: float
    output_sqnr_db: float  # its output activation, FP32 vs all-INT8

    def to_json(self) -> dict[str, Any]:
        return {k: (v if not (isinstance(v, float) and math.isinf(v)) else None) for k, v in asdict(self).items()}


@dataclass
class SensitivityResult:
    nodes: list[NodeSensitivity]  # ranked, most sensitive first
    all_int8: Score
    baseline: Score
    evaluations: int
    seconds: float
    accuracy_name: str
    notes: list[str] = field(default_factory=list)

    def ranking(self) -> list[str]:
        return [n.name for n in self.nodes]

    def table(self, limit: int = 20) -> str:
        lines = [
            f"{len(self.nodes)} quantized nodes; FP32 {self.accuracy_name} {self.baseline.accuracy * 100:.2f}%, "
            f"all-INT8 {self.all_int8.accuracy * 100:.2f}% ({self.evaluations} evaluations, {self.seconds:.1f} s)",
            "",
            "| rank | node | op | disable-one gain (points) | enable-one loss (points) | output SQNR dB |",
            "|---|---|---|---|---|---|",
        ]
        for i, n in enumerate(self.nodes[:limit], 1):
            lines.append(
                f"| {i} | {n.name} | {n.op_type} | {n.disable_one_gain:+.2f} | {n.enable_one_loss:+.2f} | {n.output_sqnr_db:.1f} |"
            )
        return "\n".join(lines + [f"- {n}" for n in self.notes])


def quantized_nodes(
    model: ModelInfo, ranges: RangeSet, *, method: str | None, target: str
) -> tuple[list[str], dict[str, str], onnx.ModelProto]:
    """Nodes the all-INT8 placement quantizes (in graph order), their op types, and the all-INT8 model."""
    q, report = quantize_model(model, ranges, method=method, target=target, allow_missing=True)
    ops = {n.name: n.op_type for n in q.graph.node}
    return list(report.int8_nodes), ops, q


def output_sqnr(model: ModelInfo, all_int8: onnx.ModelProto, nodes: Sequence[str], data: Sequence[Batch]) -> dict[str, float]:
    """SQNR of each node's output activation, FP32 vs all-INT8, from one pass of each model."""
    names = {}
    for node in model.proto.graph.node:
        if node.name in nodes and node.output:
            names[node.name] = node.output[0]

    def run(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        session = make_session(with_outputs(proto, list(names.values())))
        wanted = list(dict.fromkeys(names.values()))
        values: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for b in data:
            for t, v in zip(wanted, session.run(wanted, b.feeds), strict=True):
                values[t].append(v)
        return {t: np.concatenate(v) for t, v in values.items()}

    try:
        ref, got = run(model.proto), run(all_int8)
    except Exception:  # noqa: BLE001 - a tensor renamed by folding (onnxruntime target): SQNR unavailable
        return {}
    return {node: sqnr_db(ref[t], got[t]) for node, t in names.items() if t in got}


def analyze(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    *,
    method: str | None = None,
    target: str = "tensorrt",
    nodes: Sequence[str] | None = None,
    subset: int | None = 256,
    executor: Any = None,
    deadline: float | None = None,
) -> SensitivityResult:
    """Enable-one / disable-one / output SQNR for every quantized node, ranked by disable-one gain.

    ``deadline`` (a ``time.perf_counter()`` value): checked between groups of evaluations;
    past it, ``SensitivityTimeout`` is raised (a tuner's ``--timeout`` holds in every phase).

    The per-node evaluations run on the first ``subset`` validation samples (all with None): a
    ranking needs less precision than the final check, which the tuner makes on the full set.
    """
    start = time.perf_counter()
    evaluator = evaluator.subset(subset) if subset else evaluator
    all_nodes, ops, all_int8_model = quantized_nodes(model, ranges, method=method, target=target)
    chosen = [n for n in all_nodes if nodes is None or n in nodes]
    if not chosen:
        raise QuantkitError("the placement quantizes no node of this model: nothing to analyse")
    base = evaluator.baseline
    all_int8 = evaluator.evaluate(all_int8_model)
    act = output_sqnr(model, all_int8_model, chosen, evaluator.data[: max(1, len(evaluator.data) // 4)])
    executor = executor or LocalExecutor(model, ranges, method, target)
    plans = [PrecisionPlan(default="fp32", nodes={name: "int8"}) for name in chosen]
    plans += [PrecisionPlan(default="int8", nodes={name: "fp32"}) for name in chosen]
    group = max(1, executor.workers) * 4
    scores: list[Score] = []
    for start_at in range(0, len(plans), group):
        if deadline is not None and time.perf_counter() > deadline:
            raise SensitivityTimeout(f"sensitivity stopped after {len(scores)} of {len(plans)} evaluations: the time is up")
        scores += executor.map(evaluator, plans[start_at : start_at + group])
    result = []
    for k, name in enumerate(chosen):
        only, without = scores[k], scores[len(chosen) + k]
        result.append(
            NodeSensitivity(
                name=name,
                op_type=ops.get(name, "?"),
                enable_one_loss=100 * (base.accuracy - only.accuracy),
                disable_one_gain=100 * (without.accuracy - all_int8.accuracy),
                enable_one_sqnr_db=only.sqnr_db,
                output_sqnr_db=act.get(name, math.nan),
            )
        )
    # most sensitive first: what keeping it in FP32 recovers, then what quantizing it alone costs
    result.sort(key=lambda n: (-round(n.disable_one_gain, 6), -round(n.enable_one_loss, 6), n.enable_one_sqnr_db))
    notes = []
    se = evaluator.standard_error(base.accuracy)
    if se > 0.5:
        notes.append(
            f"{evaluator.samples} validation samples give a standard error of {se:.2f} points on "
            f"{evaluator.accuracy_name}: differences below that are noise"
        )
    if evaluator.parent is not None:
        notes.append(f"ranked on the first {evaluator.samples} of {evaluator.parent.samples} validation samples")
    notes += executor.notes
    return SensitivityResult(result, all_int8, base, evaluator.evaluations, time.perf_counter() - start, evaluator.accuracy_name, notes)


def prepare(
    model: str | Path | ModelInfo,
    val: str | Path,
    *,
    calib: str | Path | None = None,
    ranges_path: str | Path | None = None,
    method: str = "entropy",
    data_options: DataOptions | None = None,
    num_calib_samples: int | None = None,
    metric: str = "top1",
    use_labels: bool = True,
) -> tuple[ModelInfo, RangeSet, Evaluator]:
    """What sensitivity and tuning start from: the model, its ranges (loaded, or calibrated with
    ``method`` only) and an evaluator over the validation data (its task metric where it has labels)."""
    data_options = data_options or DataOptions()
    info = model if isinstance(model, ModelInfo) else load_model(model)
    if ranges_path is None and calib is None:
        raise QuantkitError("give calibration data (calib) or a ranges file (ranges)", option="calib")
    ranges = CalibrationInput(
        info, calib, ranges_path, data_options.preprocess, num_calib_samples, data_options.batch_size, methods=method
    ).ranges()
    if metric not in METRICS:
        raise QuantkitError(f"unknown metric '{metric}'; built in: {', '.join(METRICS)}", option="metric")
    source = open_source(val, info, data_options.preprocess, shuffle=False)
    batches_ = list(batches(source, info, data_options.batch_size or 32, data_options.num_samples, source.description))
    labels = [label for b in batches_ for label in b.labels]
    labelled = use_labels and bool(labels) and all(label is not None for label in labels)
    return info, ranges, Evaluator(info, batches_, (metric, METRICS[metric]) if labelled else None, labels if labelled else None)
