"""Evaluation: every variant of a model against the FP32 baseline, for accuracy, fidelity, speed and size.

A variant is built on the fly from the model and the calibration data, or taken from a file:
- ``fp32`` is the model itself;
- ``fp16`` is ``quantkit.fp16.convert_fp16``;
- ``int8:<method>`` is ``quantkit.qdq.quantize_model`` with that method's ranges. Its placement
  follows the runtime: onnxruntime's on ``ort-*``, TensorRT's on ``tensorrt``.
  ``int8-tensorrt:<method>`` / ``int8-onnxruntime:<method>`` choose the placement explicitly;
- ``modelopt`` is NVIDIA ModelOpt's ONNX INT8 quantization, where ``nvidia-modelopt`` is installed;
- ``NAME=path.onnx`` is a model file of the user's.

A variant that fails to build or run is recorded with its error, and the others still run.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantkit._io import StepTimer, step_bar
from quantkit.backends.ort import make_session, runtime_providers
from quantkit.calibration.collect import batch_size_for
from quantkit.data.batching import Batch, batches, check_sample, fixed_batch, join_outputs
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.check import judge_outputs, token_positions, zero_padding
from quantkit.evaluation.decision import decide
from quantkit.evaluation.latency import Latency, hardware, measure_all
from quantkit.evaluation.metrics import OutputFidelity, fidelity
from quantkit.evaluation.objectives import Objective, choose_objective, from_callable, objective
from quantkit.evaluation.task import recurrent_states
from quantkit.evaluation.variants import CalibrationInput, build_variants, layer_precisions, parse_variants
from quantkit.model import ModelInfo, load_model
from quantkit.options import DataOptions, EvalOptions, RuntimeOptions, given


@dataclass
class VariantResult:
    """One variant's measurements. ``metrics`` holds each objective's value as it is computed: a
    fraction in [0, 1] for accuracies (top1 0.981 is 98.1%), dB for sqnr; ``noise`` holds the
    bootstrap standard error in the report's unit: points (percentage points) for fractions, dB
    for sqnr."""

    name: str
    size_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fidelity: list[OutputFidelity] = field(default_factory=list)
    latency: Latency | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    collapsed: list[str] = field(default_factory=list)  # outputs the fidelity check finds broken
    noise: dict[str, float] = field(default_factory=dict)  # bootstrap standard error of each metric, in its unit
    precisions: dict[str, int] = field(default_factory=dict)  # layers by the precision their ONNX types give them


@dataclass
class EvalResult:
    model: dict[str, Any]
    runtime: str
    providers: list[str]
    hardware: str
    data: dict[str, Any]
    metric_names: list[str]
    labelled: bool
    variants: list[VariantResult]
    max_drop: float | None = None
    flags: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    objective: str = ""  # the first metric, with why it was chosen
    decisions: list[Any] = field(default_factory=list)  # what to ship per target (quantkit.evaluation.decision)
    units: dict[str, str] = field(default_factory=dict)  # metric -> "points" (a fraction) or "dB"

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)


def _slices(asked: dict | None, name: str, reference: np.ndarray, tokens: np.ndarray | None) -> Any:
    """The slices to check on an output: --slice's, else none along a transformer's sequence axis
    (axis 1 of a [batch, sequence, ...] output holds positions, not channels, and the positions
    near the longest text's end hold a few real tokens each), else the automatic ones."""
    if asked and name in asked:
        return asked[name]
    if tokens is not None and reference.ndim >= 2 and reference.shape[:2] == tokens.shape:
        return []
    return None


def _collect(data: Sequence[Batch], session: Any) -> list[np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    per_output: list[list[np.ndarray]] = [[] for _ in names]
    for batch in data:
        for i, value in enumerate(session.run(names, batch.feeds)):
            per_output[i].append(np.asarray(value))
    return [join_outputs(v, [len(b) for b in data]) for v in per_output]


def evaluate(
    model: str | Path | ModelInfo,
    data: str | Path | Any,
    options: EvalOptions | None = None,
    *,
    data_options: DataOptions | None = None,
    runtime: RuntimeOptions | None = None,
    calib: str | Path | None = None,
    ranges_path: str | Path | None = None,
    workdir: str | Path | None = None,
    quiet: bool = True,
) -> EvalResult:
    """Evaluate every variant on ``data`` against FP32 (see the module docstring).

    ``data`` is what ``calibrate`` takes (a path, ``hf:NAME``, a dataset or an iterable of
    ``{input_name: array}`` dicts). ``calib`` or ``ranges_path`` give int8 variants their ranges.
    """
    options = given(options, EvalOptions, "options")
    data_options = given(data_options, DataOptions, "data_options") if data_options is not None else DataOptions(shuffle=False)
    runtime = given(runtime, RuntimeOptions, "runtime")
    timer = StepTimer(quiet)
    info = model if isinstance(model, ModelInfo) else load_model(model)
    specs = parse_variants(options.variants, runtime.runtime)
    spec = data_options.preprocess or PreprocessSpec()
    calibration = CalibrationInput(info, calib, ranges_path, spec, options.num_calib_samples, data_options.batch_size)
    if ranges_path is not None:  # ranges of another model are refused before any work, as quantize refuses them
        calibration.ranges().check_model(info.path, info.sha256)
    params = {"conf": options.conf, "threshold": options.mask_threshold}
    # named metrics are checked before any work; "auto" is chosen once FP32's outputs are known
    chosen: list[Objective | str] = [m if m == "auto" else _objective(m, params) for m in options.metrics]
    with timer.step("load validation data"):
        source = open_source(
            data,
            info,
            spec,
            input_name=data_options.input_name,
            shuffle=data_options.shuffle,
            seed=data_options.seed,
            label_column=data_options.label_column,
            class_names=data_options.class_names,
        )
        batch = data_options.batch_size or fitting_batch(info, source, options.max_memory)
        val = list(batches(source, info, batch, data_options.num_samples, source.description))
    run = _Run(val, options, runtime, list(runtime.providers or runtime_providers(runtime.runtime)), params, chosen)
    run.labels = _checked_labels(val, options, data_options, chosen, source.description)
    run.tokens = token_positions([b.feeds for b in val])  # a transformer's real tokens: padding is left out of every metric
    if run.tokens is not None:
        run.notes.append(
            f"padding left out: metrics count the {int(run.tokens.sum())} real tokens of the attention mask, of {run.tokens.size}"
        )
    with tempfile.TemporaryDirectory(prefix="quantkit-eval-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with timer.step("build variants"):
            built = build_variants(info, specs, work, calibration)
        with timer.step("run variants"):
            bar = step_bar(len(specs), "eval", "variant", quiet)
            results = []
            for spec_ in specs:
                bar.set_postfix_str(spec_.name, refresh=False)
                results.append(_run_variant(run, spec_, built[spec_.name]))
                bar.update(1)
            bar.close()
        if options.latency and run.timed:
            with timer.step("measure latency"):
                throughput = fixed_batch(info) or min(options.throughput_batch, batch)  # a batch that fits, as the runs'
                measure_all(run.timed, val[0].feeds, throughput, axes=info.batch_axes)
    calibrated = (
        str(calib or ranges_path or "")
        if not callable(getattr(calib, "__iter__", None)) or isinstance(calib, (str, Path))
        else type(calib).__name__
    )
    evaluation = EvalResult(
        model={"path": str(info.path), "sha256": info.sha256},
        runtime=runtime.runtime,
        providers=run.providers,
        hardware=hardware(),
        data={
            "path": str(data) if isinstance(data, (str, Path)) else source.description,
            "samples": sum(len(b) for b in val),
            "calibration": calibrated,
        },
        metric_names=[o.name for o in run.objectives],
        labelled=run.labels is not None,
        variants=results,
        max_drop=options.max_drop,
        flags=run.notes,
        timings=dict(timer.times),
        objective=run.objectives[0].describe() if run.objectives else "",
        units={o.name: o.unit for o in run.objectives},
    )
    label_map = getattr(source, "labels", None)
    if label_map is not None and run.labels is not None:
        evaluation.data["class_mapping"] = {"source": label_map.source, "folders": label_map.index}
        evaluation.flags += _chance_flag(results[0], run, label_map.describe())
    evaluation.flags += flags_for(evaluation)
    evaluation.decisions = decide(evaluation)
    return evaluation


#: FP32 within this many points of chance: the labels likely do not mean the model's classes
NEAR_CHANCE_POINTS = 10.0


def _chance_flag(fp32: VariantResult, run: _Run, mapping: str) -> list[str]:
    """A flag when FP32 itself scores near chance on labelled class scores: then the labels most
    likely name other classes than the model's (a folder-to-class mapping that does not match)."""
    top1 = fp32.metrics.get("top1")
    if top1 is None or not run.labels or run.reference is None or run.reference[0].ndim != 2:
        return []
    labels = [int(v) for v in np.asarray(run.labels).ravel()]
    majority = max(labels.count(v) for v in set(labels)) / len(labels)
    chance = max(majority, 1.0 / run.reference[0].shape[1])
    if 100 * top1 > 100 * chance + NEAR_CHANCE_POINTS:
        return []
    return [
        f"FP32 itself scores {100 * top1:.1f}% top-1, near chance ({100 * chance:.1f}%: the most frequent label, or one of "
        f"{run.reference[0].shape[1]} classes): the labels likely do not mean the model's classes; {mapping}; "
        "give the class names in the model's order (--class-names)"
    ]


def fitting_batch(info: ModelInfo, source: Any, max_memory: int) -> int:
    """The model's fixed batch, else the batch calibration would pick for ``max_memory``
    (``batch_size_for``), at most 32: a 640x640 detector run 32 at a time held 7 GB in eval."""
    fixed = fixed_batch(info)
    first = None if fixed else next(iter(source), None)
    if first is None:
        return fixed or 32  # a fixed batch, or no sample (batches() says so with its own message)
    return min(32, batch_size_for(info, check_sample(first, info.inputs), [], max_memory)[0])


@dataclass
class _Run:
    """What every variant of one evaluation is measured with, and what FP32's run decided."""

    val: list[Batch]
    options: EvalOptions
    runtime: RuntimeOptions
    providers: list[str]
    params: dict[str, float]
    chosen: list[Objective | str]  # "auto" until FP32's outputs are known
    labels: list[Any] | None = None  # per sample, where every sample has one and labels are used
    tokens: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    reference: list[np.ndarray] | None = None  # FP32's outputs
    objectives: list[Objective] = field(default_factory=list)
    timed: list[tuple[VariantResult, Any]] = field(default_factory=list)  # (result, live session) for latency


def _checked_labels(
    val: list[Batch], options: EvalOptions, data_options: DataOptions, chosen: list[Objective | str], description: str
) -> list[Any] | None:
    """The samples' labels when all have one (and labels are used); refuses a metric that needs missing labels."""
    sample_labels = [label for b in val for label in b.labels]
    labelled = options.labels and bool(sample_labels) and all(label is not None for label in sample_labels)
    if data_options.label_column and not labelled:
        raise QuantkitError(
            f"{description} has no labels in {data_options.label_column!r}: name an existing label column, or leave it out",
            option="label_column",
        )
    for m in chosen:
        if isinstance(m, Objective) and m.needs_labels and not labelled:
            raise QuantkitError(
                f"the {m.name} metric needs labels, and {description} has "
                + ("none" if options.labels else "them switched off")
                + ": give labelled data, or leave the metric out (the default compares with FP32)",
                option="metrics",
            )
    return sample_labels if labelled else None


TENSORRT_ON_CPU = (
    "TensorRT-format Q/DQ on a CPU runtime: its accuracy is what TensorRT computes; it is not timed here "
    "(onnxruntime runs it as fake quantization, no guide to TensorRT's speed)"
)


def _precision_counts(path: Path) -> dict[str, int]:
    """How many layers run in each precision (by the ONNX types); empty where the graph cannot be read."""
    try:
        found = layer_precisions(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - a report detail: a model shape inference cannot type still gets evaluated
        return {}
    return dict(sorted(Counter(found.values()).items()))


def _run_variant(run: _Run, spec: Any, target: str | Path) -> VariantResult:
    """One variant's outputs on the validation data, measured against FP32's (which runs first)."""
    result = VariantResult(spec.name)
    if isinstance(target, str):
        result.error = target
        if spec.kind == "fp32":
            raise QuantkitError(f"the FP32 baseline cannot be loaded: {target}")
        return result
    result.size_bytes = Path(target).stat().st_size
    result.precisions = _precision_counts(Path(target))
    tensorrt_format = spec.kind in ("int8", "int8-mixed", "fp8", "int8-sq") and spec.target == "tensorrt"
    if tensorrt_format and run.runtime.runtime != "tensorrt":
        result.notes.append(TENSORRT_ON_CPU)
    try:
        # sessions stay alive to be timed in interleaved rounds: idle ones must not spin on the cores
        session = make_session(str(target), run.providers, spinning=False)
        outputs = [zero_padding(o, run.tokens) for o in _collect(run.val, session)]
    except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
        result.error = f"does not run on {run.runtime.runtime}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
        if spec.kind == "fp32":
            raise QuantkitError(
                f"the FP32 baseline does not run on the data: {result.error}; check the data and its preprocessing (nothing was written)"
            ) from None
        return result
    names = [o.name for o in session.get_outputs()]
    if spec.kind == "fp32":
        _adopt_reference(run, names, outputs)
    assert run.reference is not None  # fp32 runs first, and its failure raised above
    _measure_objectives(run, spec, result, outputs)
    result.fidelity = [
        fidelity(n, r, o, _slices(run.options.slices, n, r, run.tokens)) for n, r, o in zip(names, run.reference, outputs, strict=True)
    ]
    states = recurrent_states({i.name: i.shape for i in session.get_inputs()}, {o.name: o.shape for o in session.get_outputs()})
    result.collapsed = [c.line() for c in judge_outputs(names, run.reference, outputs, states=states) if c.problem]
    if TENSORRT_ON_CPU not in result.notes:  # fake-quantized on a CPU: no candidate for CPU deployment, so not timed
        run.timed.append((result, session))
    return result


def _adopt_reference(run: _Run, names: list[str], outputs: list[np.ndarray]) -> None:
    """FP32's outputs become the reference, and "auto" metrics are chosen from them."""
    run.reference = outputs
    check_slices(run.options.slices, names, outputs)
    labelled = run.labels is not None
    objectives = [
        choose_objective([o.shape for o in outputs], labelled, outputs[0], **run.params) if m == "auto" else m for m in run.chosen
    ]
    run.objectives = [o for i, o in enumerate(objectives) if o.name not in {p.name for p in objectives[:i]}]


def _measure_objectives(run: _Run, spec: Any, result: VariantResult, outputs: list[np.ndarray]) -> None:
    for obj in run.objectives:
        try:
            measured = obj.measure(outputs, run.reference, run.labels)
        except QuantkitError as exc:
            raise QuantkitError(
                f"metric {obj.name} does not fit the outputs of {spec.name} (first output shape "
                f"{list(outputs[0].shape)}): {exc}; choose another metric",
                option="metrics",
            ) from None
        result.metrics[obj.name] = measured.value
        result.noise[obj.name] = measured.noise()
        if spec.kind == "fp32" and measured.warning():
            run.notes.append(f"{obj.name}: {measured.warning()}")


def _objective(metric: Any, params: dict[str, float]) -> Objective:
    if isinstance(metric, Objective):
        return metric
    if callable(metric):
        return from_callable(metric)
    return objective(str(metric), **params)


def check_slices(slices: dict[str, list[tuple[int, int, int]]] | None, names: list[str], outputs: list[np.ndarray]) -> None:
    """Every asked-for slice names an output, an axis it has, and indices inside that axis."""
    for name, ranges in (slices or {}).items():
        if name not in names:
            raise QuantkitError(f"slice of output {name!r}: the model's outputs are {', '.join(names)}", option="slice")
        shape = outputs[names.index(name)].shape
        for axis, start, stop in ranges:
            if not 0 <= axis < len(shape) or not 0 <= start < stop <= shape[axis]:
                raise QuantkitError(f"slice {name}:{axis}:{start}-{stop} is outside the output's shape {list(shape)}", option="slice")


def flags_for(result: EvalResult) -> list[str]:
    """What a user deciding what to deploy must not miss."""
    flags = []
    base = result.variant("fp32") if any(v.name == "fp32" for v in result.variants) else None
    fp16 = next((v for v in result.variants if v.name == "fp16" and v.latency), None)
    for v in result.variants:
        if v.error:
            flags.append(f"{v.name} failed: {v.error}")
            continue
        if v.name.startswith("int8") and fp16 and v.latency and v.latency.batch1_p10_ms >= fp16.latency.batch1_p50_ms:
            # outside the noise: even its fast runs (p10) are no faster than fp16's typical one (p50)
            flags.append(
                f"{v.name} is not faster than fp16 at batch 1 (p10 {v.latency.batch1_p10_ms:.3f} ms >= fp16's p50 "
                f"{fp16.latency.batch1_p50_ms:.3f} ms)"
            )
        if result.max_drop is not None and base is not None and v is not base:
            if result.metric_names:
                key = result.metric_names[0]
                unit = result.units.get(key, "points")
                drop = (100 if unit == "points" else 1) * (base.metrics.get(key, 0) - v.metrics.get(key, 0))
                if drop > result.max_drop:
                    flags.append(f"{v.name} loses {drop:.2f} {unit} of {key}, over the {result.max_drop} budget")
        if v.collapsed:
            flags.append(f"{v.name} is broken (the fidelity check refuses it): " + "; ".join(v.collapsed))
        for f in v.fidelity:
            collapsed = f.collapsed_slices
            if collapsed:
                shown = ", ".join(f"{s.label()} {s.sqnr_db:.1f} dB" for s in collapsed[:6])
                flags.append(f"{v.name}: output {f.output} has {len(collapsed)} collapsed slice(s) along axis {collapsed[0].axis}: {shown}")
    return flags
