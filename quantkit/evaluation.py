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

import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from quantkit.data.batching import Batch, batches
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.methods import METHOD_NAMES
from quantkit.metrics import METRICS, Metric, OutputFidelity, fidelity
from quantkit.model import ModelInfo, load_model
from quantkit.progress import StepTimer

RUNTIMES = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEFAULT_VARIANTS = "fp32,fp16,int8:entropy,int8:minmax,int8:percentile,int8:mse"
MODELOPT_MISSING = (
    "nvidia-modelopt is not installed: pip install quantkit[modelopt] (adds a CUDA build of torch, about 7 GB) to compare with ModelOpt"
)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    kind: str  # fp32, fp16, int8, modelopt, file
    method: str | None = None
    target: str | None = None
    path: Path | None = None


def parse_variants(text: str, runtime: str) -> list[VariantSpec]:
    default_target = "tensorrt" if runtime == "tensorrt" else "onnxruntime"
    specs: list[VariantSpec] = []
    for item in [v.strip() for v in text.split(",") if v.strip()]:
        if "=" in item:
            name, path = item.split("=", 1)
            specs.append(VariantSpec(name, "file", path=Path(path)))
        elif item in ("fp32", "fp16", "modelopt"):
            specs.append(VariantSpec(item, item))
        elif item.startswith("int8"):
            head, _, method = item.partition(":")
            target = head.partition("-")[2] or default_target
            method = method or "entropy"
            if target not in ("tensorrt", "onnxruntime") or method not in METHOD_NAMES:
                raise QuantkitError(f"variant '{item}': use int8[-tensorrt|-onnxruntime]:<{'|'.join(METHOD_NAMES)}>")
            specs.append(VariantSpec(item, "int8", method=method, target=target))
        else:
            raise QuantkitError(
                f"unknown variant '{item}'; use fp32, fp16, int8:<method>, int8-tensorrt:<method>, modelopt, or NAME=model.onnx"
            )
    if not any(s.kind == "fp32" for s in specs):
        specs.insert(0, VariantSpec("fp32", "fp32"))  # the baseline every other variant is compared with
    return specs


def runtime_providers(runtime: str) -> list[str]:
    """onnxruntime providers for a runtime, or a clear error naming what to install."""
    if runtime not in RUNTIMES:
        raise QuantkitError(f"unknown --runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    wanted = RUNTIMES[runtime]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        extra = (
            "pip install quantkit[gpu] (onnxruntime-gpu"
            + (" and tensorrt" if runtime == "tensorrt" else "")
            + ") on a machine with an NVIDIA GPU"
        )
        raise QuantkitError(
            f"runtime {runtime} needs onnxruntime's {wanted[0]}, which is not available here (have: {', '.join(available)}); {extra}"
        )
    return [p for p in wanted if p in available]


@dataclass
class Latency:
    batch1_p50_ms: float
    batch1_p90_ms: float
    batch1_p99_ms: float
    throughput_batch: int
    throughput_samples_per_s: float


@dataclass
class VariantResult:
    name: str
    size_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fidelity: list[OutputFidelity] = field(default_factory=list)
    latency: Latency | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


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

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)


def measure_latency(session: ort.InferenceSession, sample: dict[str, np.ndarray], batch: int, runs: int = 50) -> Latency:
    """Batch-1 latency percentiles and throughput at ``batch``, after warm-up."""
    one = {k: v[:1] for k, v in sample.items()}
    many = {k: np.repeat(v[:1], batch, axis=0) for k, v in sample.items()}
    for _ in range(5):
        session.run(None, one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, one)
        times.append((time.perf_counter() - start) * 1000)
    session.run(None, many)
    big_runs = max(3, runs // 10)
    start = time.perf_counter()
    for _ in range(big_runs):
        session.run(None, many)
    elapsed = time.perf_counter() - start
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return Latency(float(p50), float(p90), float(p99), batch, batch * big_runs / elapsed)


def measure_all(
    timed: Sequence[tuple[VariantResult, ort.InferenceSession]], sample: dict[str, np.ndarray], batch: int, rounds: int = 3
) -> None:
    """Time every variant in interleaved rounds and keep each one's median round, so that drifts
    of the machine (frequency, background load) hit all variants alike."""
    per_variant: dict[int, list[Latency]] = {id(r): [] for r, _ in timed}
    for _ in range(rounds):
        for result, session in timed:
            per_variant[id(result)].append(measure_latency(session, sample, batch, runs=30))
    for result, _ in timed:
        measured = sorted(per_variant[id(result)], key=lambda m: m.batch1_p50_ms)
        result.latency = measured[len(measured) // 2]


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores"


@dataclass
class CalibrationInput:
    """Where int8 variants get their ranges (a ranges file, or calibration data calibrated once)."""

    model: ModelInfo
    calib: str | Path | None = None
    ranges_path: str | Path | None = None
    preprocess: PreprocessSpec | None = None
    num_samples: int | None = None
    batch_size: int = 32
    _ranges: Any = None

    def ranges(self) -> Any:
        if self._ranges is None:
            from quantkit.calibration import calibrate
            from quantkit.ranges import RangeSet

            if self.ranges_path is not None:
                self._ranges = RangeSet.load(self.ranges_path)
            elif self.calib is not None:
                self._ranges = calibrate(
                    self.model,
                    self.calib,
                    methods="all",
                    num_samples=self.num_samples,
                    batch_size=self.batch_size,
                    preprocess=self.preprocess,
                ).ranges
            else:
                raise QuantkitError("int8 variants need calibration data (--calib) or --ranges")
        return self._ranges

    def arrays(self) -> dict[str, np.ndarray]:
        """The calibration samples as input name -> stacked array (ModelOpt's calibration_data)."""
        if self.calib is None:
            raise QuantkitError("the modelopt variant needs calibration data (--calib)")
        got = list(batches(open_source(self.calib, self.model, self.preprocess), self.model, self.batch_size, self.num_samples))
        return {k: np.concatenate([b.feeds[k] for b in got]) for k in got[0].feeds}


def build_variants(model: ModelInfo, specs: Sequence[VariantSpec], workdir: Path, calibration: CalibrationInput) -> dict[str, Path | str]:
    """Variant name -> model file, or the error that kept it from being built."""
    from quantkit.fp16 import convert_fp16
    from quantkit.qdq import quantize_model

    built: dict[str, Path | str] = {}
    for spec in specs:
        path = workdir / f"{model.path.stem}.{spec.name.replace(':', '.')}.onnx"
        try:
            if spec.kind == "fp32":
                built[spec.name] = model.path
            elif spec.kind == "file":
                if not spec.path or not spec.path.is_file():
                    raise QuantkitError(f"model file not found: {spec.path}")
                built[spec.name] = spec.path
            elif spec.kind == "fp16":
                fp16, _ = convert_fp16(model.proto)
                onnx.save(fp16, str(path))
                built[spec.name] = path
            elif spec.kind == "int8":
                q, _ = quantize_model(model, calibration.ranges(), method=spec.method, target=spec.target or "tensorrt")
                onnx.save(q, str(path))
                built[spec.name] = path
            elif spec.kind == "modelopt":
                built[spec.name] = _modelopt_variant(model, path, calibration)
        except QuantkitError as exc:
            built[spec.name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
            built[spec.name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    return built


def _modelopt_variant(model: ModelInfo, path: Path, calibration: CalibrationInput) -> Path | str:
    try:
        from modelopt.onnx.quantization import quantize as modelopt_quantize  # type: ignore[import-not-found]
    except ImportError:
        return MODELOPT_MISSING
    arrays = calibration.arrays()
    modelopt_quantize(
        onnx_path=str(model.path), quantize_mode="int8", calibration_data=arrays, calibration_eps=["cpu"], output_path=str(path)
    )
    return path


def _collect(data: Sequence[Batch], session: ort.InferenceSession) -> list[np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    per_output: list[list[np.ndarray]] = [[] for _ in names]
    for batch in data:
        for i, value in enumerate(session.run(names, batch.feeds)):
            per_output[i].append(np.asarray(value))
    return [np.concatenate(v) if v and v[0].ndim else np.stack(v) for v in per_output]


def evaluate(
    model: str | Path | ModelInfo,
    data: str | Path,
    *,
    variants: str = DEFAULT_VARIANTS,
    calib: str | Path | None = None,
    ranges_path: str | Path | None = None,
    preprocess: PreprocessSpec | None = None,
    metrics: Sequence[str | Metric] = ("top1",),
    labels: bool = True,
    label_column: str | None = None,
    num_samples: int | None = None,
    num_calib_samples: int | None = None,
    batch_size: int = 32,
    runtime: str = "ort-cpu",
    max_drop: float | None = None,
    slices: dict[str, list[tuple[int, int, int]]] | None = None,
    latency: bool = True,
    throughput_batch: int = 32,
    workdir: str | Path | None = None,
    quiet: bool = True,
) -> EvalResult:
    """Evaluate every variant on ``data`` against FP32 (see the module docstring)."""
    timer = StepTimer(quiet)
    providers = runtime_providers(runtime)
    info = model if isinstance(model, ModelInfo) else load_model(model)
    specs = parse_variants(variants, runtime)
    spec = preprocess or PreprocessSpec()
    metric_fns: list[tuple[str, Metric]] = []
    for m in metrics:
        if callable(m):
            metric_fns.append((getattr(m, "__name__", "metric"), m))
        elif m in METRICS:
            metric_fns.append((m, METRICS[m]))
        else:
            raise QuantkitError(f"unknown metric '{m}'; built in: {', '.join(METRICS)}, or pass a callable from Python")

    with timer.step("load validation data"):
        source = open_source(data, info, spec, shuffle=False, label_column=label_column)
        val = list(batches(source, info, batch_size, num_samples, source.description))
    sample_labels = [label for b in val for label in b.labels]
    labelled = labels and bool(sample_labels) and all(label is not None for label in sample_labels)
    notes: list[str] = []
    if labels and not labelled:
        notes.append(f"{source.description} has no labels: the report shows fidelity against FP32 only")

    calibration = CalibrationInput(info, calib, ranges_path, spec, num_calib_samples, batch_size)
    with tempfile.TemporaryDirectory(prefix="quantkit-eval-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with timer.step("build variants"):
            built = build_variants(info, specs, work, calibration)
        reference: list[np.ndarray] | None = None
        results: list[VariantResult] = []
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # sessions stay alive to be timed in interleaved rounds: idle ones must not spin on the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        timed: list[tuple[VariantResult, ort.InferenceSession]] = []
        with timer.step("run variants"):
            for spec_ in specs:
                result = VariantResult(spec_.name)
                results.append(result)
                target = built[spec_.name]
                if isinstance(target, str):
                    result.error = target
                    continue
                result.size_bytes = Path(target).stat().st_size
                if spec_.kind == "int8" and spec_.target == "tensorrt" and runtime != "tensorrt":
                    result.notes.append(
                        "TensorRT-format Q/DQ (symmetric int8): accuracy is what TensorRT computes; its CPU latency is not TensorRT's"
                    )
                try:
                    session = ort.InferenceSession(str(target), options, providers=providers)
                    outputs = _collect(val, session)
                except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
                    result.error = f"does not run on {runtime}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
                    continue
                names = [o.name for o in session.get_outputs()]
                if spec_.kind == "fp32":
                    reference = outputs
                if labelled:
                    for name, fn in metric_fns:
                        try:
                            result.metrics[name] = float(fn(outputs, sample_labels))
                        except Exception as exc:  # noqa: BLE001 - a metric that does not fit the outputs is a user error
                            raise QuantkitError(
                                f"metric {name} failed on the outputs of {spec_.name} (first output shape {outputs[0].shape}, "
                                f"{len(sample_labels)} labels): {exc}; check --labels and --metric"
                            ) from None
                if reference is not None:
                    result.fidelity = [fidelity(n, r, o, (slices or {}).get(n)) for n, r, o in zip(names, reference, outputs, strict=True)]
                timed.append((result, session))
        if latency and timed:
            with timer.step("measure latency"):
                measure_all(timed, val[0].feeds, throughput_batch)
    evaluation = EvalResult(
        model={"path": str(info.path), "sha256": info.sha256},
        runtime=runtime,
        providers=providers,
        hardware=_hardware(),
        data={"path": str(data), "samples": sum(len(b) for b in val), "calibration": str(calib or ranges_path or "")},
        metric_names=[n for n, _ in metric_fns] if labelled else [],
        labelled=labelled,
        variants=results,
        max_drop=max_drop,
        flags=notes,
        timings=dict(timer.times),
    )
    evaluation.flags += flags_for(evaluation)
    return evaluation


def flags_for(result: EvalResult) -> list[str]:
    """What a user deciding what to deploy must not miss."""
    flags = []
    base = result.variant("fp32") if any(v.name == "fp32" for v in result.variants) else None
    fp16 = next((v for v in result.variants if v.name == "fp16" and v.latency), None)
    for v in result.variants:
        if v.error:
            flags.append(f"{v.name} failed: {v.error}")
            continue
        if v.name.startswith("int8") and fp16 and v.latency and v.latency.batch1_p50_ms >= fp16.latency.batch1_p50_ms:
            where = " (TensorRT-format Q/DQ on a CPU runtime)" if v.notes else ""
            flags.append(
                f"{v.name} is not faster than fp16 at batch 1 ({v.latency.batch1_p50_ms:.3f} vs {fp16.latency.batch1_p50_ms:.3f} ms){where}"
            )
        if result.max_drop is not None and base is not None and v is not base:
            if result.metric_names:
                key = result.metric_names[0]
                drop = 100 * (base.metrics.get(key, 0) - v.metrics.get(key, 0))
            else:
                key, drop = "top-1 agreement", 100 * (1 - (v.fidelity[0].top1_agreement if v.fidelity else 0))
            if drop > result.max_drop:
                flags.append(f"{v.name} loses {drop:.2f} points of {key}, over the {result.max_drop} budget")
        for f in v.fidelity:
            collapsed = f.collapsed_slices
            if collapsed:
                shown = ", ".join(f"{s.label()} {s.sqnr_db:.1f} dB" for s in collapsed[:6])
                flags.append(f"{v.name}: output {f.output} has {len(collapsed)} collapsed slice(s) along axis {collapsed[0].axis}: {shown}")
    return flags
