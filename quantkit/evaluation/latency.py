"""Latency and throughput of onnxruntime sessions, timed in interleaved rounds."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Latency:
    batch1_p50_ms: float
    batch1_p90_ms: float
    batch1_p99_ms: float
    throughput_batch: int
    throughput_samples_per_s: float
    batch1_p10_ms: float = 0.0


def batch_of(sample: dict[str, np.ndarray], size: int, axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """The sample's first item repeated ``size`` times along each input's batch axis (``axes``,
    default 0; None: an input every sample shares, fed as it is)."""
    out = {}
    for k, v in sample.items():
        axis = (axes or {}).get(k, 0)
        out[k] = v if axis is None or not v.ndim else np.repeat(np.take(v, [0], axis=axis), size, axis=axis)
    return out


def measure_latency(
    session: Any, sample: dict[str, np.ndarray], batch: int, runs: int = 50, axes: Mapping[str, int | None] | None = None
) -> Latency:
    """Batch-1 latency percentiles and throughput at ``batch``, after warm-up."""
    one = batch_of(sample, 1, axes)
    many = batch_of(sample, batch, axes)
    for _ in range(5):
        session.run(None, one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, one)
        times.append((time.perf_counter() - start) * 1000)
    session.run(None, many)
    big_runs = max(3, runs // 10)
    start = time.perf_counter()
    for _ in range(big_runs):
        session.run(None, many)
    elapsed = time.perf_counter() - start
    p10, p50, p90, p99 = np.percentile(times, [10, 50, 90, 99])
    return Latency(float(p50), float(p90), float(p99), batch, batch * big_runs / elapsed, float(p10))


def measure_all(
    timed: Sequence[tuple[Any, Any]],
    sample: dict[str, np.ndarray],
    batch: int,
    rounds: int = 3,
    axes: Mapping[str, int | None] | None = None,
) -> None:
    """Time every variant in interleaved rounds and keep each one's median round, so that drifts
    of the machine (frequency, background load) hit all variants alike."""
    per_variant: dict[int, list[Latency]] = {id(r): [] for r, _ in timed}
    for _ in range(rounds):
        for result, session in timed:
            per_variant[id(result)].append(measure_latency(session, sample, batch, runs=30, axes=axes))
    for result, _ in timed:
        measured = sorted(per_variant[id(result)], key=lambda m: m.batch1_p50_ms)
        result.latency = measured[len(measured) // 2]


def interleaved_batch_ms(
    sessions: Sequence[Any],
    sample: dict[str, np.ndarray],
    batches: Sequence[int],
    rounds: int = 3,
    budget_s: float = 0.3,
    axes: Mapping[str, int | None] | None = None,
) -> list[dict[int, float]]:
    """Median latency (ms) of each session at each batch size, for comparing models batch size by
    batch size: the sessions take turns run by run (A, B, C, A, B, C, ...) for about ``rounds *
    budget_s`` seconds each, so that a drift of the machine (frequency, background load) lands on
    all of them alike instead of on whichever was timed in that second."""
    out: list[dict[int, float]] = [{} for _ in sessions]
    for b in batches:
        feeds = batch_of(sample, b, axes)
        for s in sessions:
            for _ in range(3):
                s.run(None, feeds)
        per: list[list[float]] = [[] for _ in sessions]
        start = time.perf_counter()
        limit = rounds * budget_s * len(sessions)
        while min(len(t) for t in per) < 5 or (time.perf_counter() - start < limit and len(per[0]) < 400):
            for i, s in enumerate(sessions):
                t = time.perf_counter()
                s.run(None, feeds)
                per[i].append(time.perf_counter() - t)
        for i in range(len(sessions)):
            out[i][b] = float(np.median(per[i]) * 1000)
    return out


def hardware() -> str:
    """The CPU model and core count, as the report names the machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"
