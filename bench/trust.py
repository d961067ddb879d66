"""Trust benchmark: per calibration method, INT8 fidelity and task metric on real models, and the
cost of calibrating with every method at once, against the FP32 inference floor and the peers.

Models (real, pretrained, from the rapidocr-onnxruntime wheel):
- PaddleOCR's text-direction classifier (ch_ppocr_mobile_v2.0_cls) on rendered lines of text, half
  upside down (exact labels): top-1 accuracy and agreement with FP32;
- PaddleOCR's PP-OCRv4 text detector at 640x640 on the 26 photographs and scans bundled in the
  scikit-image wheel (fetched with pip download --no-deps): 16 calibrate, 10 validate; the task
  metric is the IoU of the text masks (probability > 0.3) against FP32's.

For each method, quantkit's TensorRT placement (symmetric int8) is run as exact fake quantization.
Peers: onnxruntime.quantization.quantize_static with the same format (QDQ, S8 activations
symmetric, S8 per-channel weights), its MinMax, Entropy and Percentile calibrators (on the detector
only MinMax: its histogram calibrators keep every intermediate output, 12 GB for 16 images).
Calibration runs in a fresh subprocess each (peak RSS is its own), as does the floor: batch-1
FP32 inference over the same samples through the same data pipeline.

Run: make bench (or python -m bench.trust). Writes reports/bench/trust.md and trust.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from bench.common import ROOT, models_dir

REPORT = ROOT / "reports" / "bench"
METHODS = ["entropy", "entropy-trt", "minmax", "percentile", "mse"]
DET_PREPROCESS = {
    "resize": "640x640",
    "scale": 1 / 255,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "color": "BGR",
    "layout": "NCHW",
}
SKIMAGE = "scikit-image==0.25.2"


def skimage_images(root: Path) -> tuple[Path, Path]:
    """The images bundled in the scikit-image wheel, split into calibration (16) and validation (10) folders."""
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SKIMAGE, "-d", str(wheels)], check=True)
    archive = zipfile.ZipFile(glob.glob(str(wheels / "scikit_image*.whl"))[0])
    names = sorted(n for n in archive.namelist() if n.startswith("skimage/data/") and n.endswith((".png", ".jpg")))
    calib, val = root / "det_calib", root / "det_val"
    for k, name in enumerate(names):
        folder = calib if k % 8 not in (3, 6) else val  # an interleaved split: both get scans and photos
        folder.mkdir(exist_ok=True)
        (folder / name.split("/")[-1]).write_bytes(archive.read(name))
    return calib, val


# ---- subprocess workers: one measurement each --------------------------------------------------
def worker(kind: str, model: str, data: str, preprocess: str, out: str, extra: str) -> None:
    start = time.perf_counter()
    if kind == "floor":
        import quantkit
        from quantkit.backends.ort import make_session
        from quantkit.data import batches, open_source

        info = quantkit.load_model(model)
        session = make_session(info.proto)
        for b in batches(open_source(data, info, quantkit.PreprocessSpec.from_mapping(json.loads(preprocess)), shuffle=False), info, 1):
            session.run(None, b.feeds)
    elif kind == "quantkit":
        from quantkit.cli import main

        pp = Path(out) / "preprocess.json"
        pp.write_text(preprocess)
        code = main(["calibrate", model, "--data", data, "--preprocess-config", str(pp), "--method", extra, "--out-dir", out, "--quiet"])
        assert code == 0
    elif kind.startswith("ort-"):
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        import quantkit
        from quantkit.data import batches, open_source

        info = quantkit.load_model(model)
        spec = quantkit.PreprocessSpec.from_mapping(json.loads(preprocess))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(batches(open_source(data, info, spec, shuffle=False), info, 1))

            def get_next(self):  # type: ignore[no-untyped-def]
                b = next(self.it, None)
                return None if b is None else b.feeds

        method = {
            "ort-minmax": CalibrationMethod.MinMax,
            "ort-entropy": CalibrationMethod.Entropy,
            "ort-percentile": CalibrationMethod.Percentile,
        }
        opset13 = Path(out) / "model13.onnx"
        import onnx

        onnx.save(
            onnx.version_converter.convert_version(info.proto, 13) if info.proto.opset_import[0].version < 13 else info.proto, opset13
        )
        quantize_static(
            str(opset13),
            str(Path(out) / "ort.int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=method[kind],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": elapsed, "peak_rss_bytes": rss}))


def measure(kind: str, model: Path, data: Path, preprocess: dict, out: Path, extra: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.trust", "--worker", kind, str(model), str(data), json.dumps(preprocess), str(out), extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- fidelity --------------------------------------------------------------------------------
def outputs_of(proto, feeds_list):  # type: ignore[no-untyped-def]
    from quantkit.backends.ort import make_session

    session = make_session(proto)
    return np.concatenate([session.run(None, f)[0] for f in feeds_list])


def task_metrics(name: str, ref: np.ndarray, got: np.ndarray, labels: list | None) -> dict:
    from quantkit.evaluation.metrics import sqnr_db
    from quantkit.evaluation.objectives import objective

    def value(name: str, **params: float) -> float:
        return round(objective(name, **params).measure([got], [ref], labels).value, 4)

    out = {"sqnr_db": round(sqnr_db(ref, got), 2)}
    if name == "ppocr_det":
        out["mask_iou"] = value("mask-iou", threshold=0.3)  # PP-OCR's own text threshold
    else:
        out["agreement"] = value("agreement")
        if labels is not None:
            out["top1"] = value("top1")
    return out


def run_case(name: str, model: Path, calib: Path, val: Path, preprocess: dict, tmp: Path) -> dict:
    import onnx

    import quantkit
    from quantkit.data import batches, open_source
    from quantkit.export.qdq import quantize_model

    info = quantkit.load_model(model)
    spec = quantkit.PreprocessSpec.from_mapping(preprocess)
    val_batches = list(batches(open_source(val, info, spec, shuffle=False), info, 8))
    feeds = [b.feeds for b in val_batches]
    labels = [x for b in val_batches for x in b.labels]
    labels = labels if labels and all(x is not None for x in labels) else None
    ref = outputs_of(info.proto, feeds)
    fp32 = task_metrics(name, ref, ref, labels)
    rows: dict[str, dict] = {"fp32": fp32}

    cost = {"floor": measure("floor", model, calib, preprocess, tmp / f"{name}-floor")}
    cal_dir = tmp / f"{name}-quantkit"
    cost["quantkit --method all + entropy-trt"] = measure("quantkit", model, calib, preprocess, cal_dir, ",".join(METHODS))
    ranges = quantkit.RangeSet.load(cal_dir / "ranges.json")
    for method in METHODS:
        q, _ = quantize_model(info, ranges, method=method, target="tensorrt")
        rows[f"quantkit {method}"] = task_metrics(name, ref, outputs_of(q, feeds), labels)
    peers = ["ort-minmax"] if name == "ppocr_det" else ["ort-minmax", "ort-entropy", "ort-percentile"]
    for peer in peers:
        cost[peer] = measure(peer, model, calib, preprocess, tmp / f"{name}-{peer}")
        path = tmp / f"{name}-{peer}" / "ort.int8.onnx"
        rows[peer] = task_metrics(name, ref, outputs_of(onnx.load(str(path)), feeds), labels) if path.exists() else cost[peer]
    return {
        "samples": {"calibration": sum(1 for _ in open_source(calib, info, spec)), "validation": len(ref)},
        "fidelity": rows,
        "cost": cost,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Trust benchmark: INT8 fidelity per method, and the cost of calibrating",
        "",
        "Produced by `bench/trust.py` (see its docstring). INT8 is the TensorRT placement (symmetric int8) run as exact",
        "fake quantization; onnxruntime.quantization's peers use the same format. ModelOpt is not installed here (its",
        "[onnx] extra brings a 7 GB CUDA torch).",
        "",
    ]
    for name, r in results.items():
        lines += [f"## {name} ({r['samples']['calibration']} calibration, {r['samples']['validation']} validation samples)", ""]
        keys = sorted({k for row in r["fidelity"].values() for k in row})
        lines += ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for variant, row in r["fidelity"].items():
            lines.append(f"| {variant} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
        floor = r["cost"]["floor"]
        lines += ["", "| calibration run | wall s | peak RSS MB | wall / FP32 floor |", "|---|---|---|---|"]
        for who, c in r["cost"].items():
            if "error" in c:
                lines.append(f"| {who} | failed: {c['error']} | | |")
                continue
            ratio = c["seconds"] / floor["seconds"] if "seconds" in floor else float("nan")
            lines.append(f"| {who} | {c['seconds']:.2f} | {c['peak_rss_bytes'] / 1e6:.0f} | {ratio:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=6)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from bench import ppocr_cls_report as ppocr
    from quantkit._io import write_files_atomic

    REPORT.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        cls_calib, cls_val = ppocr.build_dataset(tmp / "cls")
        cls_pp = {k: list(v) if isinstance(v, tuple) else v for k, v in ppocr.PREPROCESS.items()}
        results["ppocr_cls"] = run_case("ppocr_cls", models_dir() / "ch_ppocr_mobile_v2.0_cls_infer.onnx", cls_calib, cls_val, cls_pp, tmp)
        det_calib, det_val = skimage_images(tmp)
        results["ppocr_det"] = run_case("ppocr_det", models_dir() / "ch_PP-OCRv4_det_infer.onnx", det_calib, det_val, DET_PREPROCESS, tmp)
    write_files_atomic(
        {REPORT / "trust.json": (json.dumps(results, indent=1) + "\n").encode(), REPORT / "trust.md": markdown(results).encode()}
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
