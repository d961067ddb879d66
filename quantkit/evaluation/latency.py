"""Latency and throughput of onnxruntime sessions, timed in interleaved rounds."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
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


def measure_latency(session: Any, sample: dict[str, np.ndarray], batch: int, runs: int = 50) -> Latency:
    """Batch-1 latency percentiles and throughput at ``batch``, after warm-up."""
    one = {k: v[:1] for k, v in sample.items()}
    many = {k: np.repeat(v[:1], batch, axis=0) for k, v in sample.items()}
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


def measure_all(timed: Sequence[tuple[Any, Any]], sample: dict[str, np.ndarray], batch: int, rounds: int = 3) -> None:
    """Time every variant in interleaved rounds and keep each one's median round, so that drifts
    of the machine (frequency, background load) hit all variants alike."""
    per_variant: dict[int, list[Latency]] = {id(r): [] for r, _ in timed}
    for _ in range(rounds):
        for result, session in timed:
            per_variant[id(result)].append(measure_latency(session, sample, batch, runs=30))
    for result, _ in timed:
        measured = sorted(per_variant[id(result)], key=lambda m: m.batch1_p50_ms)
        result.latency = measured[len(measured) // 2]


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
