"""Streaming, mergeable per-tensor statistics: running min/max and a histogram of |x|.

Range-growth strategy (why the result never depends on batch order or sharding):
the histogram always has ``2 * bins`` bins of width ``2**e`` starting at 0, where ``e`` is the
smallest integer with ``max|x| < 2 * bins * 2**e``. So the range is a function of the global
maximum alone, and at least ``bins`` bins (TensorRT's 2048 by default) cover ``[0, max|x|]``.
When a batch exceeds the range, ``e`` grows by ``k`` and every ``2**k`` adjacent bins merge
into one: the new bins' edges are edges of the old bins, so the merge is exact, memory stays
fixed, and nothing collected is lost. The bin index of a value is ``floor(|x| * 2**-e)``, and
scaling by a power of two is exact in floating point, so a value lands in the same final bin
however the data was batched or split into shards: streaming, merging and one-shot collection
give identical integer counts.

Values that cannot be calibrated are counted and kept out of the statistics: NaN, +/-inf, and
"sentinels" with ``|x| > SENTINEL_ABS`` (attention masks built from -3.4e38 or float-min).
Exact zeros are counted separately as well, because they are represented exactly at any scale
and the range methods treat them specially (see ``quantkit.methods``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantkit.ranges import STAT_FIELDS

#: Finite values larger than this in magnitude are treated as sentinels, not data: no real
#: activation is this large, while masks use -3.4e38 (float32 min) or -1e30-style constants.
SENTINEL_ABS = 1e30

# Below this exponent float32 scaling by 2**-e could overflow; such tensors are binned in float64.
_MIN_FLOAT32_EXPONENT = -100


def _exponent_for(absmax: float, nbins: int) -> int:
    """Smallest e with absmax < nbins * 2**e (absmax > 0)."""
    _, exp = math.frexp(absmax / nbins)  # absmax/nbins = m * 2**exp, 0.5 <= m < 1
    return exp


class Scratch:
    """Reusable work buffers for ``TensorHistogram.update`` (one per collecting thread)."""

    def __init__(self) -> None:
        self._floats: dict[np.dtype, np.ndarray] = {}
        self._indices = np.empty(0, dtype=np.intp)

    def floats(self, size: int, dtype: np.dtype) -> np.ndarray:
        buf = self._floats.get(np.dtype(dtype))
        if buf is None or buf.size < size:
            buf = self._floats[np.dtype(dtype)] = np.empty(size, dtype=dtype)
        return buf[:size]

    def indices(self, size: int) -> np.ndarray:
        if self._indices.size < size:
            self._indices = np.empty(size, dtype=np.intp)
        return self._indices[:size]


@dataclass
class TensorHistogram:
    """Statistics of one tensor, updated batch by batch; ``merge`` combines shards exactly."""

    bins: int = 2048
    counts: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    exponent: int | None = None  # bin width is 2**exponent; None while only zeros were seen
    min: float = math.inf
    max: float = -math.inf
    count: int = 0  # values included in the statistics
    zeros: int = 0  # of which exactly 0
    nonfinite: int = 0  # NaN / inf values, excluded
    sentinels: int = 0  # |x| > SENTINEL_ABS, excluded

    def __post_init__(self) -> None:
        if self.bins < 256 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 256, got {self.bins}")
        if self.counts is None:
            self.counts = np.zeros(self.nbins, dtype=np.int64)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def nbins(self) -> int:
        """Number of stored bins (twice ``bins``, so ``bins`` always cover the data)."""
        return 2 * self.bins

    @property
    def width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def absmax(self) -> float:
        if self.count == 0:
            return 0.0
        return max(abs(self.min), abs(self.max))

    @property
    def used_bins(self) -> int:
        """Bins up to and including the last non-empty one."""
        nz = np.flatnonzero(self.counts)
        return int(nz[-1]) + 1 if nz.size else 0

    def edges(self) -> np.ndarray:
        return np.arange(self.nbins + 1, dtype=np.float64) * self.width

    # ---- collection ---------------------------------------------------------------------
    def update(self, x: np.ndarray, scratch: Scratch | None = None) -> None:
        """Fold one batch of values (any shape, any float dtype) into the statistics.

        ``scratch`` lends reusable buffers so that a collector updating many tensors per batch
        does not allocate (and page-fault) fresh arrays for each one.
        """
        x = np.asarray(x)
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        a = np.abs(x, out=scratch.floats(x.size, x.dtype)) if scratch is not None else np.abs(x)
        amax = float(a.max())
        if not amax <= SENTINEL_ABS:  # NaN, inf or sentinel present: take the slow, masked path
            keep = np.isfinite(a)
            self.nonfinite += int(keep.size - np.count_nonzero(keep))
            big = a > SENTINEL_ABS
            big &= keep
            self.sentinels += int(np.count_nonzero(big))
            keep &= ~big
            x, a = x[keep], a[keep]
            if x.size == 0:
                return
            amax = float(a.max())
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        nonzero = int(np.count_nonzero(a))
        self.zeros += a.size - nonzero
        self.count += a.size
        if nonzero == 0:
            self.counts[0] += a.size
            return
        if self.exponent is None or amax >= self.nbins * self.width:
            self._grow(_exponent_for(amax, self.nbins))
        self._accumulate(a, scratch)

    def _accumulate(self, a: np.ndarray, scratch: Scratch | None) -> None:
        assert self.exponent is not None
        if self.exponent >= _MIN_FLOAT32_EXPONENT or a.dtype == np.float64:
            scaled = np.multiply(a, a.dtype.type(math.ldexp(1.0, -self.exponent)), out=a)
        else:
            scaled = a.astype(np.float64) * math.ldexp(1.0, -self.exponent)
        if scratch is not None:
            idx = scratch.indices(scaled.size)
            idx[...] = scaled  # truncation == floor for non-negative values
        else:
            idx = scaled.astype(np.intp)
        self.counts += np.bincount(idx, minlength=self.nbins)

    def _grow(self, exponent: int) -> None:
        """Move to bin width 2**exponent (>= current), merging old bins exactly."""
        if self.exponent is None:
            self.exponent = exponent  # everything so far was 0, already in bin 0
            return
        shift = exponent - self.exponent
        if shift <= 0:
            return
        factor = 1 << shift
        if factor >= self.nbins:
            merged = np.zeros(self.nbins, dtype=np.int64)
            merged[0] = self.counts.sum()
        else:
            merged = np.zeros(self.nbins, dtype=np.int64)
            merged[: self.nbins // factor] = self.counts.reshape(-1, factor).sum(axis=1)
        self.counts = merged
        self.exponent = exponent

    # ---- combination and serialization --------------------------------------------------
    def merge(self, other: TensorHistogram) -> TensorHistogram:
        """Return the statistics of both shards together (exact; neither input is modified)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        out = self.copy()
        if other.exponent is not None:
            target = other.exponent if out.exponent is None else max(out.exponent, other.exponent)
            out._grow(target)
            theirs = other.copy()
            theirs._grow(target)
            out.counts = out.counts + theirs.counts
        else:
            out.counts[0] += other.counts[0]
        out.min, out.max = min(out.min, other.min), max(out.max, other.max)
        out.count += other.count
        out.zeros += other.zeros
        out.nonfinite += other.nonfinite
        out.sentinels += other.sentinels
        return out

    def copy(self) -> TensorHistogram:
        return dataclasses.replace(self, counts=self.counts.copy())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable form (counts stored sparsely) for shards sent between processes."""
        nz = np.flatnonzero(self.counts)
        return {
            "bins": self.bins,
            "exponent": self.exponent,
            **{k: getattr(self, k) for k in STAT_FIELDS},
            "nonzero_bins": nz.tolist(),
            "nonzero_counts": self.counts[nz].tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorHistogram:
        h = cls(bins=int(d["bins"]))
        h.counts[np.asarray(d["nonzero_bins"], dtype=np.intp)] = np.asarray(d["nonzero_counts"], dtype=np.int64)
        h.exponent = d["exponent"]
        h.min, h.max = float(d["min"]), float(d["max"])
        for key in ("count", "zeros", "nonfinite", "sentinels"):
            setattr(h, key, int(d[key]))
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorHistogram):
            return NotImplemented
        return self.to_dict() == other.to_dict()
