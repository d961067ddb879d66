"""What to ship, per target, from an evaluation: the report ends in this.

- **onnxruntime on this CPU**: of the variants that run natively here (not TensorRT's fake-
  quantized format), the fastest at batch 1 that stays within the accuracy budget and that the
  fidelity check accepts; FP32 when none does.
- **TensorRT on a GPU**: of the TensorRT-format variants, the lowest precision within the budget
  (INT8 with FP16 outside the Q/DQ, INT8 with FP32 outside, FP8, FP16, FP32, in that order; their
  speed cannot be measured on a CPU, so the order is TensorRT's usual one, not a measurement),
  with the commands that write it and the trtexec lines that build it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.backends.trtexec import shell, trtexec_command

#: TensorRT-format variant kinds, fastest first on a GPU (TensorRT's usual order, not measured here)
TENSORRT_ORDER = ("int8-mixed", "int8-tensorrt", "fp8", "fp16", "fp32")


@dataclass
class Decision:
    target: str
    variant: str
    why: str
    commands: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"- **{self.target}**: ship `{self.variant}`: {self.why}", *[f"  - `{c}`" for c in self.commands]]


def _drop(result: Any, v: Any) -> float | None:
    """How much of the first metric ``v`` loses against FP32, in its unit (points or dB)."""
    if not result.metric_names:
        return None
    key = result.metric_names[0]
    base = result.variant("fp32")
    scale = 100 if result.units.get(key, "points") == "points" else 1
    return scale * (base.metrics.get(key, 0.0) - v.metrics.get(key, 0.0))


def _acceptable(result: Any, v: Any) -> bool:
    if v.error or v.collapsed:
        return False
    drop = _drop(result, v)
    return drop is None or result.max_drop is None or drop <= result.max_drop


def _accuracy_text(result: Any, v: Any) -> str:
    if not result.metric_names:
        return "no metric"
    key = result.metric_names[0]
    unit = result.units.get(key, "points")
    value = v.metrics.get(key, 0.0)
    shown = f"{100 * value:.2f}%" if unit == "points" else f"{value:.2f} {unit}"
    drop = _drop(result, v) or 0.0
    return f"{key} {shown} ({-drop:+.2f} {unit} vs FP32)"


def _kind(name: str) -> str:
    head = name.partition(":")[0]
    return {"int8-onnxruntime": "int8"}.get(head, head)


#: variant kind -> (quantize flags, the written file's suffix); the files go to the working folder
_WRITES = {
    "int8": (" --target onnxruntime", "int8.onnxruntime"),
    "int8-mixed": ("", "int8.tensorrt"),
    "int8-tensorrt": (" --high-precision fp32", "int8.tensorrt-fp32"),
    "fp8": (" --format fp8", "fp8.tensorrt"),
}


def _built_file(model: str, variant: str) -> str:
    kind = _kind(variant)
    if kind == "fp32":
        return model
    return f"{Path(model).stem}.{'fp16' if kind == 'fp16' else _WRITES[kind][1]}.onnx"


def _quantize_command(model: str, ranges: str, variant: str) -> list[str]:
    kind, method = _kind(variant), variant.partition(":")[2] or "entropy"
    out = _built_file(model, variant)
    if kind == "fp16":
        return [f"quantkit fp16 {model} --ranges {ranges} -o {out}"]
    if kind == "fp32":
        return []
    return [f"quantkit quantize {model} --ranges {ranges} --method {method}{_WRITES[kind][0]} -o {out}"]


def _fastest_then_most_accurate(result: Any, timed: list[Any]) -> Any:
    """The most accurate of the variants tied with the fastest (its p10-p90 range overlaps the
    fastest's: within the timing noise), so that two runs on a noisy machine choose the same one."""
    fastest = min(timed, key=lambda v: v.latency.batch1_p50_ms).latency
    tied = [v for v in timed if v.latency.batch1_p10_ms <= max(fastest.batch1_p90_ms, fastest.batch1_p50_ms)]
    return min(tied, key=lambda v: (_drop(result, v) or 0.0, v.size_bytes or 0))


def _cpu(result: Any, model: str, ranges: str) -> Decision:
    native = [v for v in result.variants if not v.notes and _kind(v.name) in ("fp32", "fp16", "int8") and _acceptable(result, v)]
    timed = [v for v in native if v.latency]
    best = _fastest_then_most_accurate(result, timed) if timed else result.variant("fp32")
    why = _accuracy_text(result, best)
    base = result.variant("fp32")
    if best.latency and base.latency and best is not base:
        why += f", batch-1 p50 {best.latency.batch1_p50_ms:.3f} ms vs FP32's {base.latency.batch1_p50_ms:.3f} ms"
    if timed:
        why += ": the fastest here within the budget (ties within the timing noise go by accuracy)"
    else:
        why += ": latency not measured, FP32 is the safe choice"
    return Decision("onnxruntime on this CPU", best.name, why, _quantize_command(model, ranges, best.name))


def _tensorrt(result: Any, model: str, ranges: str) -> Decision:
    ranked = sorted((v for v in result.variants if _kind(v.name) in TENSORRT_ORDER), key=lambda v: TENSORRT_ORDER.index(_kind(v.name)))
    best = next((v for v in ranked if _acceptable(result, v)), result.variant("fp32"))
    engine = f"{Path(model).stem}.engine"
    built = _built_file(model, best.name)
    typed = _kind(best.name) != "fp32"
    lines = [
        "# TensorRT 10.x: " + shell(trtexec_command(built, engine, trt_major=10, typed=typed, precision="fp32")),
        "# TensorRT 11.x: " + shell(trtexec_command(built, engine, trt_major=11, typed=True, precision="fp32")),
    ]
    why = _accuracy_text(result, best) + ": the lowest precision within the budget (speed not measurable on a CPU)"
    return Decision("TensorRT on a GPU", best.name, why, _quantize_command(model, ranges, best.name) + lines)


def decide(result: Any) -> list[Decision]:
    """One decision per target (see the module docstring)."""
    if not any(v.name == "fp32" and not v.error for v in result.variants):
        return []
    model = result.model["path"]
    calibration = str(result.data.get("calibration") or "")
    ranges = calibration if calibration.endswith(".json") else "ranges.json"
    return [_cpu(result, model, ranges), _tensorrt(result, model, ranges)]
