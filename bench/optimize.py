"""Structure optimization benchmark: layer counts per step and onnxruntime CPU latency before/after.

For the demo CNN and the PP-OCR classifier: the layer-count table of ``quantkit inspect``
(original -> scale fusion -> vertical fusions -> tensor merging -> concat removal), and the
latency of the original and the optimized model. Latency is measured with onnxruntime's own
graph optimizations off (what the passes alone buy) and on (what is left once onnxruntime has
made its own fusions), batch 1 and 32, 2 threads, median of interleaved rounds.

Run: make bench  (or: python -m bench.optimize). Writes reports/bench/optimize.md and optimize.json.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.calibration import demo_batches, ocr_batches
from bench.common import (
    REPORT_DIR,
    ROOT,
    ocr_cls_model,
)
from bench.quantize import ROUNDS, THREADS, median_ms
from quantkit.graph.optimize import optimize_model
from quantkit.model import load_model

LEVELS = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(model_bytes: bytes, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def bench_model(name: str, path: Path, x: np.ndarray) -> dict:
    info = load_model(path)
    optimized, report = optimize_model(info)
    variants = {"original": info.proto.SerializeToString(), "optimized": optimized.SerializeToString()}
    sessions = {(v, lvl): session(data, LEVELS[lvl]) for v, data in variants.items() for lvl in LEVELS}
    input_name = info.inputs[0].name
    ref = sessions[("original", "off")].run(None, {input_name: x[:32]})[0]
    got = sessions[("optimized", "off")].run(None, {input_name: x[:32]})[0]
    latency: dict[str, float] = {}
    for batch in (1, 32):
        rounds: dict[tuple[str, str], list[float]] = {k: [] for k in sessions}
        for _ in range(ROUNDS):
            for key, sess in sessions.items():
                rounds[key].append(median_ms(sess, x[:batch], budget_s=0.5))
        for (variant, level), values in rounds.items():
            latency[f"{variant}|{level}|b{batch}"] = round(float(np.median(values)), 3)
    # the TensorRT path: TensorRT fuses Conv+activation itself, so vertical fusion is left out
    trt_passes = {"with merging": ["fold-bn", "horizontal", "concat"], "without merging": ["fold-bn", "concat"]}
    tensorrt = {}
    for label, passes in trt_passes.items():
        _, trt_report = optimize_model(info, passes)
        tensorrt[label] = {"onnx_nodes": sum(trt_report.steps[-1][1].values()), "estimate": trt_report.tensorrt_estimate}
    return {
        "model": name,
        "tensorrt_path": tensorrt,
        "report": report.to_json(),
        "table": report.table(),
        "max_relative_difference": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "latency_ms": latency,
    }


def render(results: list[dict], command: str) -> str:
    out = [
        "# Structure optimization: layer counts and onnxruntime CPU latency",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}, CPU execution provider, "
        f"{THREADS} threads, median of {ROUNDS} interleaved rounds.",
        "The optimized model runs vertical fusions as onnxruntime's FusedConv; for TensorRT use `--skip vertical` "
        "(TensorRT fuses Conv+activation itself).",
        "",
    ]
    for r in results:
        lat = r["latency_ms"]
        out += [
            f"## {r['model']}",
            "",
            r["table"],
            "",
            f"Outputs equal to the original within {r['max_relative_difference']:.1e} (relative).",
            "",
            "TensorRT path (`--skip vertical`): "
            + "; ".join(
                f"{label}: {t['onnx_nodes']} ONNX nodes, TensorRT estimate about {t['estimate']} layers"
                for label, t in r["tensorrt_path"].items()
            ),
            "",
        ]
        out += ["| onnxruntime graph optimizations | batch | original ms | optimized ms | speed-up |", "|---|---|---|---|---|"]
        for level in LEVELS:
            for batch in (1, 32):
                a, b = lat[f"original|{level}|b{batch}"], lat[f"optimized|{level}|b{batch}"]
                out.append(f"| {level} | {batch} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    results = [
        bench_model("demo_cnn", ROOT / "calib_data" / "demo_cnn.onnx", np.concatenate(list(demo_batches(64)))),
        bench_model("ppocr_cls", ocr_cls_model(), np.concatenate(list(ocr_batches(64)))),
    ]
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.optimize"
    (REPORT_DIR / "optimize.json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    (REPORT_DIR / "optimize.md").write_text(render(results, command) + "\n")
    print(f"wrote {REPORT_DIR / 'optimize.md'}")


if __name__ == "__main__":
    main()
