"""onnxruntime "engines": the model with onnxruntime's graph optimizations applied and saved,
plus the session settings that ``eval`` and users' deployments load it with."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from quantkit.atomic import write_bytes_atomic
from quantkit.errors import QuantkitError
from quantkit.evaluation import runtime_providers

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
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise QuantkitError(
                f"onnxruntime cannot load {onnx_path}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
            ) from None
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
