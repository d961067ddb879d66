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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from quantkit._io import ensure_writable_dir, step_bar, write_bytes_atomic
from quantkit.evaluation.check import graph_states, judge_outputs
from quantkit.model import ModelInfo
from quantkit.options import ExportOptions, TuneOptions, given
from quantkit.optypes import KNOWN_SENSITIVE_OPS
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.tuning.sensitivity import (
    Evaluator,
    LocalExecutor,
    SensitivityResult,
    SensitivityTimeout,
    TrialExecutor,
    build_candidate,
    rank_nodes,
)


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
    noise: float = 0.0  # bootstrap standard error of ``accuracy``, in the objective's unit

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.index,
            "phase": self.phase,
            "fallback": self.fallback,
            "accuracy": self.accuracy,
            "drop_points": self.drop,
            "meets_target": self.meets,
            "latency_ms": self.latency_ms,
            "standard_error": self.noise,
        }


@dataclass
class TuneResult:
    plan: PrecisionPlan
    best: Trial | None
    trials: list[Trial]
    target_met: bool
    stopped: str  # "done", "timeout", "max-trials"
    sensitivity: SensitivityResult | None
    messages: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # outputs of the best model that the fidelity check refuses
    max_drop: float | None = None  # the target, in the objective's unit
    method: str | None = None  # the calibration method tuned (chosen by all-INT8 score with choose_method)


def known_sensitive(model: ModelInfo, quantized: Sequence[str]) -> list[str]:
    """Nodes users usually keep in high precision: the first and last quantized nodes (the stem
    and the head), normalizations and Softmax."""
    picked = {n.name for n in model.proto.graph.node if n.op_type in KNOWN_SENSITIVE_OPS}
    if quantized:
        picked |= {quantized[0], quantized[-1]}
    return [n.name for n in model.proto.graph.node if n.name in picked]


class PrecisionSearch:
    """One tuning run: the trials so far, the best of them, and the files that record them.

    ``run()`` goes through the phases of the module docstring. Every trial goes through
    ``trials_for``, which checks the budget first and saves history and best plan after.
    """

    def __init__(
        self,
        model: ModelInfo,
        ranges: RangeSet,
        evaluator: Evaluator,
        out: Path,
        options: TuneOptions,
        export: ExportOptions,
        executor: TrialExecutor,
        sensitivity: SensitivityResult | None = None,
        quiet: bool = True,
    ) -> None:
        self.model, self.ranges, self.evaluator, self.out = model, ranges, evaluator, out
        self.options, self.export, self.executor = options, export, executor
        self.sensitivity, self.quiet = sensitivity, quiet
        self.bar = step_bar(options.max_trials, "tune", "trial", quiet)  # trial k, the best so far
        self.base = evaluator.baseline.accuracy
        self.trials: list[Trial] = []
        self.best: Trial | None = None
        self.messages: list[str] = []
        self.known: list[str] = []
        self.start = time.perf_counter()
        self.history_path, self.plan_path = out / "tune_history.json", out / "precision_plan.json"
        self.method_scores: dict[str, float] = {}

    def plan_for(self, nodes: Sequence[str]) -> PrecisionPlan:
        fallback = self.options.fallback
        return PrecisionPlan(default="int8", fallback=fallback, nodes=dict.fromkeys(nodes, fallback))

    @staticmethod
    def better(a: Trial, b: Trial | None) -> bool:
        if b is None:
            return True
        if a.meets != b.meets:
            return a.meets
        if a.meets:  # both meet: fewer fallback nodes, then higher accuracy
            return (len(a.fallback), -a.accuracy) < (len(b.fallback), -b.accuracy)
        return a.accuracy > b.accuracy

    def save(self) -> None:
        doc = {
            "format": "quantkit.tune_history",
            "baseline_accuracy": self.base,
            "accuracy": self.evaluator.accuracy_name,
            "objective": self.evaluator.objective.describe(),
            "unit": self.evaluator.objective.unit,
            "max_drop_points": self.options.max_drop,
            "fallback_precision": self.options.fallback,
            "best_trial": self.best.index if self.best else None,
            "method": self.export.method,
            "all_int8_by_method": self.method_scores,
            "trials": [t.to_json() for t in self.trials],
            "notes": list(self.executor.notes),
        }
        write_bytes_atomic(self.history_path, (json.dumps(doc, indent=1) + "\n").encode())
        if self.best is not None:
            self.plan_for(self.best.fallback).save(self.plan_path)

    def cached(self, nodes: Sequence[str]) -> Trial | None:
        return next((t for t in self.trials if sorted(t.fallback) == sorted(nodes)), None)

    def check_budget(self) -> None:
        if self.options.timeout is not None and time.perf_counter() - self.start > self.options.timeout:
            raise _Stop("timeout")

    def trials_for(self, candidates: Sequence[Sequence[str]], phase: str) -> list[Trial]:
        """Evaluate candidates (in parallel where the executor has workers); budget is checked first."""
        candidates = [list(dict.fromkeys(c)) for c in candidates]
        new = [c for c in candidates if self.cached(c) is None]
        new = [c for i, c in enumerate(new) if c not in new[:i]]
        if new and self.trials:  # the all-INT8 trial always runs, so a plan exists whatever the budget
            self.check_budget()
            if self.options.max_trials is not None:
                room = self.options.max_trials - len(self.trials)
                if room <= 0:
                    raise _Stop("max-trials")
                new = new[:room]
        scores = self.executor.map(self.evaluator, [self.plan_for(c) for c in new], latency=True) if new else []
        for nodes, score in zip(new, scores, strict=True):
            drop = self.evaluator.drop(score)
            meets = drop <= self.options.max_drop + 1e-9  # 100 * (0.945 - 0.935) is 1.0000000000000009: a 1.0 target holds
            t = Trial(len(self.trials), nodes, score.accuracy, drop, meets, score.latency_ms, phase, score.noise)
            self.trials.append(t)
            if self.better(t, self.best):
                self.best = t
            self.bar.update(1)
            if self.best is not None:
                shown = self.evaluator.objective.show(self.best.accuracy)
                self.bar.set_postfix_str(f"best {shown}, {len(self.best.fallback)} node(s) kept float", refresh=False)
        if new:
            self.save()
        if any(self.cached(c) is None for c in candidates):  # the trial budget ran out part-way through this step
            raise _Stop("max-trials")
        return [self.cached(c) for c in candidates]  # type: ignore[misc]

    def trial(self, nodes: Sequence[str], phase: str) -> Trial:
        return self.trials_for([nodes], phase)[0]

    def bisect(self, ranking: list[str]) -> list[str]:
        """The smallest top-k of the ranking that meets the target (empty if all of it does not)."""
        everything = self.trial(ranking, "all fallback")
        if not everything.meets:
            self.messages.append(
                f"the target cannot be met: with every quantized node in {self.options.fallback} "
                f"the drop is still {everything.drop:.2f} {self.evaluator.objective.unit}"
            )
            return []
        lo, hi = 0, len(ranking)  # top-lo fails, top-hi meets
        probes_per_step = max(1, self.executor.workers)
        while hi - lo > 1:
            # evenly spaced split points in (lo, hi): one with a single worker (plain bisection)
            points = sorted({lo + (hi - lo) * (j + 1) // (probes_per_step + 1) for j in range(probes_per_step)} - {lo, hi})
            points = points or [(lo + hi) // 2]
            results = self.trials_for([ranking[:k] for k in points], "bisect" if len(points) == 1 else "bisect (parallel)")
            meeting = [k for k, t in zip(points, results, strict=True) if t.meets]
            new_hi = min(meeting) if meeting else hi
            lo = max([k for k in points if k < new_hi] + [lo])
            hi = new_hi
        return ranking[:hi]

    def prune(self, start_set: list[str], ranking: list[str]) -> None:
        """Return each fallback node to INT8, least sensitive first, while the target holds."""
        current = list(start_set)
        order = sorted(current, key=lambda n: ranking.index(n) if n in ranking else -1, reverse=True)
        for node in order:
            candidate = [n for n in current if n != node]
            if self.trial(candidate, "prune").meets:
                current = candidate

    def choose_method(self) -> None:
        """All-INT8 with each calibrated method; the search goes on with the best (ties: the first)."""
        methods = list(self.ranges.methods)
        plan = self.plan_for([])
        scores = []
        for method in methods:
            self.check_budget() if self.trials or scores else None
            candidate = build_candidate(self.model, self.ranges, plan, method=method, target=self.export.target)
            scores.append(self.evaluator.evaluate(candidate))
        best = max(range(len(methods)), key=lambda k: (scores[k].accuracy, -k))
        shown = ", ".join(f"{m} {self.evaluator.objective.show(s.accuracy)}" for m, s in zip(methods, scores, strict=True))
        self.messages.append(f"all-INT8 by calibration method: {shown}; tuning {methods[best]}")
        self.method_scores = {m: s.accuracy for m, s in zip(methods, scores, strict=True)}
        self.export = replace(self.export, method=methods[best])
        if hasattr(self.executor, "method"):
            self.executor.method = methods[best]  # the executor builds every later trial with it

    def search(self) -> None:
        if self.options.choose_method and len(self.ranges.methods) > 1:
            self.choose_method()
        first = self.trial([], "all-int8")
        unit = self.evaluator.objective.unit
        if first.noise > self.options.max_drop:
            self.messages.append(
                f"warning: the all-INT8 {self.evaluator.accuracy_name} has a standard error of {first.noise:.2f} {unit} over "
                f"{self.evaluator.samples} validation samples, more than the {self.options.max_drop}-{unit} target: "
                "differences between trials are mostly noise; use more validation samples"
            )
        if first.meets:
            self.messages.append(
                f"all-INT8 already meets the target ({first.drop:.2f} {unit} drop <= {self.options.max_drop}): the plan is all-INT8"
            )
            return
        if self.sensitivity is None:
            deadline = self.start + self.options.timeout if self.options.timeout is not None else None
            try:
                self.sensitivity = rank_nodes(
                    self.model,
                    self.ranges,
                    self.evaluator,
                    method=self.export.method,
                    target=self.export.target,
                    executor=self.executor,
                    deadline=deadline,
                    enable_one=False,  # the search ranks by disable-one: half the cost
                    ranking=self.options.ranking,
                    quiet=self.quiet,
                )
            except SensitivityTimeout as stop:
                self.messages.append(str(stop))
                raise _Stop("timeout") from None
        self.check_budget()
        ranking = self.sensitivity.ranking()
        start_set: list[str] = []
        if self.options.start_from_known:
            names = {n.name for n in self.model.proto.graph.node}
            self.known = [n for n in known_sensitive(self.model, ranking) if n in names]
            t = self.trial(self.known, "known-sensitive start")
            self.messages.append(
                f"known-sensitive start ({len(self.known)} nodes): {self.evaluator.objective.show(t.accuracy)} "
                f"({'meets' if t.meets else 'misses'} the target)"
            )
            start_set = self.known if t.meets else []
        if not start_set:
            start_set = self.bisect(ranking)
        if start_set:
            self.prune(start_set, ranking)

    def run(self) -> TuneResult:
        self.messages.append(f"objective: {self.evaluator.objective.describe()}")
        if self.evaluator.warning:
            self.messages.append(f"warning: {self.evaluator.warning}")
        stopped = "done"
        try:
            self.search()
        except _Stop as stop:
            stopped = str(stop)
            self.messages.append(f"stopped early ({stopped}) after {len(self.trials)} trials: the best plan so far is saved")
        except KeyboardInterrupt:
            self.messages.append(f"interrupted after {len(self.trials)} trials: the history and the best plan so far are saved")
            self.save()
            raise
        self.save()
        best = self.best
        plan = self.plan_for(best.fallback) if best else PrecisionPlan()
        result = TuneResult(plan, best, self.trials, bool(best and best.meets), stopped, self.sensitivity, self.messages)
        result.max_drop, result.method = self.options.max_drop, self.export.method
        result.files = [self.history_path] + ([self.plan_path] if best else [])
        if best is not None:
            tuned: onnx.ModelProto = build_candidate(self.model, self.ranges, plan, method=self.export.method, target=self.export.target)
            names = [o.name for o in self.model.proto.graph.output]
            outputs = self.evaluator._run(tuned)
            broken = [
                c for c in judge_outputs(names, self.evaluator.reference, outputs, states=graph_states(self.model.proto)) if c.problem
            ]
            if broken:  # never written: the history and the plan say what was tried
                result.broken = [c.line() for c in broken]
                result.messages.append("the best model so far is broken, so no tuned model was written: " + "; ".join(result.broken[:3]))
                return result
            # a model that misses the target says so in its name: nobody ships it by mistake
            suffix = ".tuned.onnx" if result.target_met else ".tuned.misses-target.onnx"
            tuned_path = self.out / f"{self.model.path.stem}{suffix}"
            write_bytes_atomic(tuned_path, tuned.SerializeToString())
            result.files.append(tuned_path)
        return result


def run_search(
    model: ModelInfo,
    ranges: RangeSet,
    evaluator: Evaluator,
    out_dir: str | Path,
    options: TuneOptions | None = None,
    *,
    export: ExportOptions | None = None,
    sensitivity: SensitivityResult | None = None,
    executor: TrialExecutor | None = None,
    quiet: bool = True,
) -> TuneResult:
    """Search the fewest fallback nodes meeting ``options.max_drop`` (points of the evaluator's accuracy).

    ``export`` gives the method and placement. With an ``executor`` of several workers
    (``quantkit.scaleout.ray.RayExecutor``), each bisection step evaluates as many split points
    at once as there are workers.
    """
    options, export = given(options, TuneOptions, "options"), export or ExportOptions(allow_missing=True)
    executor = executor or LocalExecutor(model, ranges, export.method, export.target)
    out = ensure_writable_dir(out_dir)
    search = PrecisionSearch(model, ranges, evaluator, out, options, export, executor, sensitivity, quiet)
    try:
        return search.run()
    finally:
        search.bar.close()


def summary(result: TuneResult, evaluator: Evaluator) -> str:
    best, objective = result.best, evaluator.objective
    lines = [
        f"{len(result.trials)} trials; {evaluator.cost:.1f} passes over the validation set in all (sensitivity included); "
        f"stopped: {result.stopped}" + (f"; ranges: {result.method}" if result.method else ""),
        f"FP32 {evaluator.accuracy_name} {objective.show(evaluator.baseline.accuracy)}",
    ]
    if best is not None:
        lines.append(
            f"best: {len(best.fallback)} node(s) in {result.plan.fallback or 'fp32'}, {evaluator.accuracy_name} "
            f"{objective.show(best.accuracy)} ± {best.noise:.2f} ({best.drop:+.2f} {objective.unit} drop), "
            f"{'meets' if best.meets else 'misses'} the target"
        )
        if best.fallback:
            lines.append(f"kept in {result.plan.fallback or 'fp32'}: " + ", ".join(best.fallback))
    lines += result.messages
    return "\n".join(lines)
