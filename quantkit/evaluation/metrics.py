"""Accuracy metrics: task metrics over labels, and fidelity of a variant's outputs against FP32.

Fidelity is computed per output and, because a whole-tensor figure can hide a total failure (a
detector output that concatenates box coordinates with class scores keeps a good overall SQNR
while every score is zeroed), also per slice along a channel axis. A slice collapses when its
SQNR drops below ``COLLAPSE_SQNR_DB``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from quantkit.options import MIN_SQNR_DB

#: a slice below this has collapsed: the fidelity check's own floor, so the report and the check agree
COLLAPSE_SQNR_DB = MIN_SQNR_DB
MAX_AUTO_SLICES = 256

Metric = Callable[[list[np.ndarray], Sequence], float]  # (outputs of every sample batch concatenated, labels) -> value


def top_k(k: int) -> Metric:
    """Fraction of samples whose label is among the k highest scores of the first output
    (the ``top1``/``top5`` objectives as a plain ``(outputs, labels)`` function)."""
    from quantkit.evaluation.objectives import objective

    top = objective(f"top{k}")

    def metric(outputs: list[np.ndarray], labels: Sequence) -> float:
        return top.measure(outputs, outputs, labels).value

    metric.__name__ = f"top{k}"
    return metric


METRICS: dict[str, Metric] = {"top1": top_k(1), "top5": top_k(5)}


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """10 log10(signal power / noise power); +inf when identical, -inf when the reference is all zero or a value is not finite."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((value.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or not math.isfinite(noise) or not math.isfinite(signal):
        return -math.inf  # all-zero reference, or non-finite values (an FP16 overflow): no signal left to measure
    return 10.0 * math.log10(signal / noise)


def cosine(reference: np.ndarray, value: np.ndarray) -> float:
    a, b = reference.astype(np.float64).ravel(), value.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    if not (math.isfinite(na) and math.isfinite(nb)):
        return 0.0  # non-finite values (an FP16 overflow): nothing left to compare
    return float(np.dot(a, b) / (na * nb))


def top1_agreement(reference: np.ndarray, value: np.ndarray) -> float:
    """Share of samples (rows along axis 0) whose argmax over the rest agrees."""
    n = reference.shape[0]
    return float(np.mean(reference.reshape(n, -1).argmax(1) == value.reshape(n, -1).argmax(1)))


@dataclass
class SliceFidelity:
    axis: int
    start: int
    stop: int
    sqnr_db: float

    @property
    def collapsed(self) -> bool:
        return self.sqnr_db < COLLAPSE_SQNR_DB

    def label(self) -> str:
        return f"[{self.start}]" if self.stop == self.start + 1 else f"[{self.start}:{self.stop}]"


@dataclass
class OutputFidelity:
    output: str
    top1_agreement: float
    cosine: float
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    slices: list[SliceFidelity]

    @property
    def collapsed_slices(self) -> list[SliceFidelity]:
        return [s for s in self.slices if s.collapsed]


def fidelity(name: str, reference: np.ndarray, value: np.ndarray, slices: Sequence[tuple[int, int, int]] | None = None) -> OutputFidelity:
    """Fidelity of ``value`` against ``reference`` (same shape), with per-slice SQNR.

    ``slices``: (axis, start, stop) ranges to check. Default: every index along axis 1 when the
    output has one of at most ``MAX_AUTO_SLICES`` entries (channels, classes, box fields).
    """
    if reference.shape != value.shape:
        raise ValueError(f"output {name}: shapes differ ({reference.shape} vs {value.shape})")
    diff = np.abs(value.astype(np.float64) - reference.astype(np.float64))
    if slices is None:
        slices = (
            [(1, i, i + 1) for i in range(reference.shape[1])] if reference.ndim >= 2 and 1 < reference.shape[1] <= MAX_AUTO_SLICES else []
        )
    per_slice = []
    for axis, start, stop in slices:
        index = [slice(None)] * reference.ndim
        index[axis] = slice(start, stop)
        per_slice.append(SliceFidelity(axis, start, stop, sqnr_db(reference[tuple(index)], value[tuple(index)])))
    return OutputFidelity(
        output=name,
        top1_agreement=top1_agreement(reference, value) if reference.ndim >= 1 and reference.size else 1.0,
        cosine=cosine(reference, value),
        sqnr_db=sqnr_db(reference, value),
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        slices=per_slice,
    )
