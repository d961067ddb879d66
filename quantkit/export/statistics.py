"""Per-channel moments of activations, streamed over the data in one FP32 pass (the statistics
the weight algorithms need: int4's clip search weighs channels by E[x^2], bias correction shifts
biases by E[x])."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantkit.backends.ort import ActivationRunner
from quantkit.model import ModelInfo


def channel_moments(model: ModelInfo, axes: dict[str, int], batches: Any, power: int) -> dict[str, np.ndarray]:
    """E[x_c ** power] per channel c of each tensor, the channel being ``axes[tensor]`` (e.g. 1 for
    a Conv's NCHW input, -1 for a MatMul's), over every other axis and every batch."""
    if not axes:
        return {}
    runner = ActivationRunner(model, list(axes))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(axes, 0)
    try:
        for batch in batches:
            for name, value in runner.run(batch.feeds, batch.ids).items():
                rows = np.moveaxis(np.asarray(value, np.float64), axes[name], -1)
                rows = rows.reshape(-1, rows.shape[-1])
                sums[name] = sums.get(name, 0.0) + np.sum(rows**power, axis=0)
                counts[name] += len(rows)
    finally:
        runner.close()
    return {n: sums[n] / counts[n] for n in axes if counts[n]}
