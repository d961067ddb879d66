"""Objectives: the one number that says how good a variant is for the model at hand.

One registry serves eval, sensitivity and tune. Every objective is higher-is-better and is
computed from per-sample statistics (``stats``, one row per sample) folded by ``aggregate``, so
that its noise comes from the same numbers: a bootstrap over samples (``noise``).

- ``top1``/``top5``: labels among the k highest class scores (needs integer labels).
- ``agreement``: argmax of the class scores equals FP32's.
- ``cosine``: per-sample cosine similarity with FP32 over every output; ``sqnr``: SQNR in dB.
- ``mask-iou``: IoU of the binarized probability map (``threshold``), or mean IoU over the
  argmax classes of a segmentation map, against FP32's, or against mask labels.
- ``detection-f1``: YOLO-style heads ([N, 4+C, A] or [N, A, 4+C], boxes as cx, cy, w, h):
  decode at ``conf``, class-aware NMS, then F1 at IoU 0.5 against FP32's detections, or against
  box labels ([M, 5] rows of class, x1, y1, x2, y2 per sample).
- a user metric, ``module:function`` or ``path.py:function``, called as
  ``function(outputs, reference, labels)`` (``labels`` None without them); it returns one value,
  or one value per sample (then the objective is their mean and its noise is known).

``choose_objective`` picks the default from the outputs' shapes and the labels, with a reason
that eval, sensitivity and tune print and report.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.evaluation.detection import decode_detections, detection_layout, final_detections, match_counts
from quantkit.evaluation.task import ctc_blank, ctc_strings, infer_task

BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SEED = 20231  # fixed: reports are byte-identical on repeat
SQNR_CAP_DB = 150.0  # identical outputs: finite, so that drops and JSON stay numbers

Stats = Callable[[list[np.ndarray], list[np.ndarray], Sequence | None], np.ndarray]


@dataclass(frozen=True)
class Objective:
    """A higher-is-better figure of a variant's outputs against FP32's (and the labels)."""

    name: str
    stats: Stats  # (outputs, reference, labels) -> [N, k] per-sample statistics
    aggregate: Callable[[np.ndarray], float]  # column means of stats -> the objective
    needs_labels: bool = False
    uses_labels: bool = False  # compared with labels where they exist, else with FP32
    unit: str = "points"  # drops are in percentage points of a fraction, or in dB
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # what makes a value meaningless on these samples (e.g. FP32 detects nothing): stats -> warning or ""
    vacuous: Callable[[np.ndarray], str] | None = None
    spec: str = ""  # what ``objective()`` rebuilds it from (Ray workers do); "" for a Python callable

    def rebuildable(self) -> tuple[str, dict[str, Any]] | None:
        """(spec, parameters) to rebuild this objective elsewhere, None for a Python callable."""
        if not self.spec:
            return None
        return self.spec, {"conf": self.params.get("conf", 0.25), "threshold": self.params.get("threshold", 0.5), "reason": self.reason}

    @property
    def scale(self) -> float:
        return 100.0 if self.unit == "points" else 1.0

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}{f' ({shown})' if shown else ''}" + (f": {self.reason}" if self.reason else "")

    def measure(self, outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> Measurement:
        if self.needs_labels and labels is None:
            raise QuantkitError(f"the {self.name} objective needs labels, and the data has none: use agreement, or give labels")
        stats = np.asarray(self.stats(outputs, reference, labels if self.uses_labels or self.needs_labels else None), np.float64)
        if stats.ndim == 1:
            stats = stats[:, None]
        return Measurement(self.aggregate(stats.mean(0)) if len(stats) else math.nan, stats, self)

    def show(self, value: float) -> str:
        return format_value(value, self.unit)

    def drop(self, baseline: float, value: float) -> float:
        """How far ``value`` is below ``baseline``, in this objective's unit (points or dB)."""
        return self.scale * (baseline - value)


def format_value(value: float | None, unit: str) -> str:
    """An objective's value as people read it: a percentage, or dB."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value * 100:.2f}%" if unit == "points" else f"{value:.2f} dB"


@dataclass
class Measurement:
    value: float
    stats: np.ndarray
    objective: Objective

    def warning(self) -> str:
        """Why this value says nothing on these samples ("" when it does)."""
        return self.objective.vacuous(self.stats) if self.objective.vacuous is not None and len(self.stats) else ""

    def noise(self, rounds: int = BOOTSTRAP_ROUNDS) -> float:
        """Bootstrap standard error of the value over samples, in the objective's unit (0 for one sample)."""
        n = len(self.stats)
        if n < 2:
            return 0.0
        picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(rounds, n))
        values = np.array([self.objective.aggregate(self.stats[p].mean(0)) for p in picks])
        values = values[np.isfinite(values)]
        return float(self.objective.scale * values.std(ddof=1)) if len(values) > 1 else 0.0


# ---- class scores ------------------------------------------------------------------------------
def _scores(output: np.ndarray) -> np.ndarray:
    return output.reshape(output.shape[0], -1)


def _int_labels(labels: Sequence, n: int, classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != n:
        raise QuantkitError(f"class labels must be one integer per sample ({n}), got labels of shape {y.shape} and type {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise QuantkitError(f"labels range over [{y.min()}, {y.max()}] but the output scores {classes} classes")
    return y


def _top_k_stats(k: int) -> Stats:
    def stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
        scores = _scores(outputs[0])
        y = _int_labels(labels, len(scores), scores.shape[1])  # type: ignore[arg-type]
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (best == y[:, None]).any(axis=1).astype(np.float64)

    return stats


def _agreement_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    return (_scores(outputs[0]).argmax(1) == _scores(reference[0]).argmax(1)).astype(np.float64)


def _decision_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    """Per sample: the share of its probabilities on FP32's side of 0.5 (one per sample: a VAD's decision)."""
    got, want = (np.asarray(o, np.float64).reshape(len(o), -1) > 0.5 for o in (outputs[0], reference[0]))
    return (got == want).mean(axis=1)


def _sequence(output: np.ndarray) -> np.ndarray:
    if output.ndim != 3:
        raise QuantkitError(f"a sequence metric needs [N, T, C] class scores, got shape {list(output.shape)}")
    return output


def _position_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    """Per sample: the share of positions whose argmax class is FP32's."""
    return (_sequence(outputs[0]).argmax(-1) == _sequence(reference[0]).argmax(-1)).mean(axis=1).astype(np.float64)


def _string_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    """Per sample: 1 where the greedy CTC decoding equals FP32's (the blank read from FP32's argmax)."""
    ref = _sequence(reference[0])
    blank = ctc_blank(ref.argmax(-1), ref.shape[-1])
    got, want = ctc_strings(_sequence(outputs[0]), max(blank, 0)), ctc_strings(ref, max(blank, 0))
    return np.array([a == b for a, b in zip(got, want, strict=True)], np.float64)


def _samples_first(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each output with its sample axis first: axis 1 where axis 0 is not the sample count (most
    outputs' first size) and axis 1 is (an RNN's state [layers, N, hidden], a time-first output)."""
    n = Counter(a.shape[0] for a in arrays if a.ndim).most_common(1)[0][0]
    return [np.moveaxis(a, 1, 0) if a.ndim > 1 and a.shape[0] != n and a.shape[1] == n else a for a in arrays]


def _per_sample(outputs: list[np.ndarray], reference: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every output of a sample as one row (float64)."""
    got = np.concatenate([o.reshape(o.shape[0], -1).astype(np.float64) for o in _samples_first(outputs)], axis=1)
    ref = np.concatenate([r.reshape(r.shape[0], -1).astype(np.float64) for r in _samples_first(reference)], axis=1)
    return got, ref


def _cosine_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    got, ref = _per_sample(outputs, reference)
    ng, nr = np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1)
    dot = np.einsum("ij,ij->i", got, ref)
    both_zero = (ng == 0) & (nr == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, np.nan_to_num(dot / (ng * nr), nan=0.0))
    return cos


def _sqnr_stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
    got, ref = _per_sample(outputs, reference)
    return np.stack([np.sum(ref**2, axis=1), np.sum((got - ref) ** 2, axis=1)], axis=1)


def _sqnr_value(means: np.ndarray) -> float:
    signal, noise = means
    if noise <= 0:
        return SQNR_CAP_DB
    if signal <= 0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise))


def _mean(means: np.ndarray) -> float:
    return float(means[0])


# ---- maps ----------------------------------------------------------------------------------------
def _mask_iou_stats(threshold: float) -> Stats:
    """Per sample: intersection and union of each class (one class for a probability map)."""

    def stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
        got, ref = outputs[0], reference[0]
        if got.ndim < 3:
            raise QuantkitError(f"mask-iou needs a map output ([N, H, W] or [N, C, H, W]), got shape {list(got.shape)}")
        segmentation = got.ndim == 4 and got.shape[1] > 1
        if segmentation:
            classes = got.shape[1]
            pred, truth = got.argmax(1), ref.argmax(1)
        else:
            classes = 1
            pred, truth = got.reshape(got.shape[0], *got.shape[-2:]) > threshold, ref.reshape(ref.shape[0], *ref.shape[-2:]) > threshold
        if _structured(labels):
            truth = _mask_labels(labels, pred.shape, segmentation, threshold)
        rows = []
        for p, t in zip(pred, truth, strict=True):
            if segmentation:
                inter = np.bincount(p[p == t].ravel(), minlength=classes)[:classes]
                union = np.bincount(p.ravel(), minlength=classes)[:classes] + np.bincount(t.ravel(), minlength=classes)[:classes] - inter
            else:
                inter, union = np.array([np.sum(p & t)]), np.array([np.sum(p | t)])
            rows.append(np.concatenate([inter, union]).astype(np.float64))
        return np.array(rows)

    return stats


def _structured(labels: Sequence | None) -> bool:
    """Labels that are masks or boxes; class indices (an image folder's names) are not, and the
    map and detection objectives then compare with FP32."""
    return labels is not None and len(labels) > 0 and all(np.ndim(item) > 0 for item in labels)


def _mask_labels(labels: Sequence, shape: tuple[int, ...], segmentation: bool, threshold: float) -> np.ndarray:
    masks = [np.asarray(m) for m in labels]
    if any(m.shape[-2:] != shape[-2:] for m in masks):
        raise QuantkitError(f"mask labels must be maps of the output's size {list(shape[-2:])}, got {list(masks[0].shape)}")
    stacked = np.stack([m.reshape(shape[-2:]) for m in masks])
    return stacked.astype(np.int64) if segmentation else stacked > threshold


def _mean_iou(means: np.ndarray) -> float:
    inter, union = np.split(means, 2)
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else 1.0


# ---- detection ----------------------------------------------------------------------------------
def _box_labels(labels: Sequence, n: int) -> list[np.ndarray]:
    boxes = []
    for i, item in enumerate(labels):
        a = np.asarray(item, np.float64).reshape(-1, 5) if np.size(item) else np.zeros((0, 5))
        # labels are class, x1, y1, x2, y2; detections are x1, y1, x2, y2, score, class
        boxes.append(np.concatenate([a[:, 1:5], np.ones((len(a), 1)), a[:, :1]], axis=1))
        if a.shape[1] != 5:
            raise QuantkitError(f"box labels of sample {i} must be [M, 5] rows of class, x1, y1, x2, y2")
    if len(boxes) != n:
        raise QuantkitError(f"{len(boxes)} box labels for {n} samples")
    return boxes


def _detection_stats(conf: float) -> Stats:
    def stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
        final = final_detections(reference[0])  # FP32's values say whether NMS already ran in the graph
        found = decode_detections(outputs[0], conf, final=final)
        truth = _box_labels(labels, len(found)) if _structured(labels) else decode_detections(reference[0], conf, final=final)
        return np.array([match_counts(f, t) for f, t in zip(found, truth, strict=True)], np.float64).reshape(-1, 3)

    return stats


def _f1(means: np.ndarray) -> float:
    tp, fp, fn = means
    return 1.0 if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


# ---- the registry ----------------------------------------------------------------------------------
def objective(name: str, *, conf: float = 0.25, threshold: float = 0.5, reason: str = "") -> Objective:
    """A built-in objective by name, or a user metric ``module:function`` / ``path.py:function``."""
    built = _built_in(name, conf, threshold, reason)
    return replace(built, spec=built.spec or name)


def _built_in(name: str, conf: float, threshold: float, reason: str) -> Objective:
    if name.startswith("top") and name[3:].isdigit() and int(name[3:]) >= 1:
        k = int(name[3:])
        return Objective(name, _top_k_stats(k), _mean, needs_labels=True, reason=reason)
    if name == "agreement":
        return Objective(name, _agreement_stats, _mean, reason=reason)
    if name == "cosine":
        return Objective(name, _cosine_stats, _mean, reason=reason)
    if name == "sqnr":
        return Objective(name, _sqnr_stats, _sqnr_value, unit="dB", reason=reason)
    if name == "mask-iou":
        _check_fraction(threshold, "mask_threshold")
        return Objective(
            name, _mask_iou_stats(threshold), _mean_iou, uses_labels=True, reason=reason, params={"threshold": threshold},
            vacuous=lambda st: "" if st[:, st.shape[1] // 2 :].sum() > 0 else (
                f"no pixel is above {threshold} in either mask on these samples: IoU says nothing; lower --mask-threshold"
            ),
        )  # fmt: skip
    if name == "detection-f1":
        _check_fraction(conf, "conf")
        return Objective(
            name, _detection_stats(conf), _f1, uses_labels=True, reason=reason, params={"conf": conf},
            vacuous=lambda st: "" if (st[:, 0] + st[:, 2]).sum() > 0 else (
                f"the reference has no detection at conf {conf} on these samples: F1 says nothing; lower --conf or check the data"
            ),
        )  # fmt: skip
    if name == "position-agreement":
        return Objective(name, _position_stats, _mean, reason=reason)
    if name == "decision-agreement":
        return Objective(name, _decision_stats, _mean, reason=reason)
    if name == "string-agreement":
        return Objective(name, _string_stats, _mean, reason=reason)
    if ":" in name:
        return replace(user_objective(name), spec=name)
    raise QuantkitError(
        f"unknown metric {name!r}; built in: {', '.join(BUILT_IN)}, or module:function / path.py:function for your own", option="metric"
    )


BUILT_IN = (
    "top1", "top5", "agreement", "position-agreement", "decision-agreement", "string-agreement", "cosine", "sqnr", "mask-iou",
    "detection-f1",
)  # fmt: skip


def _check_fraction(value: float, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise QuantkitError(f"{option} must be a number in [0, 1], got {value!r}", option=option)


def from_callable(fn: Callable[..., Any], name: str | None = None) -> Objective:
    """A user function as an objective: ``fn(outputs, reference, labels)``, or the older
    ``fn(outputs, labels)`` (which then needs labels)."""
    try:
        positional = [
            p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        positional = []
    legacy = len(positional) == 2 and positional[-1].kind != inspect.Parameter.VAR_POSITIONAL
    label = name or getattr(fn, "__name__", "metric")

    def stats(outputs: list[np.ndarray], reference: list[np.ndarray], labels: Sequence | None) -> np.ndarray:
        try:
            value = fn(outputs, labels) if legacy else fn(outputs, reference, labels)
            result = np.asarray(value, np.float64)
        except QuantkitError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code (sys.exit too) is bad input, not our exit
            raise QuantkitError(f"metric {label} failed: {type(exc).__name__}: {exc}", option="metrics") from None
        if not np.all(np.isfinite(result)):
            raise QuantkitError(f"metric {label} returned {value!r:.60}: it must return finite numbers", option="metrics")
        n = len(outputs[0]) if outputs and outputs[0].ndim else 1
        if result.ndim == 0:
            return np.full((n, 1), float(result))  # one value for the set: no per-sample noise
        if result.shape != (n,):
            raise QuantkitError(
                f"metric {label} must return one number, or one per sample ({n}), got shape {list(result.shape)}", option="metrics"
            )
        return result[:, None]

    return Objective(label, stats, _mean, needs_labels=legacy, uses_labels=True, unit="points", reason="your metric")


def user_objective(spec: str) -> Objective:
    """``module:function`` (importable) or ``path/to/file.py:function``."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise QuantkitError(f"metric {spec!r}: use module:function or path/to/file.py:function", option="metric")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise QuantkitError(f"metric {spec!r}: {path} is not a file", option="metric")
            module_name = f"quantkit_user_metric_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except QuantkitError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's module: any failure is bad input
        raise QuantkitError(f"metric {spec!r}: cannot load {where}: {type(exc).__name__}: {exc}", option="metric") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise QuantkitError(f"metric {spec!r}: {where} has no function {attr}", option="metric")
    return from_callable(fn, attr)


def choose_objective(shapes: Sequence[Sequence[int]], labelled: bool, reference: np.ndarray | None = None, **params: Any) -> Objective:
    """The default objective for outputs of these shapes (the first output decides), with its reason.

    ``reference``: FP32's first output. Class scores [N, C] are judged by top-1 (labels) or
    agreement; any other output by the task the fidelity check reads in FP32's values
    (``quantkit.evaluation.task``): a CTC sequence by its decoded strings, a detection head by
    box F1, a probability or class map by IoU, and the rest by cosine.
    """
    shape = [int(d) for d in shapes[0]]
    squeezed = [shape[0], *[d for d in shape[1:] if d != 1]]
    shown = f"the first output {shape}"
    if len(squeezed) == 2 and squeezed[1] > 1:
        if labelled:
            return objective("top1", reason=f"{shown} holds class scores and the data has labels", **params)
        return objective("agreement", reason=f"{shown} holds class scores and the data has no labels: argmax agreement with FP32", **params)
    if reference is None:
        return _objective_from_shape(shape, shown, **params)
    task = infer_task(reference, len(reference))
    name = _OBJECTIVE_OF_TASK[task.kind]
    return objective(name, reason=f"{shown} is a {task.kind} ({task.reason}): {_WHAT[name]}", **params)


#: the eval objective of each kind of output the fidelity check reads (quantkit.evaluation.task)
_OBJECTIVE_OF_TASK = {
    "class scores": "agreement",
    "class sequence": "position-agreement",
    "ctc sequence": "string-agreement",
    "detection head": "detection-f1",
    "probability per sample": "decision-agreement",
    "probability map": "mask-iou",
    "class maps": "mask-iou",
    "values": "cosine",
}
_WHAT = {
    "agreement": "argmax agreement with FP32",
    "position-agreement": "argmax agreement with FP32 at each position",
    "decision-agreement": "agreement with FP32 on which side of 0.5 each probability falls",
    "string-agreement": "share of greedy-decoded strings equal to FP32's",
    "detection-f1": "F1 of its detections against FP32's",
    "mask-iou": "IoU of its mask against FP32's",
    "cosine": "per-sample cosine similarity with FP32",
}


def _objective_from_shape(shape: list[int], shown: str, **params: Any) -> Objective:
    """Without FP32's values: a YOLO-style head by its shape, a map of 16 pixels or more, else cosine."""
    layout = detection_layout(shape)
    if layout is not None:
        return objective("detection-f1", reason=f"{shown} looks like a YOLO-style head ({layout}): F1 of its detections", **params)
    if len(shape) == 4 and min(shape[-2:]) >= 16:
        what = "a probability map" if shape[1] == 1 else "a per-class map"
        return objective("mask-iou", reason=f"{shown} is {what}: IoU of its mask against FP32's", **params)
    return objective("cosine", reason=f"{shown} has no recognised task structure: per-sample cosine similarity with FP32", **params)
