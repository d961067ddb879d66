"""Per-layer precision tuning: the fewest high-precision nodes that meet an accuracy target.

1. Start all-INT8, or from the known-sensitive set with ``start_from_known``. If the target
   holds, stop.
2. Fall back the most sensitive nodes: bisection over the sensitivity ranking (not over graph
   order, so any subset of nodes can come out, not only a prefix), for the smallest top-k that
   meets the target.
3. Try returning each fallback node to INT8, least sensitive first, and keep it INT8 when the
   target still holds.

Every trial (plan, accuracy, latency) is appended to ``tune_history.json``, and the best plan so
far is written to ``precision_plan.json``, both atomically after each trial. A timeout, a trial
limit or Ctrl-C therefore leaves the full history and the best plan on disk, never nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from quantkit.atomic import ensure_writable_dir, write_bytes_atomic
from quantkit.errors import QuantkitError
from quantkit.model import ModelInfo
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.sensitivity import Evaluator, LocalExecutor, SensitivityResult, analyze, build_candidate

#: op types users expect in high precision (Softmax/LayerNorm of transformers); the first and
#: last quantized nodes are added by position
KNOWN_SENSITIVE_OPS = frozenset({"Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization"})


class _Stop(Exception):
    """Trial budget or time is spent."""


@dataclass
class Trial:
    index: int
    fallback: list[str]
    accuracy: float
    drop: float  # points below FP32
    meets: bool
    latency_ms: float | None
    phase: str

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.index,
            "phase": self.phase,
            "fallback": self.fallback,
            "accuracy": self.accuracy,
            "drop_points": self.drop,
            "meets_target": self.meets,
            "latency_ms": self.latency_ms,
        }


@dataclass
class TuneResult:
    plan: PrecisionPlan
    best: Trial | None
    trials: list[Trial]
    target_met: bool
    stopped: str  # "done", "timeout", "max-trials"
    sensitivity: SensitivityResult | None
    known_start: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def known_sensitive(model: ModelInfo, quantized: Sequence[str]) -> list[str]:
    """Nodes users usually keep in high precision: the first and last quantized nodes (the stem
    and the head), normalizations and Softmax."""
    picked = {n.name for n in model.proto.graph.node if n.op_type in KNOWN_SENSITIVE_OPS}
    if quantized:
        picked |= {quantized[0], quantized[-1]}
    return [n.name for n in model.proto.graph.node if n.name in picked]


def tune(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    out_dir: str | Path,
    *,
    max_drop: float = 0.5,
    method: str | None = None,
    target: str = "tensorrt",
    fallback: str = "fp32",
    max_trials: int | None = None,
    timeout: float | None = None,
    start_from_known: bool = False,
    sensitivity: SensitivityResult | None = None,
    executor: Any = None,
) -> TuneResult:
    """Search the fewest fallback nodes meeting ``max_drop`` (points of the evaluator's accuracy).

    With an ``executor`` of several workers (``quantkit.distributed.RayExecutor``), each bisection
    step evaluates as many split points at once as there are workers.
    """
    executor = executor or LocalExecutor(model, ranges, method, target)
    if fallback not in ("fp16", "fp32"):
        raise QuantkitError(f"--fallback must be fp16 or fp32, got {fallback}")
    out = ensure_writable_dir(out_dir)
    start = time.perf_counter()
    base = evaluator.baseline.accuracy
    trials: list[Trial] = []
    state: dict[str, Any] = {"best": None}
    history_path, plan_path = out / "tune_history.json", out / "precision_plan.json"

    def plan_for(nodes: Sequence[str]) -> PrecisionPlan:
        return PrecisionPlan(default="int8", fallback=fallback, nodes=dict.fromkeys(nodes, fallback))

    def better(a: Trial, b: Trial | None) -> bool:
        if b is None:
            return True
        if a.meets != b.meets:
            return a.meets
        if a.meets:  # both meet: fewer fallback nodes, then higher accuracy
            return (len(a.fallback), -a.accuracy) < (len(b.fallback), -b.accuracy)
        return a.accuracy > b.accuracy

    def save() -> None:
        best: Trial | None = state["best"]
        doc = {
            "format": "quantkit.tune_history",
            "baseline_accuracy": base,
            "accuracy": evaluator.accuracy_name,
            "max_drop_points": max_drop,
            "fallback_precision": fallback,
            "best_trial": best.index if best else None,
            "trials": [t.to_json() for t in trials],
            "notes": list(executor.notes),
        }
        write_bytes_atomic(history_path, (json.dumps(doc, indent=1) + "\n").encode())
        if best is not None:
            plan_for(best.fallback).save(plan_path)

    def cached(nodes: Sequence[str]) -> Trial | None:
        return next((t for t in trials if sorted(t.fallback) == sorted(nodes)), None)

    def run_trials(candidates: Sequence[Sequence[str]], phase: str) -> list[Trial]:
        """Evaluate candidates (in parallel where the executor has workers); budget is checked first."""
        candidates = [list(dict.fromkeys(c)) for c in candidates]
        new = [c for c in candidates if cached(c) is None]
        new = [c for i, c in enumerate(new) if c not in new[:i]]
        if new and trials:  # the all-INT8 trial always runs, so a plan exists whatever the budget
            if timeout is not None and time.perf_counter() - start > timeout:
                raise _Stop("timeout")
            if max_trials is not None:
                room = max_trials - len(trials)
                if room <= 0:
                    raise _Stop("max-trials")
                new = new[:room]
        scores = executor.map(evaluator, [plan_for(c) for c in new], latency=True) if new else []
        for nodes, score in zip(new, scores, strict=True):
            drop = 100 * (base - score.accuracy)
            t = Trial(len(trials), nodes, score.accuracy, drop, drop <= max_drop, score.latency_ms, phase)
            trials.append(t)
            if better(t, state["best"]):
                state["best"] = t
        if new:
            save()
        missing = [c for c in candidates if cached(c) is None]
        if missing:  # the trial budget ran out part-way through this step
            raise _Stop("max-trials")
        return [cached(c) for c in candidates]  # type: ignore[misc]

    def trial(nodes: Sequence[str], phase: str) -> Trial:
        return run_trials([nodes], phase)[0]

    messages: list[str] = []
    se = evaluator.standard_error(base) if evaluator.metric else 0.0
    if se > max_drop:
        messages.append(
            f"warning: {evaluator.samples} validation samples give a standard error of {se:.2f} points on {evaluator.accuracy_name}, "
            f"more than the {max_drop}-point target: differences between trials are mostly noise; use more validation samples"
        )
    known: list[str] = []
    stopped = "done"
    try:
        first = trial([], "all-int8")
        if first.meets:
            messages.append(f"all-INT8 already meets the target ({first.drop:.2f} points drop <= {max_drop}): the plan is all-INT8")
        else:
            if sensitivity is None:
                sensitivity = analyze(model, ranges, evaluator, method=method, target=target, executor=executor)
            ranking = sensitivity.ranking()
            start_set: list[str] = []
            if start_from_known:
                known = [n for n in known_sensitive(model, ranking) if n in {n2.name for n2 in model.proto.graph.node}]
                t = trial(known, "known-sensitive start")
                messages.append(
                    f"known-sensitive start ({len(known)} nodes): {t.accuracy * 100:.2f}% ({'meets' if t.meets else 'misses'} the target)"
                )
                start_set = known if t.meets else []
            if not start_set:
                everything = trial(ranking, "all fallback")
                if not everything.meets:
                    messages.append(
                        f"the target cannot be met: with every quantized node in {fallback} the drop is still {everything.drop:.2f} points"
                    )
                else:
                    lo, hi = 0, len(ranking)  # top-lo fails, top-hi meets
                    probes_per_step = max(1, executor.workers)
                    while hi - lo > 1:
                        # evenly spaced split points in (lo, hi): one with a single worker (plain bisection)
                        points = sorted({lo + (hi - lo) * (j + 1) // (probes_per_step + 1) for j in range(probes_per_step)} - {lo, hi})
                        points = points or [(lo + hi) // 2]
                        results = run_trials([ranking[:k] for k in points], "bisect" if len(points) == 1 else "bisect (parallel)")
                        meeting = [k for k, t in zip(points, results, strict=True) if t.meets]
                        new_hi = min(meeting) if meeting else hi
                        lo = max([k for k in points if k < new_hi] + [lo])
                        hi = new_hi
                    start_set = ranking[:hi]
            if start_set:
                current = list(start_set)
                order = sorted(current, key=lambda n: ranking.index(n) if n in ranking else -1, reverse=True)  # least sensitive first
                for node in order:
                    candidate = [n for n in current if n != node]
                    if trial(candidate, "prune").meets:
                        current = candidate
    except _Stop as stop:
        stopped = str(stop)
        messages.append(f"stopped early ({stopped}) after {len(trials)} trials: the best plan so far is saved")
    except KeyboardInterrupt:
        stopped = "interrupted"
        messages.append(f"interrupted after {len(trials)} trials: the history and the best plan so far are saved")
        save()
        raise
    save()
    best = state["best"]
    plan = plan_for(best.fallback) if best else PrecisionPlan()
    result = TuneResult(plan, best, trials, bool(best and best.meets), stopped, sensitivity, known, messages)
    result.files = [history_path] + ([plan_path] if best else [])
    if best is not None:
        tuned: onnx.ModelProto = build_candidate(model, ranges, plan, method=method, target=target)
        tuned_path = out / f"{model.path.stem}.tuned.onnx"
        write_bytes_atomic(tuned_path, tuned.SerializeToString())
        result.files.append(tuned_path)
    return result


def summary(result: TuneResult, evaluator: Evaluator) -> str:
    best = result.best
    lines = [
        f"{len(result.trials)} trials; {evaluator.cost:.1f} passes over the validation set in all (sensitivity included); "
        f"stopped: {result.stopped}",
        f"FP32 {evaluator.accuracy_name} {evaluator.baseline.accuracy * 100:.2f}%",
    ]
    if best is not None:
        lines.append(
            f"best: {len(best.fallback)} node(s) in {result.plan.fallback or 'fp32'}, {evaluator.accuracy_name} {best.accuracy * 100:.2f}% "
            f"({best.drop:+.2f} points drop), {'meets' if best.meets else 'misses'} the target"
        )
        lines += [f"  - {n}" for n in best.fallback]
    lines += result.messages
    return "\n".join(lines)
