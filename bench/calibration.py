"""Calibration benchmark: quantkit vs onnxruntime.quantization's calibrators, side by side.

For each model and sample count, every contender runs in a fresh subprocess (so peak RSS is its
own) over the same batches, generated on the fly from the same deterministic stream so that no
contender holds the data set in memory unless its algorithm does:

- floor: plain FP32 onnxruntime inference over the batches (what any calibrator must at least do);
- quantkit entropy, and quantkit with all four methods from the one collection pass;
- onnxruntime MinMax, Percentile (its defaults), Entropy with its defaults (128 bins, 128 quantized
  bins: a single candidate threshold), and Entropy configured TensorRT-like (2048 / 128), which
  ``quantize_static`` cannot pass through but ``create_calibrator`` can.

Models: the bundled demo CNN (MNIST images from calib_data/), and PaddleOCR's text-direction
classifier ``ch_ppocr_mobile_v2.0_cls`` from the rapidocr-onnxruntime wheel (pip), fed 48x192
crops of the two photographs bundled with scikit-learn.

Run: make bench  (or: python -m bench.calibration --samples 128,512,1024)
Writes reports/bench/calibration.md and reports/bench/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from bench.common import REPORT_DIR, ROOT, ocr_cls_model

BATCH = 32
CONTENDERS = ["floor", "quantkit-entropy", "quantkit-all", "ort-minmax", "ort-percentile", "ort-entropy-default", "ort-entropy-trt"]


# ---- models and data -------------------------------------------------------------------------
def demo_batches(n: int) -> Iterator[np.ndarray]:
    from PIL import Image

    files = sorted((ROOT / "calib_data" / "mnist" / "calib").glob("*/*.png"))
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))][:n]
    for start in range(0, n, BATCH):
        imgs = [np.asarray(Image.open(f), dtype=np.float32) for f in files[start : start + BATCH]]
        yield (((np.stack(imgs) / 255.0 - 0.1307) / 0.3081)[:, None]).astype(np.float32)


def ocr_batches(n: int) -> Iterator[np.ndarray]:
    """48x192 crops (text-line aspect) of scikit-learn's bundled photographs, PP-OCR normalisation."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(0)
    for start in range(0, n, BATCH):
        batch = []
        for _ in range(min(BATCH, n - start)):
            photo = photos[int(rng.integers(len(photos)))]
            h = int(rng.integers(24, 120))
            w = min(int(h * rng.uniform(3, 6)), photo.width)
            x0, y0 = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
            crop = photo.crop((x0, y0, x0 + w, y0 + h)).resize((192, 48), Image.BILINEAR)
            batch.append((np.asarray(crop, dtype=np.float32) / 255.0 - 0.5) / 0.5)
        yield np.stack(batch).transpose(0, 3, 1, 2).astype(np.float32)


MODELS = {
    "demo_cnn": (lambda: ROOT / "calib_data" / "demo_cnn.onnx", demo_batches, "image"),
    "ppocr_cls": (ocr_cls_model, ocr_batches, "x"),
}


# ---- one contender, in its own process -------------------------------------------------------
def run_worker(model_key: str, contender: str, n: int) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from quantkit.calibration.collect import collect_statistics
    from quantkit.calibration.methods import make_calibrators
    from quantkit.calibration.pipeline import compute_ranges
    from quantkit.data.batching import Batch
    from quantkit.model import load_model
    from quantkit.optypes import QUANTIZABLE_OP_TYPES

    model_fn, batch_fn, input_name = MODELS[model_key]
    model_path = model_fn()
    start = time.perf_counter()  # imports above are outside the timed region for every contender
    tensors = None
    if contender == "floor":
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        for x in batch_fn(n):
            session.run(None, {input_name: x})
    elif contender.startswith("quantkit"):
        info = load_model(model_path)
        data = (Batch([str(i)], {input_name: x}) for i, x in enumerate(batch_fn(n)))
        stats = collect_statistics(info, data)
        ranges = compute_ranges(stats, make_calibrators("entropy" if contender == "quantkit-entropy" else "all"), info)
        tensors = len(ranges.tensors)
    else:

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = batch_fn(n)

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {input_name: x}

        method, options = {
            "ort-minmax": (CalibrationMethod.MinMax, {"symmetric": True}),
            "ort-percentile": (CalibrationMethod.Percentile, {}),
            "ort-entropy-default": (CalibrationMethod.Entropy, {}),
            "ort-entropy-trt": (CalibrationMethod.Entropy, {"num_bins": 2048, "num_quantized_bins": 128}),
        }[contender]
        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(
                str(model_path),
                sorted(QUANTIZABLE_OP_TYPES),
                augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                calibrate_method=method,
                extra_options=options,
            )
            cal.collect_data(Reader())
            tensors = len(cal.compute_data().data)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": model_key,
        "contender": contender,
        "samples": n,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "tensors": tensors,
    }


def spawn(model_key: str, contender: str, n: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "bench.calibration", "--worker", model_key, contender, str(n)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": model_key, "contender": contender, "samples": n, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": model_key, "contender": contender, "samples": n, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------
def find(rows, model, contender, n):
    return next((r for r in rows if r["model"] == model and r["contender"] == contender and r["samples"] == n), None)


def ratio(a, b):
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["wall_s"] / b["wall_s"]


def render(rows: list[dict], samples: list[int], command: str) -> str:
    out = [
        "# Calibration benchmark: quantkit vs onnxruntime.quantization",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"onnxruntime {__import__('onnxruntime').__version__}, CPU execution provider; batch size {BATCH}.  ",
        "Every cell is one fresh process over the same batch stream; wall time includes model load and data generation; "
        "peak RSS is the process's maximum resident set.",
        "",
    ]
    for model in MODELS:
        out += [
            f"## {model}",
            "",
            "| contender | " + " | ".join(f"{n} samples: wall s / peak RSS MB" for n in samples) + " | tensors |",
            "|---|" + "---|" * (len(samples) + 1),
        ]
        for contender in CONTENDERS:
            cells, tensors = [], ""
            for n in samples:
                r = find(rows, model, contender, n)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append(f"failed: {r['error']}")
                else:
                    cells.append(f"{r['wall_s']:.2f} / {r['peak_rss_mb']:.0f}")
                    tensors = str(r.get("tensors") or "")
            out.append(f"| {contender} | " + " | ".join(cells) + f" | {tensors} |")
        out.append("")
        lines = []
        for n in samples:
            e = ratio(find(rows, model, "quantkit-entropy", n), find(rows, model, "ort-entropy-trt", n))
            f = ratio(find(rows, model, "quantkit-entropy", n), find(rows, model, "floor", n))
            a = ratio(find(rows, model, "quantkit-all", n), find(rows, model, "floor", n))
            lines.append(
                f"- {n} samples: quantkit entropy / onnxruntime TensorRT-like entropy = {e:.3f}; "
                f"quantkit entropy / floor = {f:.2f}; quantkit all methods / floor = {a:.2f}"
                if None not in (e, f, a)
                else f"- {n} samples: ratios unavailable (a contender failed)"
            )
        growth = []
        for label, contender in (("quantkit entropy", "quantkit-entropy"), ("onnxruntime TensorRT-like entropy", "ort-entropy-trt")):
            lo, hi = find(rows, model, contender, samples[0]), find(rows, model, contender, samples[-1])
            if lo and hi and "error" not in lo and "error" not in hi:
                growth.append(f"{label} {hi['peak_rss_mb'] / lo['peak_rss_mb'] - 1:+.1%}")
        if growth:
            lines.append(f"- peak RSS growth from {samples[0]} to {samples[-1]} samples: " + "; ".join(growth))
        out += ["Ratios (wall time):", "", *lines, ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", default="128,512,1024")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "CONTENDER", "N"))
    parser.add_argument("--render-only", action="store_true", help="rewrite calibration.md from calibration.json")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((REPORT_DIR / "calibration.json").read_text())
        samples = sorted({r["samples"] for r in saved["rows"]})
        (REPORT_DIR / "calibration.md").write_text(render(saved["rows"], samples, saved["command"]) + "\n")
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return
    samples = [int(s) for s in args.samples.split(",")]
    rows: list[dict] = []
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    command = ("python -m bench.calibration " + " ".join(sys.argv[1:])).strip()
    for model in args.models.split(","):
        for n in samples:
            for contender in args.contenders.split(","):
                row = spawn(model, contender, n, args.timeout)
                print(json.dumps(row), flush=True)
                rows.append(row)
                # rewrite after every row: an interrupted benchmark still leaves its results
                (REPORT_DIR / "calibration.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
                (REPORT_DIR / "calibration.md").write_text(render(rows, samples, command) + "\n")
    print(f"wrote {REPORT_DIR / 'calibration.md'}")


if __name__ == "__main__":
    main()
