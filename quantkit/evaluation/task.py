"""What each model output is for, read from its shape and FP32's values, and whether a new model
still does that task: the gate's task rule, beside the SQNR floor (``quantkit.evaluation.check``).

SQNR alone misses collapses that matter: a CTC recogniser whose blank logit is clipped keeps 18 dB
while most strings change; a detector whose class scores collapse keeps 28 dB over the whole head
because the boxes dominate it. So each output is judged by the decision it feeds:

| output (FP32's values)                                       | kind             | measure                       |
|--------------------------------------------------------------|------------------|-------------------------------|
| [N, C]: probabilities, or logits with a clear winner         | class scores     | top-1 agreement per sample    |
| [N, T, C] the same per position                              | class sequence   | per-position agreement        |
|   ... with a blank class (0 or C-1) winning most positions   | CTC sequence     | greedy-decoded string agreement |
| [N, 4+C, A] / [N, A, 4+C]: pixel boxes, then scores in [0, 1] | detection head   | matched-box F1 (IoU 0.5)      |
| [N, K, 6]: x1, y1, x2, y2, score, class (NMS done in the graph) | detection head | matched-box F1 (IoU 0.5)      |
| [N] or [N, 1]: one probability per sample (a VAD, a binary classifier) | probability per sample | decision agreement at 0.5 |
| values in [0, 1] (a rounding above 1 included), spatial/time | probability map  | mask IoU at a threshold from FP32 |
| [N, C, H, W] whose channels compete (segmenter)              | class maps       | mean IoU of the argmax        |
| anything else (embeddings, features, regressions)            | values           | SQNR floor only               |

``TASK_FLOORS`` are the thresholds, one per measure: 0.8. A healthy INT8 or FP16 model agrees with
FP32 on far more than 80% of decisions (the demo's INT8: 99.9%; PP-OCRv4's detector, mask IoU 0.92);
the collapses this rule exists for sit far below it (CTC strings 12.5%, an audio model's note IoU
0.0, a detector's box F1 0.0, a DB detector's mask IoU 0.72). The eval report measures how good a
model is; the gate only refuses one that fails its task. The task rule applies to real samples
only: on synthetic inputs a healthy model's decisions are noise, and only SQNR is judged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from quantkit.evaluation.detection import decode_detections, detection_layout, final_detections, match_counts

#: the lowest task measure a model may have against FP32 and still pass the gate (see the module doc)
TASK_FLOORS = {
    "top-1 agreement": 0.8,
    "per-position agreement": 0.8,
    "string agreement": 0.8,
    "box F1": 0.8,
    "mask IoU": 0.8,
    "decision agreement": 0.8,
}
#: values above 1 by less than this are still probabilities (float rounding of a sigmoid or softmax)
UNIT_TOLERANCE = 1e-4
#: a class is CTC's blank when it wins at least this share of all positions
BLANK_SHARE = 0.3
#: CTC's symbols are spikes between blanks (Graves et al., ICML 2006; Zeyer et al., "Why does CTC result
#: in peaky behavior?", 2021): a symbol other than the blank holds for at most this many positions on
#: average (1.1 on three real recognisers here). A frame classifier's labels last (FunASR's FSMN VAD:
#: 5 frames on speech-like audio), and one label changed among 600 frames is not a misread string.
CTC_MAX_MEAN_RUN = 2.0
#: detection needs FP32 detections to compare with: its class-score threshold
DETECTION_CONF = 0.25


@dataclass(frozen=True)
class OutputTask:
    """What one output is, and why quantkit reads it so."""

    kind: str  # class scores, class sequence, ctc sequence, detection head, probability map, class maps, values
    measure: str  # the key of TASK_FLOORS, or "" (SQNR only)
    reason: str
    layout: str = ""  # detection: fields-first / anchors-first; sequences: batch-first / time-first
    blank: int = -1  # CTC's blank class
    threshold: float = 0.5  # probability maps: where the mask starts


@dataclass(frozen=True)
class TaskScore:
    task: OutputTask
    value: float  # the measure, in [0, 1]

    @property
    def floor(self) -> float:
        return TASK_FLOORS[self.task.measure]

    @property
    def ok(self) -> bool:
        return self.value >= self.floor

    def line(self) -> str:
        return f"{self.task.measure} {self.value:.1%} ({self.task.kind})"


def _in_unit(values: np.ndarray) -> bool:
    return values.size > 0 and float(values.min()) >= 0.0 and float(values.max()) <= 1.0 + UNIT_TOLERANCE


def _rows_normalized(values: np.ndarray) -> str:
    """ "probabilities" when the last axis sums to 1, "log-probabilities" when it log-sum-exps to 0, else ""."""
    if values.shape[-1] < 2:
        return ""
    if _in_unit(values) and np.allclose(values.sum(-1), 1.0, atol=1e-2):
        return "probabilities"
    if float(values.max()) <= UNIT_TOLERANCE:
        peak = values.max(-1, keepdims=True)
        if np.allclose(peak[..., 0] + np.log(np.exp(values - peak).sum(-1)), 0.0, atol=1e-2):
            return "log-probabilities"
    return ""


def _peaked(values: np.ndarray) -> bool:
    """Logits of a decision: the winner stands clear of the runner-up (median gap over a standard
    deviation of the row), as a classifier's do and an embedding's or a feature vector's do not
    (the largest of 512 normal values leads the next by about 0.3 standard deviations)."""
    rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
    top2 = np.sort(rows, axis=1)[:, -2:]
    spread = rows.std(axis=1)
    gap = (top2[:, 1] - top2[:, 0]) / np.where(spread > 0, spread, 1.0)
    return bool(np.median(gap) > 1.0)


def _detection(reference: np.ndarray) -> str:
    """The head's layout when FP32's values look like boxes in pixels followed by class scores in [0, 1]."""
    layout = detection_layout(reference.shape)
    if layout is None:
        return ""
    rows = reference.transpose(0, 2, 1) if layout == "fields-first" else reference
    boxes, scores = rows[..., :4], rows[..., 4:]
    if rows.shape[1] < 100 or not scores.size or not _in_unit(scores) or _rows_normalized(scores):
        return ""  # a few rows, or one distribution per row (a sequence's softmax), are no detection head
    pixels = float(boxes.max()) > 2.0 and float(np.mean(boxes >= 0)) > 0.95  # coordinates in pixels, not probabilities
    return layout if pixels else ""


def ctc_blank(classes: np.ndarray, count: int) -> int:
    """CTC's blank class: 0 or the last, when it wins at least ``BLANK_SHARE`` of all positions."""
    shares = np.bincount(classes.ravel(), minlength=count) / max(classes.size, 1)
    for candidate in (0, count - 1):
        if shares[candidate] >= BLANK_SHARE and shares[candidate] == shares.max():
            return candidate
    return -1


def _mean_run(classes: np.ndarray, blank: int) -> float:
    """How many positions in a row a class other than ``blank`` holds, on average ([N, T] argmax)."""
    change = np.ones(classes.shape, bool)
    change[:, 1:] = classes[:, 1:] != classes[:, :-1]
    runs = np.count_nonzero(change & (classes != blank))
    return float(np.count_nonzero(classes != blank)) / runs if runs else 0.0


def _sequence_task(reference: np.ndarray, batch: int | None) -> OutputTask | None:
    """[N, T, C] (or [T, N, C]) class scores over positions, and CTC when a blank is evident."""
    normalized = _rows_normalized(reference)
    if not normalized and _in_unit(reference):
        return None  # independent probabilities per class (multi-label): a probability map
    if not normalized and not _peaked(reference):
        return None  # hidden states or features over positions: judged by SQNR
    layout = "time-first" if batch is not None and reference.shape[0] != batch and reference.shape[1] == batch else "batch-first"
    classes = reference.argmax(-1)
    if layout == "time-first":
        classes = classes.T
    blank = ctc_blank(classes, reference.shape[-1])
    what = normalized or "logits"
    shape = list(reference.shape)
    reason = f"{shape}: {what} over {shape[-1]} classes per position"
    if blank >= 0 and (run := _mean_run(classes, blank)) <= CTC_MAX_MEAN_RUN:
        return OutputTask("ctc sequence", "string agreement", f"{reason}, class {blank} (blank) wins most positions", layout, blank)
    if blank >= 0:
        reason += f"; class {blank} wins most, but the others hold for {run:.1f} positions on average: frame labels, not CTC's spikes"
    return OutputTask("class sequence", "per-position agreement", reason, layout)


#: name parts that mark the two ends of a state carried from one call to the next (in_cache0 -> out_cache0,
#: cache_0 -> next_cache_0, past_key_values.0.key -> present.0.key)
_STATE_AFFIXES = frozenset({"in", "out", "next", "new", "prev", "last", "past", "present", "updated", "input", "output"})


Dims = Sequence[int | str | None]


def _state_key(name: str) -> str:
    return "".join(t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _STATE_AFFIXES)


def _same_shape(a: Dims, b: Dims) -> bool:
    return len(a) == len(b) and all(not isinstance(x, int) or not isinstance(y, int) or x == y for x, y in zip(a, b, strict=True))


def recurrent_states(inputs: Mapping[str, Dims], outputs: Mapping[str, Dims | None]) -> set[str]:
    """The outputs that carry a state into the model's next call (a streaming VAD's caches, an RNN's
    hidden state, a decoder's key/value cache): named after an input (see ``_STATE_AFFIXES``; one
    name may contain the other: state -> stateN), of its rank and fixed sizes. A state is no decision:
    it is judged by SQNR, and the task by the outputs it feeds. ``outputs``' shape None: not known."""
    found = set()
    for out, out_shape in outputs.items():
        key = _state_key(out)
        for name, shape in inputs.items():
            other = _state_key(name)
            related = key == other or (min(len(key), len(other)) >= 4 and (other in key or key in other))
            if related and (not out_shape or _same_shape(out_shape, shape)):
                found.add(out)
    return found


def _map_threshold(reference: np.ndarray) -> float:
    """Halfway between FP32's median and its largest value: 0.5 for a map of near-0 background and
    near-1 objects, lower for a sparse map whose peaks stay below 1 (an audio model's note activations)."""
    return float((np.median(reference) + reference.max()) / 2)


def infer_task(reference: np.ndarray, batch: int | None = None) -> OutputTask:
    """What an output is for, from its shape and FP32's values on real samples (see the module doc)."""
    ref = np.asarray(reference)
    shape = list(ref.shape)
    if ref.dtype.kind == "f" and ref.ndim >= 1 and len(ref) > 1 and ref.size == len(ref) and _in_unit(ref) and np.ptp(ref) > 0:
        reason = f"{shape}: one probability per sample (a VAD's speech, a binary classifier's positive class)"
        return OutputTask("probability per sample", "decision agreement", reason, threshold=0.5)
    if ref.dtype.kind != "f" or ref.ndim < 2 or ref.size == 0 or not np.all(np.isfinite(ref)):
        return OutputTask("values", "", f"{shape}: not a float map of finite values")
    squeezed = [d for d in shape[1:] if d != 1]
    if len(squeezed) == 1 and squeezed[0] > 1 and (_rows_normalized(ref.reshape(len(ref), -1)) or _peaked(ref.reshape(len(ref), -1))):
        return OutputTask("class scores", "top-1 agreement", f"{shape}: one score per class and sample, one class standing out")
    if final_detections(ref):
        return OutputTask("detection head", "box F1", f"{shape}: final detections (x1, y1, x2, y2, score, class)", "final")
    if ref.ndim == 3 and (layout := _detection(ref)):
        return OutputTask("detection head", "box F1", f"{shape}: boxes in pixels, then class scores in [0, 1]", layout)
    if ref.ndim == 3 and shape[-1] > 1 and (task := _sequence_task(ref, batch)):
        return task
    if _in_unit(ref) and max(squeezed or [0]) >= 8 and np.ptp(ref) > 0:
        return OutputTask("probability map", "mask IoU", f"{shape}: values in [0, 1] over positions", threshold=_map_threshold(ref))
    if ref.ndim == 4 and 2 <= shape[1] <= 256 and _channels_compete(ref):
        return OutputTask("class maps", "mask IoU", f"{shape}: channels compete at each pixel (a segmenter)")
    return OutputTask("values", "", f"{shape}: no decision structure found (features, embeddings or regressions)")


def _channels_compete(reference: np.ndarray) -> bool:
    probs = np.exp(reference - reference.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return float(np.mean(probs.max(axis=1))) > 0.5


def ctc_strings(scores: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Greedy CTC decoding: the argmax per position, repeats merged, blanks dropped."""
    out = []
    for row in scores.argmax(-1):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(c) for c in row[keep] if c != blank))
    return out


def _box_f1(got: np.ndarray, ref: np.ndarray) -> float:
    final = final_detections(ref)
    found, truth = decode_detections(got, DETECTION_CONF, final=final), decode_detections(ref, DETECTION_CONF, final=final)
    tp = fp = fn = 0
    for f, t in zip(found, truth, strict=True):
        a, b, c = match_counts(f, t)
        tp, fp, fn = tp + a, fp + b, fn + c
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _mask_iou(got: np.ndarray, ref: np.ndarray, task: OutputTask) -> float:
    if task.kind == "class maps":
        pred, truth = got.argmax(1), ref.argmax(1)
        inter = float(np.sum(pred == truth))
        return inter / (2 * pred.size - inter)
    pred, truth = got > task.threshold, ref > task.threshold
    union = float(np.sum(pred | truth))
    return 1.0 if union == 0 else float(np.sum(pred & truth)) / union


def score_task(task: OutputTask, reference: np.ndarray, candidate: np.ndarray) -> TaskScore | None:
    """The candidate's task measure against FP32's (None for outputs judged by SQNR alone)."""
    if not task.measure or reference.shape != candidate.shape:
        return None
    got = np.nan_to_num(np.asarray(candidate, np.float64), nan=0.0)
    ref = np.asarray(reference, np.float64)
    if task.kind in ("class sequence", "ctc sequence") and task.layout == "time-first":
        got, ref = got.transpose(1, 0, 2), ref.transpose(1, 0, 2)
    if task.measure == "top-1 agreement":
        value = float(np.mean(got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)))
    elif task.measure == "per-position agreement":
        value = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    elif task.measure == "string agreement":
        value = float(np.mean([a == b for a, b in zip(ctc_strings(got, task.blank), ctc_strings(ref, task.blank), strict=True)]))
    elif task.measure == "decision agreement":
        value = float(np.mean((got > task.threshold) == (ref > task.threshold)))
    elif task.measure == "box F1":
        value = _box_f1(got, ref)
    else:
        value = _mask_iou(got, ref, task)
    return TaskScore(task, value)
