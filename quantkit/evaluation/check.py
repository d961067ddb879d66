"""The fidelity check: a new model against FP32 on a few samples, before anything is written.

``quantize``, ``fp16``, ``optimize`` and cache migration run it before they write a model, and
refuse (exit 3, nothing written) when an output is non-finite or has collapsed, unless forced.
``eval`` and ``tune`` judge their variants with the same rule (``judge_outputs``).

An output fails when it is non-finite where FP32 is finite, constant where FP32's is not (all
zeros included), below ``MIN_SQNR_DB`` of SQNR against FP32, or, on real samples, when it no
longer does its task: each output's task (class scores, a CTC sequence, a detection head, a
probability map, ...) is read from its shape and FP32's values, and judged by the decision it
feeds, against ``TASK_FLOORS`` (``quantkit.evaluation.task``; its docstring gives the rules). The default, 4 dB, is far below any healthy
INT8 or FP16 model (real detectors' score maps sit at 8 dB and more, classifiers at 20-40 dB)
and far above the collapses seen on real models (a pooled tensor clipped to its minimum gave
0.9 dB; an FP16 detector whose BatchNorm variance overflowed gave all zeros).

A transformer's padding positions are left out: where the samples carry a 2-D attention mask
(an input named ``attention_mask``, ``input_mask`` or ``padding_mask``), outputs laid out as
[batch, sequence, ...] are judged on the real tokens only. Nothing reads the outputs at padding,
and they dominate short texts (76% of the tokens of scikit-learn's docstring sentences padded to
64): counted, they put a healthy INT8 encoder at 4.7 dB where its real tokens are at 18.7 dB.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantkit.backends.ort import make_session, with_outputs
from quantkit.data.batching import batches, fixed_batch, join_outputs
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import open_source
from quantkit.errors import QuantkitError
from quantkit.evaluation.metrics import cosine, sqnr_db
from quantkit.evaluation.task import TaskScore, infer_task, recurrent_states, score_task
from quantkit.model import ModelInfo, value_shape
from quantkit.options import CHECK_SAMPLES, MIN_SQNR_DB, CheckOptions, given
from quantkit.ranges import RangeSet

#: a transformer's padding-mask input (1 at real tokens, 0 at padding)
_MASK_INPUT = re.compile(r"(^|[^a-z])(attention_mask|input_mask|padding_mask)$", re.IGNORECASE)


def token_positions(feeds: Sequence[dict[str, np.ndarray]]) -> np.ndarray | None:
    """[samples, sequence] booleans, True at real tokens, from the feeds' 2-D attention-mask input
    (integer, boolean, or float 0/1); None when the samples have none."""
    if not feeds:
        return None
    for name in feeds[0]:
        if not _MASK_INPUT.search(name):
            continue
        values = [np.asarray(f.get(name)) for f in feeds]
        if all(v.ndim == 2 and (v.dtype.kind in "biu" or (v.dtype.kind == "f" and np.isin(v, (0, 1)).all())) for v in values):
            return np.concatenate([v != 0 for v in values])
    return None


def zero_padding(value: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """``value`` with its padding positions set to 0, when it is laid out as [batch, sequence, ...]
    like the mask: every metric then counts the real tokens only (zeros add no error and no energy,
    and leave a per-sample cosine unchanged)."""
    if tokens is None or value.ndim < 2 or value.shape[:2] != tokens.shape or value.dtype.kind != "f":
        return value
    return np.where(tokens.reshape(tokens.shape + (1,) * (value.ndim - 2)), value, 0).astype(value.dtype)


def _real_tokens(value: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """``value`` at the real tokens, when it is laid out as [batch, sequence, ...] like the mask."""
    if tokens is None or value.ndim < 2 or value.shape[:2] != tokens.shape or not tokens.any():
        return value
    return value[tokens]


#: where the check's samples came from when no data was given and none was recorded
SYNTHETIC = "synthetic inputs (pass data for a real check)"


class FidelityError(QuantkitError):
    """The new model's outputs are non-finite or collapsed: nothing was written."""

    exit_code = 3

    def __init__(self, message: str, *, check: Any = None) -> None:
        super().__init__(message, option="force" if check is not None else None)
        self.check = check  # the FidelityCheck that refused the model, when there was one


@dataclass
class OutputCheck:
    name: str
    sqnr_db: float
    cosine: float
    problem: str = ""  # "" when healthy
    task: TaskScore | None = None  # the output's task measure (real samples only)

    def line(self) -> str:
        sqnr = "inf" if math.isinf(self.sqnr_db) and self.sqnr_db > 0 else f"{self.sqnr_db:.1f}"
        task = f", {self.task.line()}" if self.task is not None else ""
        return f"{self.name}: SQNR {sqnr} dB, cosine {self.cosine:.4f}{task}" + (f" -- {self.problem}" if self.problem else "")


@dataclass
class FidelityCheck:
    outputs: list[OutputCheck] = field(default_factory=list)
    samples: int = 0
    source: str = ""  # where the samples came from
    min_sqnr_db: float = MIN_SQNR_DB

    @property
    def ok(self) -> bool:
        return all(not o.problem for o in self.outputs)

    def summary(self) -> str:
        head = f"fidelity vs FP32 on {self.samples} sample(s) from {self.source}:"
        return "\n".join([head, *(f"  {o.line()}" for o in self.outputs)])

    def failure(self) -> str:
        bad = [o for o in self.outputs if o.problem]
        shown = "; ".join(f"output {o.name} {o.problem}" for o in bad[:3])
        return f"{shown} (on {self.samples} sample(s) from {self.source})"


def graph_states(model: onnx.ModelProto) -> set[str]:
    """``recurrent_states`` of a model, from its graph's declared inputs and outputs."""
    weights = {i.name for i in model.graph.initializer}
    inputs = {vi.name: value_shape(vi) for vi in model.graph.input if vi.name not in weights}
    outputs = {vi.name: value_shape(vi) if vi.type.tensor_type.HasField("shape") else None for vi in model.graph.output}
    return recurrent_states(inputs, outputs)


def judge_outputs(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    min_sqnr_db: float = MIN_SQNR_DB,
    tokens: np.ndarray | None = None,
    *,
    real: bool = True,
    states: Collection[str] = (),
) -> list[OutputCheck]:
    """Per output: SQNR, cosine, the task measure, and what is wrong with it, if anything.

    ``tokens`` (from ``token_positions``) leaves a transformer's padding positions out. ``real``:
    the samples are real data, so each output's task is judged too (``quantkit.evaluation.task``);
    on synthetic inputs only the SQNR floor applies. ``states`` (``recurrent_states``): outputs
    that only feed the next call, judged by SQNR alone."""
    checks = []
    for name, ref, got in zip(names, reference, outputs, strict=True):
        ref, got = np.asarray(ref), np.asarray(got)
        check = _judge_values(name, ref, got, min_sqnr_db, tokens)
        # the task is measured on a collapsed output too: choosing among failed candidates ranks by it
        if real and tokens is None and ref.shape == got.shape and name not in states:
            check.task = score_task(infer_task(ref, len(ref)), ref, got)
            if check.task is not None and not check.task.ok and not check.problem:
                check.problem = f"fails its task: {check.task.line()} < {check.task.floor:.0%}"
        checks.append(check)
    return checks


def _judge_values(name: str, ref: np.ndarray, got: np.ndarray, min_sqnr_db: float, tokens: np.ndarray | None) -> OutputCheck:
    """Non-finite values, a constant output, the SQNR floor; integer outputs must match exactly."""
    if ref.shape == got.shape:
        ref, got = _real_tokens(ref, tokens), _real_tokens(got, tokens)
    if ref.dtype.kind != "f":  # integer outputs (indices, counts) must match exactly
        same = ref.shape == got.shape and np.array_equal(ref, got)
        return OutputCheck(name, math.inf if same else -math.inf, 1.0 if same else 0.0, "" if same else "differs (integer output)")
    problem = ""
    ref_ok = np.isfinite(ref)
    if np.any(~np.isfinite(got) & ref_ok):
        problem = f"has {int(np.count_nonzero(~np.isfinite(got) & ref_ok))} non-finite value(s) where FP32 is finite"
    r, g = np.where(ref_ok, ref, 0), np.where(ref_ok & np.isfinite(got), got, 0)
    s, c = sqnr_db(r, g), cosine(r, g)
    if not problem:
        if ref.size > 1 and np.ptp(g) == 0 and np.ptp(r) > 0:
            problem = "is constant" + (" (all zeros)" if not np.any(g) else "") + " where FP32 varies"
        elif s < min_sqnr_db:
            problem = f"collapsed: SQNR {s:.1f} dB < {min_sqnr_db:g} dB"
    return OutputCheck(name, s, c, problem)


def float16_tensors(model: onnx.ModelProto) -> list[str]:
    """Node outputs typed float16: where a value beyond 65504 would become inf."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort
        return []
    typed = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    return [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o in typed]


def check_fidelity(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    source: str = "the data",
    min_sqnr_db: float = MIN_SQNR_DB,
    real: bool = True,
) -> FidelityCheck:
    """Run both models on ``feeds`` and judge each output of ``candidate`` against ``reference``
    (``real``: the feeds are real data, so each output's task is judged too).

    In a float16 model the intermediate float16 tensors are watched too: onnxruntime's CPU
    provider computes ops without float16 kernels in float32, so an overflow inside the graph
    need not reach the outputs here, while it does on a GPU.
    """
    if not feeds or not math.isfinite(min_sqnr_db):
        raise QuantkitError("the fidelity check needs at least one sample and a finite SQNR threshold", option="check_samples")
    names = [o.name for o in reference.graph.output]
    new_names = [o.name for o in candidate.graph.output]
    if new_names != names:
        raise FidelityError(f"the new model's outputs {new_names} differ from the original's {names}")
    watched = [t for t in float16_tensors(candidate) if t not in names]
    known = {o for n in reference.graph.node for o in n.output}
    # without onnxruntime's arena: the session would keep its largest run's memory (every watched
    # float16 tensor of a detector) for the rest of the check
    ref_session = make_session(reference)
    new_session = make_session(with_outputs(candidate, watched), source="the new model", arena=not watched)
    ref_values, new_values, suspects = _run_pair(ref_session, new_session, names, watched, feeds)
    overflows = _confirmed_overflows(reference, [t for t in suspects if t in known], suspects)
    count = sum(len(next(iter(f.values()))) for f in feeds) if feeds else 0
    tokens = token_positions(feeds)
    if tokens is not None:
        source = f"{source}, at the {int(tokens.sum())} real tokens (padding left out)"
    result = FidelityCheck(
        judge_outputs(names, ref_values, new_values, min_sqnr_db, tokens, real=real, states=graph_states(reference)),
        count,
        source,
        min_sqnr_db,
    )
    for name, bad in overflows.items():
        result.outputs.append(OutputCheck(name, -math.inf, 0.0, f"(inside the graph) overflows float16: {bad} inf/NaN"))
    return result


def _dynamic_batch(session: Any) -> bool:
    """Whether every input's axis 0 is free (a fixed-batch model must be run on whole batches)."""
    return all(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())


def _split(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A batch as single samples (inputs without a batch of their own, such as scalars, go with each)."""
    n = next((len(v) for v in feed.values() if v.ndim), 1)
    if any(v.ndim == 0 or len(v) != n for v in feed.values()):
        return [feed]
    return [{k: v[i : i + 1] for k, v in feed.items()} for i in range(n)]


def _run_pair(
    ref_session: Any, new_session: Any, names: list[str], watched: list[str], feeds: Sequence[dict[str, np.ndarray]]
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]]]:
    """Both models' outputs on ``feeds``, and the watched float16 tensors that held a non-finite
    value, with the runs that showed it. Watched tensors are looked at run by run, one sample at a
    time, and dropped: kept for 32 samples, every intermediate tensor of a 480x480 detector
    outgrew 24 GB; and FP32's copies are computed only for the suspects (``_confirmed_overflows``)."""
    ref_out: list[list[np.ndarray]] = [[] for _ in names]
    new_out: list[list[np.ndarray]] = [[] for _ in names]
    suspects: dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]] = {}
    runs = [part for f in feeds for part in (_split(f) if watched and _dynamic_batch(ref_session) else [f])]
    sizes = [len(next(iter(f.values()))) if next(iter(f.values())).ndim else 1 for f in runs]
    for feed in runs:
        ref = ref_session.run(names, feed)
        new = new_session.run(names + watched, feed)
        for k in range(len(names)):
            ref_out[k].append(np.asarray(ref[k]))
            new_out[k].append(np.asarray(new[k]))
        for name, value in zip(watched, new[len(names) :], strict=True):
            bad = ~np.isfinite(value)
            if np.any(bad):
                suspects.setdefault(name, []).append((feed, bad))
        del new
    return [join_outputs(p, sizes) for p in ref_out], [join_outputs(p, sizes) for p in new_out], suspects


def _confirmed_overflows(
    reference: onnx.ModelProto, known: list[str], suspects: dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]]
) -> dict[str, int]:
    """Per suspect tensor, its non-finite values where FP32's value is finite (an overflow, not NaN FP32 has too)."""
    if not suspects:
        return {}
    ref_session = make_session(with_outputs(reference, known), arena=False) if known else None
    out = {}
    for name, runs in suspects.items():
        bad = 0
        for feed, mask in runs:
            if ref_session is not None and name in known:
                mask = mask & np.isfinite(ref_session.run([name], feed)[0])
            bad += int(np.count_nonzero(mask))
        if bad:
            out[name] = bad
    return out


def data_or_recorded(
    data: str | Path | None, preprocess: PreprocessSpec | None, ranges: RangeSet | None
) -> tuple[str | Path | None, PreprocessSpec | None]:
    """``data``, or else the calibration data ``ranges`` records (with its preprocessing) when it is still there."""
    if data is not None or ranges is None:
        return data, preprocess
    recorded = ranges.calibration.get("data")
    if not recorded or not Path(recorded).exists():
        return None, preprocess
    if preprocess is None and ranges.calibration.get("preprocess"):
        preprocess = PreprocessSpec.from_mapping(ranges.calibration["preprocess"], "the preprocessing in ranges.json")
    return recorded, preprocess


def check_samples(
    model: ModelInfo,
    data: str | Path | None = None,
    preprocess: PreprocessSpec | None = None,
    ranges: RangeSet | None = None,
    count: int = CHECK_SAMPLES,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Samples for the check: from ``data``; else from the calibration data ``ranges`` records,
    when it is still there, held out from calibration where it holds at least ``count`` samples
    calibration did not read (a check on the samples a method was fitted to flatters it: minmax's
    range covers every one of them); else synthetic inputs within the recorded (or a unit) range.
    ``data`` naming the file calibration read counts as the recorded data."""
    if data is not None and _calibration_file(data, ranges):
        data = None
    recorded = data is None
    data, preprocess = data_or_recorded(data, preprocess, ranges)
    if data is None:
        return [synthetic_feed(model, ranges, count)], SYNTHETIC
    if not recorded or ranges is None:
        source = open_source(data, model, preprocess, shuffle=False)
        return _take(source, model, 0, count), source.description
    cal = ranges.calibration
    source = open_source(data, model, preprocess, shuffle=bool(cal.get("shuffle", False)), seed=int(cal.get("seed", 0)))
    used = cal.get("num_samples")
    if isinstance(used, int) and used > 0:  # calibration's own order, past what it read
        held_out = _take(source, model, used, count, required=False)
        if sum(len(next(iter(f.values()))) for f in held_out) >= count:
            return held_out, f"{source.description} (held out: past the {used} samples calibration read)"
    return _take(source, model, 0, count), f"{source.description} (the samples calibration read: too few were left to hold out)"


def _calibration_file(data: Any, ranges: RangeSet | None) -> bool:
    """Whether ``data`` is a path to the very file or folder calibration read (ranges.json records it)."""
    recorded = ranges.calibration.get("data") if ranges is not None else None
    if not recorded or not isinstance(data, str | Path):
        return False
    return Path(data).exists() and Path(recorded).exists() and Path(data).resolve() == Path(recorded).resolve()


def _take(source: Any, model: ModelInfo, skip: int, count: int, required: bool = True) -> list[dict[str, np.ndarray]]:
    """Batches of ``count`` samples from ``source`` after its first ``skip``."""
    samples = itertools.islice(iter(source), skip, None)
    first = next(samples, None)
    if first is None:
        if required:
            raise QuantkitError(f"{source.description} holds no sample for the fidelity check", option="data")
        return []
    feeds, taken = [], 0
    for batch in batches(itertools.chain([first], samples), model, fixed_batch(model) or count, None, source.description):
        feeds.append(batch.feeds)
        taken += len(batch)
        if taken >= count:
            break
    return feeds


def synthetic_feed(model: ModelInfo, ranges: RangeSet | None, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed: dict[str, Any] = {}
    recorded = (ranges.calibration.get("input_shapes", {}) if ranges is not None else {}) or {}
    for spec in model.inputs:
        seen = recorded.get(spec.name)
        shape = list(seen[0]) if seen and any(not isinstance(d, int) for d in spec.shape) else list(spec.shape)
        if spec.batch_axis is not None and not isinstance(spec.shape[spec.batch_axis], int):
            shape[spec.batch_axis] = count  # a dynamic batch dimension: the check's sample count
        if any(not isinstance(d, int) for d in shape):
            raise QuantkitError(
                f"input {spec.describe()} has dynamic dimensions, so the fidelity check needs real samples: "
                "pass them (--force does not skip the check)",
                option="data",
            )
        if spec.dtype.kind == "f":
            t = ranges.tensors.get(spec.name) if ranges is not None else None
            lo, hi = (t.min, t.max) if t is not None else (-1.0, 1.0)
            feed[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype=bool)
        else:
            raise QuantkitError(f"input {spec.describe()}: no synthetic samples of this type; pass data for the fidelity check")
    return feed


def verify(
    model: ModelInfo,
    candidate: onnx.ModelProto,
    check: CheckOptions | None = None,
    *,
    data: str | Path | None = None,
    preprocess: PreprocessSpec | None = None,
    ranges: RangeSet | None = None,
) -> FidelityCheck:
    """The fidelity check every command runs before it writes a model: ``candidate`` against
    ``model`` on ``data`` (else the calibration data ``ranges`` records, else synthetic inputs).

    A refused model raises ``FidelityError`` (exit 3), carrying the check, unless ``check.force``.
    """
    check = given(check, CheckOptions, "check")
    feeds, source = check_samples(model, data, preprocess, ranges, check.samples)
    result = check_fidelity(model.proto, candidate, feeds, source=source, min_sqnr_db=check.min_sqnr, real=source != SYNTHETIC)
    if not result.ok and not check.force:
        raise FidelityError(f"the new model is broken: {result.failure()}; nothing was written; to write it anyway, force it", check=result)
    return result
