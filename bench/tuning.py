"""Tuning benchmark: quantkit's search vs a prefix bisection in graph order, on the same target.

Prefix bisection is what TensorRT's precision debugger (``polygraphy debug precision``) does: it
finds the smallest N such that the first N layers (``forward``) or the last N (``reverse``) in
high precision meet the target. quantkit searches over the sensitivity ranking and then prunes,
so any subset can come out. For each model this reports the number of full evaluations and the
number of nodes left in high precision (FP32). The sensitivity analysis is counted in
quantkit's evaluations.

Models: the demo CNN (entropy ranges, target 0.5 points of top-1), PaddleOCR's text-direction
classifier on rendered text lines (entropy ranges; target 1.0 point), and
PP-OCRv4's text detector on the scikit-image wheel's images (mask IoU against FP32, target 5
points: IoU >= 0.95). quantkit runs with both rankings (disable-one, SQNR).
Run: make bench  (or: python -m bench.tuning). Writes reports/bench/tuning.md and tuning.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import quantkit
from bench.common import REPORT_DIR
from quantkit.api import calibrate
from quantkit.data import PreprocessSpec, batches, open_source
from quantkit.model import load_model
from quantkit.plan import PrecisionPlan
from quantkit.tuning.search import run_search as tune
from quantkit.tuning.sensitivity import Evaluator, build_candidate, quantized_nodes


def prefix_bisection(model, ranges, evaluator, nodes: list[str], max_drop: float, reverse: bool) -> dict:
    """Smallest N with the first (or last) N nodes in FP32 meeting the target, by bisection."""
    order = list(reversed(nodes)) if reverse else list(nodes)
    base = evaluator.baseline.accuracy
    start_evals = evaluator.evaluations

    def meets(n: int) -> tuple[bool, float]:
        plan = PrecisionPlan(default="int8", nodes=dict.fromkeys(order[:n], "fp32"))
        score = evaluator.evaluate(build_candidate(model, ranges, plan, method="entropy", target="tensorrt"))
        return 100 * (base - score.accuracy) <= max_drop + 1e-9, score.accuracy  # the tuner's own rounding rule

    ok0, acc0 = meets(0)  # every prefix trial is one pass over the full validation set
    if ok0:
        return {
            "nodes": 0,
            "evaluations": evaluator.evaluations - start_evals,
            "full_evaluation_equivalents": evaluator.cost,
            "accuracy": acc0,
        }
    lo, hi = 0, len(order)
    ok, acc = meets(hi)
    if not ok:
        return {
            "nodes": None,
            "evaluations": evaluator.evaluations - start_evals,
            "full_evaluation_equivalents": evaluator.cost,
            "accuracy": acc,
        }
    best = acc
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, acc = meets(mid)
        if ok:
            hi, best = mid, acc
        else:
            lo = mid
    return {
        "nodes": hi,
        "evaluations": evaluator.evaluations - start_evals,
        "full_evaluation_equivalents": evaluator.cost,
        "accuracy": best,
    }


def run_case(name: str, model_path: Path, calib: Path, val: Path, preprocess: PreprocessSpec, max_drop: float) -> dict:
    info = load_model(model_path)
    ranges = calibrate(
        info,
        calib,
        quantkit.CalibrationOptions(methods="entropy"),
        data_options=quantkit.DataOptions(num_samples=400 if name != "ppocr_det" else None, preprocess=preprocess),
    ).ranges
    data = list(batches(open_source(val, info, preprocess, shuffle=False), info, 64 if name != "ppocr_det" else 1))
    labels = [label for b in data for label in b.labels]
    labelled = bool(labels) and all(label is not None for label in labels)
    params = {"threshold": 0.3} if name == "ppocr_det" else {}  # PP-OCR's own text threshold

    def evaluator() -> Evaluator:
        return Evaluator(info, data, "auto", labels if labelled else None, objective_params=params)

    nodes, _, _ = quantized_nodes(info, ranges, method="entropy", target="tensorrt")
    ev = evaluator()
    row = {
        "model": name,
        "quantized_nodes": len(nodes),
        "objective": ev.objective.describe(),
        "metric": ev.objective.name,
        "fp32": ev.baseline.accuracy,
        "max_drop": max_drop,
    }
    for ranking in ("disable-one", "sqnr"):
        ev = evaluator()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = tune(
                info,
                ranges,
                ev,
                tmp,
                quantkit.TuneOptions(max_drop=max_drop, ranking=ranking),
                export=quantkit.ExportOptions(method="entropy", target="tensorrt", allow_missing=True),
            )
        row["all_int8"] = result.trials[0].accuracy if result.trials else None
        row["all_int8_noise"] = result.trials[0].noise if result.trials else None
        row[f"quantkit_{ranking}"] = {
            "nodes": len(result.best.fallback) if result.best and result.best.meets else None,
            "evaluations": ev.evaluations + (result.sensitivity.evaluations if result.sensitivity else 0),
            "full_evaluation_equivalents": round(ev.cost, 1),
            "accuracy": result.best.accuracy if result.best else None,
            "noise": result.best.noise if result.best else None,
            "seconds": round(time.perf_counter() - start, 1),
            "fallback": result.best.fallback if result.best else [],
        }
    for direction in ("forward", "reverse"):
        ev = evaluator()
        row[f"prefix_{direction}"] = prefix_bisection(info, ranges, ev, nodes, max_drop, reverse=direction == "reverse")
    print(json.dumps(row), flush=True)
    return row


def render(rows: list[dict]) -> str:
    out = [
        "# Precision tuning: quantkit vs prefix bisection (TensorRT's precision debugger)",
        "",
        "Command: `python -m bench.tuning`. Entropy ranges, TensorRT placement, fallback to FP32. Each model is judged by the "
        "objective quantkit chooses for it (top-1 on labelled class scores, mask IoU against FP32 for the text detector's "
        "probability map at PP-OCR's 0.3 threshold). Evaluations count every pass over validation data, including quantkit's "
        "ranking; disable-one ranks nodes on a 256-sample subset; full-set equivalents weigh each pass by the share of the "
        "validation set it covers. ± is the bootstrap standard error over samples.",
        "",
        "| model | quantized nodes | objective | FP32 | all-INT8 | target (max drop) | method | nodes in FP32 | evaluations "
        "| full-set equivalents | objective reached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, label in (
            ("quantkit_disable-one", "quantkit, disable-one ranking + pruning"),
            ("quantkit_sqnr", "quantkit, SQNR ranking + pruning"),
            ("prefix_forward", "prefix bisection, forward"),
            ("prefix_reverse", "prefix bisection, reverse"),
        ):
            x = r[key]
            nodes = "not met" if x["nodes"] is None else str(x["nodes"])
            acc = f"{x['accuracy'] * 100:.2f}%" if x["accuracy"] is not None else "-"
            if x.get("noise"):
                acc += f" ± {x['noise']:.2f}"
            out.append(
                f"| {r['model']} | {r['quantized_nodes']} | {r['metric']} | {r['fp32'] * 100:.2f}% "
                f"| {r['all_int8'] * 100:.2f}% ± {r['all_int8_noise']:.2f} | {r['max_drop']} points | {label} "
                f"| {nodes} | {x['evaluations']} | {x['full_evaluation_equivalents']:.1f} | {acc} |"
            )
    for r in rows:
        out += ["", f"{r['model']}: objective {r['objective']}"]
        for key in ("quantkit_disable-one", "quantkit_sqnr"):
            if r[key]["fallback"]:
                out.append(f"{r['model']}: quantkit ({key[9:]}) keeps in FP32: " + ", ".join(f"`{n}`" for n in r[key]["fallback"]))
    return "\n".join(out) + "\n"


def main() -> None:
    from bench.cases import benchmark_cases, detector_case

    targets = {"demo_cnn": 0.5, "ppocr_cls": 1.0, "ppocr_det": 5.0}
    with benchmark_cases() as cases:
        rows = [run_case(*c, targets[c[0]]) for c in cases]
    with detector_case() as case:
        rows.append(run_case(*case, targets[case[0]]))
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "tuning.json").write_text(json.dumps({"command": "python -m bench.tuning", "rows": rows}, indent=1) + "\n")
    (REPORT_DIR / "tuning.md").write_text(render(rows))
    print(f"wrote {REPORT_DIR / 'tuning.md'}")


if __name__ == "__main__":
    main()
