"""Batching samples into model feeds, checking every sample against the model's inputs first."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.model import InputSpec, ModelInfo

from .sources import Sample


@dataclass
class Batch:
    """Stacked inputs of consecutive samples, with their ids (for error messages) and labels."""

    ids: list[str]
    feeds: dict[str, np.ndarray]
    labels: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _multiple(size: int, stride: int) -> int:
    return max(stride, round(size / stride) * stride)


def check_sample(sample: Sample, inputs: tuple[InputSpec, ...]) -> dict[str, np.ndarray]:
    """Return the sample's arrays cast to the model dtypes, or raise a one-line error naming it."""
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in sample.feeds:
            have = ", ".join(sample.feeds) or "nothing"
            raise QuantkitError(f"sample {sample.id} has no data for model input '{spec.name}' (it has {have})")
        arr = np.asarray(sample.feeds[spec.name])
        want = spec.sample_shape
        if arr.ndim != len(want):
            raise QuantkitError(
                f"sample {sample.id}: input '{spec.name}' has shape {_dims(arr.shape)} but model input "
                f"{spec.describe()} takes {len(want)}-d samples; check the data layout and preprocessing",
                option="layout",
            )
        for axis, (got, need) in enumerate(zip(arr.shape, want, strict=True), start=1):
            if isinstance(need, int) and got != need:
                what = (
                    "channels" if len(spec.shape) == 4 and ((axis == 1 and want[0] in (1, 3)) or axis == 3) and need in (1, 3) else "size"
                )
                hint, options = (
                    ("; set the color to L for 1 channel or RGB for 3", ("color",))
                    if what == "channels"
                    else ("; resize or crop to the model's size, or check the layout", ("resize", "center_crop", "layout"))
                )
                raise QuantkitError(
                    f"sample {sample.id}: input '{spec.name}' has shape {_dims(arr.shape)} but the model expects "
                    f"{spec.describe()}: {what} mismatch at axis {axis}, {got} vs {need}{hint}",
                    option=options,
                )
        if spec.stride > 1 and len(spec.shape) == 4:
            nhwc = spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3)
            h, w = arr.shape[0:2] if nhwc else arr.shape[1:3]
            if h % spec.stride or w % spec.stride:
                raise QuantkitError(
                    f"sample {sample.id}: input '{spec.name}' is {h}x{w}, but the model's height and width must be multiples of "
                    f"{spec.stride} (its feature pyramid joins maps down to 1/{spec.stride}): resize to a multiple, e.g. "
                    f"{_multiple(h, spec.stride)}x{_multiple(w, spec.stride)}, letterboxed to keep the aspect ratio",
                    option=("resize", "letterbox"),
                )
        if spec.is_float:
            if arr.dtype.kind not in "f":
                raise QuantkitError(
                    f"sample {sample.id}: input '{spec.name}' is {arr.dtype} but the model expects {spec.dtype}; "
                    "store float data or feed images through the preprocessing options"
                )
            arr = arr.astype(spec.dtype, copy=False)
            if not np.isfinite(arr).all():
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                raise QuantkitError(f"sample {sample.id}: input '{spec.name}' holds {bad} NaN/Inf value(s); fix or drop this sample")
        elif spec.dtype.kind in "iub":
            if arr.dtype.kind not in "iub":
                raise QuantkitError(f"sample {sample.id}: input '{spec.name}' is {arr.dtype} but the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype, copy=False)
        out[spec.name] = arr
    return out


def fixed_batch(model: ModelInfo) -> int | None:
    """The batch size every batched input fixes, if they all fix the same one."""
    sizes = {i.shape[i.batch_axis] for i in model.inputs if i.batch_axis is not None}
    return sizes.pop() if len(sizes) == 1 and all(isinstance(s, int) for s in sizes) else None


def _stack(model: ModelInfo, arrays: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Samples as one feed: stacked along each input's batch axis; a shared input once."""
    feeds = {}
    for spec in model.inputs:
        values = [a[spec.name] for a in arrays]
        feeds[spec.name] = values[0] if spec.batch_axis is None else np.stack(values, axis=spec.batch_axis)
    return feeds


def first_sample(model: ModelInfo, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's first sample as a feed of its own: each batched input cut to one along its batch
    axis; a shared input (a sample rate, a fixed-shape input) as it is."""
    out = {}
    for spec in model.inputs:
        value = feeds[spec.name]
        out[spec.name] = value if spec.batch_axis is None else np.take(value, [0], axis=spec.batch_axis)
    return out


def join_outputs(parts: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Per-run outputs as one array, joined along each run's batch axis: axis 0, or axis 1 for a
    time-first output ([T, N, C]) or a state batched on axis 1 ([layers, N, hidden], an RNN's)
    whose axis 0 is not the run's sample count. ``sizes``: the samples of each run."""
    if not parts[0].ndim:
        return np.stack(parts)
    first = parts[0]
    axis = 1 if first.shape[0] != sizes[0] and first.ndim > 1 and first.shape[1] == sizes[0] else 0
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _joins(model: ModelInfo, arrays: dict[str, np.ndarray], first: dict[str, np.ndarray]) -> bool:
    """Whether a sample can join a batch: equal shapes, and equal values of every shared input."""
    for spec in model.inputs:
        a, b = arrays[spec.name], first[spec.name]
        if a.shape != b.shape or (spec.batch_axis is None and not np.array_equal(a, b)):
            return False
    return True


def batches(
    samples: Iterable[Sample],
    model: ModelInfo,
    batch_size: int = 32,
    num_samples: int | None = None,
    source_name: str = "the data",
    warnings: list[str] | None = None,
) -> Iterator[Batch]:
    """Yield batches of up to ``batch_size`` samples; samples of another shape start a new batch.

    Raises when fewer than ``num_samples`` samples exist (after yielding what there was, so the
    caller must not write results before the generator is exhausted).
    """
    if batch_size < 1:
        raise QuantkitError(f"batch_size must be at least 1, got {batch_size}", option="batch_size")
    if num_samples is not None and num_samples < 1:
        raise QuantkitError(f"num_samples must be at least 1, got {num_samples}", option="num_samples")
    fixed = fixed_batch(model)
    if fixed is not None and fixed != batch_size:
        raise QuantkitError(f"model {model.path} has a fixed batch size of {fixed}; use batch size {fixed}", option="batch_size")

    pending: list[tuple[Sample, dict[str, np.ndarray]]] = []
    seen = 0

    def flush() -> Batch:
        batch = Batch([s.id for s, _ in pending], _stack(model, [a for _, a in pending]), [s.label for s, _ in pending])
        pending.clear()
        return batch

    for sample in samples:
        if num_samples is not None and seen >= num_samples:
            break
        arrays = check_sample(sample, model.inputs)
        if pending and not _joins(model, arrays, pending[0][1]):
            if fixed is not None:
                raise QuantkitError(
                    f"sample {sample.id} has another shape than the samples before it; the model's fixed batch needs equal shapes"
                )
            yield flush()
        pending.append((sample, arrays))
        seen += 1
        if len(pending) == batch_size:
            yield flush()
    if pending:
        if fixed is not None and len(pending) != fixed:
            if warnings is not None:
                warnings.append(f"dropped the last {len(pending)} sample(s): the model's fixed batch size is {fixed}")
            pending.clear()
        else:
            yield flush()
    if num_samples is not None and seen < num_samples:
        raise QuantkitError(
            f"{source_name} has only {seen} sample(s) but {num_samples} were asked; ask for fewer, or leave the number out to use all",
            option="num_samples",
        )
    if seen == 0:
        raise QuantkitError(f"{source_name} yielded no samples")
