"""YOLO-style detection heads: their layout, their decoding (class-aware NMS) and box matching.

The eval objective ``detection-f1`` and the fidelity check's task rule both read heads with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantkit.errors import QuantkitError

MATCH_IOU = 0.5


def detection_layout(shape: Sequence[int]) -> str | None:
    """ "fields-first" ([N, 4+C, A]), "anchors-first" ([N, A, 4+C]) or None for a YOLO-style head shape."""
    if len(shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
        return None
    a, b = shape[1], shape[2]
    fields, anchors = min(a, b), max(a, b)
    if fields < 5 or fields > 4 + 1000 or anchors < 4 * fields or anchors < 256:
        return None
    return "fields-first" if a == fields else "anchors-first"


def final_detections(values: np.ndarray) -> bool:
    """Whether ``values`` (FP32's) are [N, K, 6] rows of x1, y1, x2, y2, score, class, as an NMS-free
    head (YOLOv10, DocLayout-YOLO, RT-DETR exports) or an NMS inside the graph writes them: scores in
    [0, 1], whole class ids, and boxes in pixels with x2 >= x1 and y2 >= y1 where the score is not 0."""
    if values.ndim != 3 or values.shape[-1] != 6 or values.size == 0 or values.dtype.kind != "f":
        return False
    rows = values.reshape(-1, 6).astype(np.float64)
    score, cls = rows[:, 4], rows[:, 5]
    if not np.all(np.isfinite(rows)) or score.min() < 0 or score.max() > 1 + 1e-4 or cls.min() < 0 or np.any(cls != np.round(cls)):
        return False
    kept = rows[score > 0]  # zero rows pad a fixed-size output
    if not len(kept):
        return False
    ordered = float(np.mean((kept[:, 2] >= kept[:, 0]) & (kept[:, 3] >= kept[:, 1])))
    return ordered > 0.95 and float(np.abs(kept[:, :4]).max()) > 2.0


def decode_detections(
    head: np.ndarray, conf: float, iou: float = 0.7, max_det: int = 300, max_candidates: int = 3000, final: bool = False
) -> list[np.ndarray]:
    """Per sample, [M, 6] rows of x1, y1, x2, y2, score, class after class-aware NMS over the
    ``max_candidates`` best-scoring anchors (a low ``conf`` must not make NMS quadratic in 20k anchors).
    ``final``: the head already holds such rows (``final_detections`` of FP32's): those at ``conf`` or above."""
    if final:
        return [sample[sample[:, 4] >= conf] for sample in np.asarray(head, np.float64)]
    layout = detection_layout(head.shape)
    if layout is None:
        raise QuantkitError(f"detection-f1 needs a YOLO-style head [N, 4+C, A] or [N, A, 4+C], got shape {list(head.shape)}")
    rows = head.transpose(0, 2, 1) if layout == "fields-first" else head
    found = []
    for sample in rows.astype(np.float64):
        cls_scores = sample[:, 4:]
        cls = cls_scores.argmax(1)
        score = cls_scores[np.arange(len(cls)), cls]
        keep = np.flatnonzero(score >= conf)
        keep = keep[np.argsort(-score[keep], kind="stable")[:max_candidates]]
        box, score, cls = sample[keep, :4], score[keep], cls[keep]
        xyxy = np.stack([box[:, 0] - box[:, 2] / 2, box[:, 1] - box[:, 3] / 2, box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2], 1)
        picked = _nms(xyxy, score, cls, iou)[:max_det]
        found.append(np.concatenate([xyxy[picked], score[picked, None], cls[picked, None].astype(np.float64)], axis=1))
    return found


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:4] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:4] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy class-aware NMS; ties in score keep the earlier anchor (a stable order)."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(order), bool)
    for rank, i in enumerate(order):
        if suppressed[rank]:
            continue
        kept.append(int(i))
        rest = order[rank + 1 :]
        same = classes[rest] == classes[i]
        overlap = _box_iou(boxes[i : i + 1], boxes[rest])[0] > iou
        suppressed[rank + 1 :] |= same & overlap
    return np.array(kept, dtype=np.int64)


def match_counts(found: np.ndarray, truth: np.ndarray, iou: float = MATCH_IOU) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives): greedy by score, same class, IoU >= ``iou``."""
    if len(found) == 0 or len(truth) == 0:
        return 0, len(found), len(truth)
    overlaps = _box_iou(found[:, :4], truth[:, :4])
    overlaps[found[:, 5][:, None] != truth[:, 5][None, :]] = 0.0
    taken = np.zeros(len(truth), bool)
    tp = 0
    for i in np.argsort(-found[:, 4], kind="stable"):
        candidates = np.where(~taken & (overlaps[i] >= iou))[0]
        if len(candidates):
            taken[candidates[np.argmax(overlaps[i, candidates])]] = True
            tp += 1
    return tp, len(found) - tp, len(truth) - tp
