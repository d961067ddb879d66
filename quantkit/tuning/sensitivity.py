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

from quantkit._io import step_bar
from quantkit.backends.ort import make_session, with_outputs
from quantkit.data.batching import Batch, batches, first_sample, join_outputs
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import token_positions, zero_padding
from quantkit.evaluation.metrics import sqnr_db, top1_agreement
from quantkit.evaluation.objectives import BUILT_IN, SQNR_CAP_DB, Measurement, Objective, choose_objective, format_value, from_callable
from quantkit.evaluation.objectives import objective as objective_named
from quantkit.evaluation.run import fitting_batch
from quantkit.evaluation.variants import CalibrationInput
from quantkit.export.apply import apply_plan
from quantkit.export.qdq import quantize_model
from quantkit.model import ModelInfo, if_branches, load_model
from quantkit.options import DEFAULT_MAX_MEMORY, DataOptions, ExportOptions, given
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


@dataclass
class Score:
    accuracy: float  # the objective's value (a fraction, or dB for sqnr)
    agreement: float
    sqnr_db: float
    latency_ms: float | None = None
    noise: float = 0.0  # bootstrap standard error of ``accuracy`` over samples, in the objective's unit


class Evaluator:
    """Runs candidate models on validation batches against the FP32 reference, counting evaluations.

    ``objective``: an ``Objective``, a name (``"auto"`` chooses from the outputs and labels, see
    ``choose_objective``), or an older ``(name, metric)`` pair; ``labels`` None without them.
    """

    def __init__(
        self,
        model: ModelInfo,
        data: Sequence[Batch],
        objective: Objective | str | tuple[str, Any] | None = "auto",
        labels: Sequence | None = None,
        *,
        reference: list[np.ndarray] | None = None,
        parent: Evaluator | None = None,
        threads: int | None = None,
        objective_params: dict[str, float] | None = None,
    ) -> None:
        self.model = model
        self.data = list(data)
        self.labels = list(labels) if labels is not None else None
        self.parent = parent
        self.threads = threads
        self.evaluations = 0  # passes over this evaluator's samples
        self.cost = 0.0  # in passes over the full validation set (subset passes count fractionally)
        self.samples = sum(len(b) for b in self.data)
        # a transformer's real tokens: its padding is zeroed in every output, so no score counts it
        self.tokens = token_positions([b.feeds for b in self.data])
        self.reference = reference if reference is not None else self._run(model.proto)
        self.objective = resolve_objective(objective, self.reference, self.labels, **(objective_params or {}))
        if self.objective.needs_labels and self.labels is None:
            raise QuantkitError(f"the {self.objective.name} objective needs labels, and the validation data has none", option="metric")
        measured = self.objective.measure(self.reference, self.reference, self.labels)
        self.baseline = self._score(self.reference, measured)
        self.warning = measured.warning()

    def subset(self, samples: int) -> Evaluator:
        """An evaluator on ``samples`` samples spread evenly over the data (validation sets are often
        sorted by class: their first samples are not a fair sample), in batches of the same size;
        its passes count toward this one's cost as the fraction of the data they cover."""
        if samples >= self.samples:
            return self
        rows = np.unique(np.linspace(0, self.samples - 1, samples).round().astype(np.int64))
        names = list(self.data[0].feeds)
        feeds = {n: np.concatenate([b.feeds[n] for b in self.data])[rows] for n in names}
        ids = [i for b in self.data for i in b.ids]
        size = len(self.data[0])
        taken = [
            Batch([ids[r] for r in rows[k : k + size]], {n: v[k : k + size] for n, v in feeds.items()}) for k in range(0, len(rows), size)
        ]
        reference = [r[rows] for r in self.reference]
        labels = [self.labels[r] for r in rows] if self.labels is not None else None
        return Evaluator(self.model, taken, self.objective, labels, reference=reference, parent=self, threads=self.threads)

    @property
    def accuracy_name(self) -> str:
        return self.objective.name

    def _session(self, proto: onnx.ModelProto) -> Any:
        return make_session(proto, threads=self.threads, source=self.model.path)

    def _run(self, proto: onnx.ModelProto, session: Any = None) -> list[np.ndarray]:
        session = session or self._session(proto)
        outs = [session.run(None, b.feeds) for b in self.data]
        sizes = [len(b) for b in self.data]
        return [zero_padding(join_outputs([o[i] for o in outs], sizes), self.tokens) for i in range(len(outs[0]))]

    def score_outputs(self, outputs: list[np.ndarray]) -> Score:
        outputs = [zero_padding(o, self.tokens) for o in outputs]  # outputs run elsewhere (Ray workers) too
        return self._score(outputs, self.objective.measure(outputs, self.reference, self.labels))

    def _score(self, outputs: list[np.ndarray], measured: Measurement) -> Score:
        agreement = top1_agreement(self.reference[0], outputs[0])
        return Score(measured.value, agreement, sqnr_db(self.reference[0], outputs[0]), noise=measured.noise())

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
            one = first_sample(self.model, self.data[0].feeds)
            for _ in range(3):
                session.run(None, one)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                session.run(None, one)
                times.append((time.perf_counter() - start) * 1000)
            score.latency_ms = float(np.median(times))
        return score

    def drop(self, score: Score) -> float:
        """How far a score is below FP32, in the objective's unit (points, or dB)."""
        return self.objective.drop(self.baseline.accuracy, score.accuracy)


def resolve_objective(
    objective: Objective | str | tuple[str, Any] | None, reference: list[np.ndarray], labels: Sequence | None, **params: float
) -> Objective:
    """An ``Objective`` from what callers pass: itself, a name (``auto``: chosen), a callable, or a legacy pair.

    ``params``: ``conf`` and ``threshold`` of the detection and map objectives.
    """
    if isinstance(objective, Objective):
        return objective
    if objective is None or objective == "auto":
        return choose_objective([r.shape for r in reference], labels is not None, reference[0], **params)
    if isinstance(objective, tuple):
        name, fn = objective
        return objective_named(name, **params) if isinstance(name, str) and name in BUILT_IN else from_callable(fn, name)
    if callable(objective):
        return from_callable(objective)
    return objective_named(objective, **params)


def build_candidate(
    model: ModelInfo, ranges: RangeSet, plan: PrecisionPlan, *, method: str | None, target: str, allow_missing: bool = True
) -> onnx.ModelProto:
    """The model with ``plan`` applied (see ``quantkit.export.apply.apply_plan``)."""
    return apply_plan(model, ranges, plan, ExportOptions(method, target, allow_missing), range_aware_fp16=False).model


RANKINGS = ("disable-one", "sqnr")


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
    local_sqnr_db: float = math.nan  # the node alone quantized, on FP32's inputs: the error it adds itself

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
    unit: str = "points"  # of the gains and losses: percentage points, or dB (sqnr)

    def ranking(self) -> list[str]:
        return [n.name for n in self.nodes]

    def table(self, limit: int = 20) -> str:
        lines = [
            f"{len(self.nodes)} quantized nodes; FP32 {self.accuracy_name} {format_value(self.baseline.accuracy, self.unit)}, "
            f"all-INT8 {format_value(self.all_int8.accuracy, self.unit)} ({self.evaluations} evaluations, {self.seconds:.1f} s)",
            "",
            f"| rank | node | op | disable-one gain ({self.unit}) | enable-one loss ({self.unit}) | output SQNR dB | local SQNR dB |",
            "|---|---|---|---|---|---|---|",
        ]

        def num(x: float, spec: str) -> str:
            return "–" if math.isnan(x) else f"{x:{spec}}"

        for i, n in enumerate(self.nodes[:limit], 1):
            lines.append(
                f"| {i} | {n.name} | {n.op_type} | {num(n.disable_one_gain, '+.2f')} | {num(n.enable_one_loss, '+.2f')} "
                f"| {num(n.output_sqnr_db, '.1f')} | {num(n.local_sqnr_db, '.1f')} |"
            )
        return "\n".join(lines + [f"- {n}" for n in self.notes])


def quantized_nodes(
    model: ModelInfo, ranges: RangeSet, *, method: str | None, target: str
) -> tuple[list[str], dict[str, str], onnx.ModelProto]:
    """Nodes the all-INT8 placement quantizes (in graph order), their op types, and the all-INT8 model."""
    q, report = quantize_model(model, ranges, method=method, target=target, allow_missing=True)
    ops = {n.name: n.op_type for g in [q.graph, *if_branches(q.graph)] for n in g.node}
    return list(report.int8_nodes), ops, q


def _capture(proto: onnx.ModelProto, names: list[str], data: Sequence[Batch], extra: Any = None) -> dict[str, np.ndarray]:
    """The values of ``names`` over ``data`` (``extra(batch_index)`` adds feeds)."""
    session = make_session(with_outputs(proto, names))
    inputs = {i.name for i in session.get_inputs()}
    values: dict[str, list[np.ndarray]] = {t: [] for t in names}
    for k, b in enumerate(data):
        feeds = {**b.feeds, **(extra(k) if extra else {})}
        for t, v in zip(names, session.run(names, {n: v for n, v in feeds.items() if n in inputs}), strict=True):
            values[t].append(v)
    return {t: np.concatenate(v) for t, v in values.items()}


def activation_sqnr(
    model: ModelInfo, all_int8: onnx.ModelProto, nodes: Sequence[str], data: Sequence[Batch]
) -> dict[str, tuple[float, float]]:
    """Per node, (output SQNR, local SQNR) in dB against FP32, from one pass of each model.

    The output SQNR is the all-INT8 model's error at the node's output, accumulated from every
    node before it. The local SQNR is the error of the node alone: the all-INT8 model with every
    QuantizeLinear fed FP32's activation instead of its own, so each node sees exact inputs,
    quantizes them and its weights, and nothing upstream hides or adds to its error.
    """
    outputs = {n.name: n.output[0] for n in model.proto.graph.node if n.name in nodes and n.output}
    constants = {i.name for i in all_int8.graph.initializer} | {o for n in all_int8.graph.node if n.op_type == "Constant" for o in n.output}
    local = onnx.ModelProto()
    local.CopyFrom(all_int8)
    fed: dict[str, str] = {}  # FP32 activation -> the input name its QuantizeLinear now reads
    for node in local.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            fed.setdefault(node.input[0], f"{node.input[0]}::fp32")
            node.input[0] = fed[node.input[0]]
    wanted = list(dict.fromkeys(outputs.values()))
    try:
        ref = _capture(model.proto, list(dict.fromkeys([*wanted, *fed])), data)
        got = _capture(all_int8, wanted, data)
        for t, name in fed.items():
            elem = onnx.helper.np_dtype_to_tensor_dtype(ref[t].dtype)
            local.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
        alone = _capture(local, wanted, data, lambda k: {name: _rows_of(ref[t], data, k) for t, name in fed.items()})
    except Exception:  # noqa: BLE001 - a tensor renamed by folding (onnxruntime target): SQNR unavailable
        return {}

    def db(a: np.ndarray, b: np.ndarray) -> float:
        return min(SQNR_CAP_DB, sqnr_db(a, b))

    return {node: (db(ref[t], got[t]), db(ref[t], alone[t])) for node, t in outputs.items()}


def _rows_of(values: np.ndarray, data: Sequence[Batch], k: int) -> np.ndarray:
    """The rows of batch ``k`` in values concatenated over ``data``."""
    start = sum(len(b) for b in data[:k])
    return values[start : start + len(data[k])]


def rank_nodes(
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
    enable_one: bool = True,
    ranking: str = "disable-one",
    quiet: bool = True,
) -> SensitivityResult:
    """Enable-one / disable-one / output SQNR for every quantized node, ranked by disable-one gain.

    Gains within the objective's noise (the bootstrap standard error of the all-INT8 score) are
    not told apart by their noisy values: those nodes are ranked by SQNR, a measure that does
    not depend on how few samples flip. ``enable_one=False`` skips the enable-one pass (half
    the cost; the tuner ranks by disable-one only). ``ranking="sqnr"`` makes no per-node
    evaluation at all: nodes are ranked by their local SQNR (see ``activation_sqnr``: three
    passes over a quarter of the subset, besides the all-INT8 evaluation).

    ``deadline`` (a ``time.perf_counter()`` value): checked between groups of evaluations;
    past it, ``SensitivityTimeout`` is raised (a tuner's ``--timeout`` holds in every phase).

    The per-node evaluations run on ``subset`` validation samples spread over the set (all with
    None): a ranking needs less precision than the final check, which the tuner makes on the full set.
    """
    start = time.perf_counter()
    evaluator = evaluator.subset(subset) if subset else evaluator
    all_nodes, ops, all_int8_model = quantized_nodes(model, ranges, method=method, target=target)
    chosen = [n for n in all_nodes if nodes is None or n in nodes]
    if not chosen:
        raise QuantkitError("the placement quantizes no node of this model: nothing to analyse")
    base = evaluator.baseline
    all_int8 = evaluator.evaluate(all_int8_model)
    if ranking not in RANKINGS:
        raise QuantkitError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}", option="ranking")
    act = activation_sqnr(model, all_int8_model, chosen, evaluator.data[: max(1, len(evaluator.data) // 4)])
    if ranking == "sqnr" and not act:
        raise QuantkitError(
            "per-node SQNR is not available for this placement (its tensors are renamed): rank by disable-one", option="ranking"
        )
    executor = executor or LocalExecutor(model, ranges, method, target)
    per_node = ranking != "sqnr"
    plans = [PrecisionPlan(default="fp32", nodes={name: "int8"}) for name in chosen] if enable_one and per_node else []
    plans += [PrecisionPlan(default="int8", nodes={name: "fp32"}) for name in chosen] if per_node else []
    group = max(1, executor.workers) * 4
    scores: list[Score] = []
    bar = step_bar(len(plans), "sensitivity", "evaluation", quiet)
    try:
        for start_at in range(0, len(plans), group):
            if deadline is not None and time.perf_counter() > deadline:
                raise SensitivityTimeout(f"sensitivity stopped after {len(scores)} of {len(plans)} evaluations: the time is up")
            bar.set_postfix_str(next(iter(plans[start_at].nodes)), refresh=False)  # the node being evaluated
            scores += executor.map(evaluator, plans[start_at : start_at + group])
            bar.update(len(plans[start_at : start_at + group]))
    finally:
        bar.close()
    result = []
    objective = evaluator.objective
    with_enable = enable_one and per_node
    disabled = scores[len(chosen) :] if with_enable else scores
    for k, name in enumerate(chosen):
        only = scores[k] if with_enable else None
        without = disabled[k] if per_node else None
        sqnr_out, sqnr_local = act.get(name, (math.nan, math.nan))
        result.append(
            NodeSensitivity(
                name=name,
                op_type=ops.get(name, "?"),
                enable_one_loss=objective.drop(base.accuracy, only.accuracy) if only else math.nan,
                disable_one_gain=-objective.drop(without.accuracy, all_int8.accuracy) if without else math.nan,
                enable_one_sqnr_db=only.sqnr_db if only else math.nan,
                output_sqnr_db=sqnr_out,
                local_sqnr_db=sqnr_local,
            )
        )
    noise = all_int8.noise

    def rank(n: NodeSensitivity) -> tuple[float, float, float]:
        # most sensitive first: a gain above the noise, then the lowest SQNR (enable-one, else the
        # node's local SQNR)
        gain = n.disable_one_gain if n.disable_one_gain > noise else 0.0
        loss = n.enable_one_loss if n.enable_one_loss > noise else 0.0
        sqnr = n.enable_one_sqnr_db if not math.isnan(n.enable_one_sqnr_db) else n.local_sqnr_db
        return (-round(gain, 6), -round(loss, 6), sqnr if not math.isnan(sqnr) else math.inf)

    result.sort(key=rank)
    notes = [f"objective: {objective.describe()}"] + ([f"warning: {evaluator.warning}"] if evaluator.warning else [])
    if noise > 0:
        notes.append(
            f"the all-INT8 {objective.name} has a standard error of {noise:.2f} {objective.unit} over {evaluator.samples} samples: "
            "gains below that are ranked by SQNR instead"
        )
    if evaluator.parent is not None:
        notes.append(f"ranked on {evaluator.samples} of {evaluator.parent.samples} validation samples, spread evenly over them")
    notes += executor.notes
    seconds = time.perf_counter() - start
    return SensitivityResult(result, all_int8, base, evaluator.evaluations, seconds, evaluator.accuracy_name, notes, objective.unit)


def prepare(
    model: str | Path | ModelInfo,
    val: str | Path,
    *,
    calib: str | Path | None = None,
    ranges_path: str | Path | None = None,
    method: str = "entropy",
    data_options: DataOptions | None = None,
    num_calib_samples: int | None = None,
    metric: Objective | str | Any = "auto",
    use_labels: bool = True,
    conf: float = 0.25,
    mask_threshold: float = 0.5,
) -> tuple[ModelInfo, RangeSet, Evaluator]:
    """What sensitivity and tuning start from: the model, its ranges (loaded, or calibrated with
    ``method`` only) and an evaluator over the validation data with its objective (``metric``: a
    name, ``auto``, a user ``module:function``, a callable or an ``Objective``)."""
    data_options = given(data_options, DataOptions, "data_options")
    info = model if isinstance(model, ModelInfo) else load_model(model)
    if ranges_path is None and calib is None:
        raise QuantkitError("give calibration data (calib) or a ranges file (ranges)", option="calib")
    ranges = CalibrationInput(
        info, calib, ranges_path, data_options.preprocess, num_calib_samples, data_options.batch_size, methods=method
    ).ranges()
    params = {"conf": conf, "threshold": mask_threshold}
    if isinstance(metric, str) and metric != "auto":
        metric = objective_named(metric, **params)  # a bad name fails before the validation pass
    source = open_source(val, info, data_options.preprocess, shuffle=False, class_names=data_options.class_names)
    batch = data_options.batch_size or fitting_batch(info, source, DEFAULT_MAX_MEMORY)  # a batch that fits, as eval's
    batches_ = list(batches(source, info, batch, data_options.num_samples, source.description))
    labels = [label for b in batches_ for label in b.labels]
    labelled = use_labels and bool(labels) and all(label is not None for label in labels)
    evaluator = Evaluator(info, batches_, metric, labels if labelled else None, objective_params=params)
    return info, ranges, evaluator
