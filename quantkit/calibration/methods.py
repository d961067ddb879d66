"""Range methods: each turns one tensor's statistics (a ``TensorHistogram``) into an ``amax``.

All methods read the same collected histogram, so computing every method costs one collection
pass plus a few milliseconds per tensor. The quantization grid is TensorRT's: symmetric int8,
zero point 0, ``scale = amax / 127``.

Exact zeros (half of every post-ReLU tensor) are represented exactly at any scale, so they carry
no information about where to clip. The entropy and MSE methods leave them out of the search;
with them in, the zero spike dominates the KL divergence and entropy clips hard (trap 18 in
shared/reference/tensorrt-facts.md). Percentile and minmax count them, as their definitions
say. Entropy also flattens other spikes before its search (see ``suppress_spikes``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from quantkit.calibration.histogram import TensorHistogram
from quantkit.errors import QuantkitError

INT8_LEVELS = 127  # positive levels of symmetric int8


class Calibrator(ABC):
    """Base of the range methods: ``compute_amax(hist)`` returns the clipping threshold (>= 0)."""

    name: ClassVar[str]
    #: the Q/DQ format whose error the amax is chosen for: "int8", "fp8", or "any" (no grid assumed)
    for_format: ClassVar[str] = "int8"

    def compute_amax(self, hist: TensorHistogram) -> float:
        if hist.count == 0 or hist.absmax == 0.0:
            return 0.0
        return min(float(self._amax(hist)), hist.absmax)

    @abstractmethod
    def _amax(self, hist: TensorHistogram) -> float:
        """The method's threshold for a histogram with data (``compute_amax`` handles the rest)."""

    def params(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class MinMaxCalibrator(Calibrator):
    """amax = max|x| over all collected values (TensorRT's IInt8MinMaxCalibrator)."""

    name: ClassVar[str] = "minmax"
    for_format: ClassVar[str] = "any"

    def _amax(self, hist: TensorHistogram) -> float:
        return hist.absmax


@dataclass(frozen=True)
class PercentileCalibrator(Calibrator):
    """amax = upper edge of the bin holding the ``percentile``-th percentile of |x|.

    The rank follows numpy's default definition, (n - 1) * p / 100 (0-based), so the result is
    within one bin width of ``numpy.percentile(abs(x), p)``.
    """

    name: ClassVar[str] = "percentile"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise QuantkitError(f"percentile must be in (0, 100], got {self.percentile}", option="percentile")

    def _amax(self, hist: TensorHistogram) -> float:
        cumulative = np.cumsum(hist.counts)
        target = math.floor((hist.count - 1) * self.percentile / 100.0) + 1  # 1-based count, no CDF drift
        k = int(np.searchsorted(cumulative, target))
        return (k + 1) * hist.width


@dataclass(frozen=True)
class EntropyCalibrator(Calibrator):
    """KL-divergence calibration after Migacz, "8-bit Inference with TensorRT" (GTC 2017), made
    robust against the candidates where KL says nothing about the data.

    For each candidate threshold at bin edge ``i`` (``i >= start_bin``): P is bins[0:i] with all
    outliers added to bin i-1; Q is bins[0:i] merged into ``num_quantized_bins`` levels
    (``i // 128`` bins each, the last level taking the remainder) and expanded back over the
    non-empty bins. KL is evaluated for all candidates at once from prefix sums: with G_g the
    level sums and n_g their non-empty bin counts,
        sum P log Q = sum_g G_g log(G_g / n_g) + outliers * log(G_last / n_last),
    which is exact (same value as the loop) and takes milliseconds for 4096 bins.

    The threshold minimising KL(P || Q) wins, under these rules (why: each is a case where the
    published search returns a threshold that destroys the tensor, measured on real models):

    - **Exact zeros are left out, and spikes are flattened** (``suppress_spikes``): a value
      repeated very often (zero after ReLU, a constant image background, padding) lands in one
      int8 level with error at most scale/2, but the KL model spreads its mass over the level and
      then prefers thresholds that clip everything else. Unguarded, the demo model's input is
      clipped at 0.67 of its range and top-1 falls from 98.1% to 35%.
    - **Few distinct values need no clipping**: when at most ``num_quantized_bins`` bins are
      non-empty (a digitised image with 17 grey levels), every value gets a level of its own at
      amax = max|x|. Otherwise several thresholds tie at KL = 0, one of which saturates almost
      everything (accuracy 99.6% -> 10%).
    - **No candidate may saturate more than ``max_saturated`` of the non-zero values** (default
      1%). Below the lowest value of a strictly positive tensor (a GlobalAveragePool of
      post-ReLU features), all of P sits in one bin, Q equals P and KL = 0: the published search
      returns the tensor's minimum and the output SQNR falls to 0.9 dB.
    - **Ties go to the larger threshold**, as in pytorch-quantization.

    ``entropy-trt`` (``EntropyTrtCalibrator``) is the published algorithm without these rules.
    """

    name: ClassVar[str] = "entropy"
    num_quantized_bins: int = 128
    start_bin: int = 128
    suppress_spikes: bool = True
    max_saturated: float = 0.01

    def _amax(self, hist: TensorHistogram) -> float:
        counts = hist.counts.astype(np.float64)
        counts[0] -= hist.zeros
        used = int(np.flatnonzero(counts)[-1]) + 1 if np.any(counts) else 0
        if used == 0:
            return 0.0
        counts = counts[:used]
        if np.count_nonzero(counts) <= self.num_quantized_bins:
            return hist.absmax  # every distinct value (to bin resolution) gets its own level
        raw = counts
        if self.suppress_spikes:
            counts = suppress_spikes(counts)
        i, kl = entropy_divergences(counts, self.num_quantized_bins, self.start_bin)
        # the share of the (raw) non-zero values each candidate saturates
        kept = np.concatenate([[0.0], np.cumsum(raw)])[i]
        saturated = 1.0 - kept / raw.sum()
        kl = np.where(saturated > self.max_saturated, np.inf, kl)
        return float(i[last_argmin(kl)]) * hist.width


def last_argmin(values: np.ndarray, rtol: float = 1e-12) -> int:
    """Index of the last value within ``rtol`` of the minimum (ties go to the larger threshold)."""
    best = float(np.min(values))
    if not math.isfinite(best):
        return len(values) - 1
    close = np.flatnonzero(values <= best + rtol * max(abs(best), 1e-300))
    return int(close[-1])


@dataclass(frozen=True)
class EntropyTrtCalibrator(Calibrator):
    """NVIDIA's published entropy calibration, exactly: pytorch-quantization's ``_compute_amax_entropy``.

    ``bins[0] = bins[1]``; candidates i = 128, 129, ..., len(bins) (stride 1); each candidate's
    bins are spread over 128 levels with ``digitize(range(i), linspace(0, i, 129))``; outliers
    fold into P's last bin; Q comes from the unclipped non-empty bins; the **last** minimum of
    KL wins and amax is edge i. Evaluated for all candidates at once (same prefix sums as
    ``entropy``, with the level edges at ceil(g * i / 128)).

    The histogram: pytorch-quantization bins |x| into 2048 bins over [0, max|x|] of its first
    batch and appends bins of the same width when a later batch is larger. quantkit's streaming
    histogram has power-of-two bin widths (mergeable, order-independent); it is merged here down
    to at most ``num_bins`` bins over [0, max|x|] (1025 to 2048 bins). Where max|x| of a single
    batch is 2048 times a power of two the two histograms are the same bin for bin, and so is
    the result. Otherwise the resolution differs by less than 2x, and over several batches
    pytorch-quantization's bin width stays that of the first batch, while quantkit's follows the
    global maximum.
    """

    name: ClassVar[str] = "entropy-trt"
    num_quantized_bins: int = 128
    start_bin: int = 128
    num_bins: int = 2048

    def _amax(self, hist: TensorHistogram) -> float:
        counts, width = trt_histogram(hist, self.num_bins)
        if counts.size <= self.start_bin:
            return hist.absmax  # pytorch-quantization would evaluate no candidate; keep the range
        bins = counts.astype(np.float64)
        bins[0] = bins[1]
        i, kl = entropy_divergences(bins, self.num_quantized_bins, self.start_bin, levels="linspace")
        return float(i[last_argmin(kl, rtol=0.0)]) * width


def trt_histogram(hist: TensorHistogram, num_bins: int = 2048) -> tuple[np.ndarray, float]:
    """The histogram's counts (zeros included) merged pairwise until at most ``num_bins`` bins
    cover [0, max|x|]; returns (counts up to the last non-empty bin, bin width)."""
    counts = hist.counts[: hist.used_bins].astype(np.int64)
    width = hist.width
    while counts.size > num_bins:
        if counts.size % 2:
            counts = np.append(counts, 0)
        counts = counts.reshape(-1, 2).sum(axis=1)
        width *= 2
    nz = np.flatnonzero(counts)
    return counts[: int(nz[-1]) + 1] if nz.size else counts[:0], width


def suppress_spikes(counts: np.ndarray) -> np.ndarray:
    """Cap every non-empty bin at the larger of its nearest non-empty neighbours.

    A generalisation of pytorch-quantization's ``bins[0] = bins[1]``: isolated spikes are cut
    down to the level around them, while a smooth histogram changes only at its local maxima,
    by the noise between neighbours. Empty bins stay empty, so discrete (comb-like) data keep
    their support.
    """
    nz = np.flatnonzero(counts)
    if nz.size < 2:
        return counts
    v = counts[nz]
    neighbours = np.maximum(np.concatenate([[0.0], v[:-1]]), np.concatenate([v[1:], [0.0]]))
    out = counts.copy()
    out[nz] = np.minimum(v, neighbours)
    return out


def _xlogx(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    pos = v > 0
    out[pos] = v[pos] * np.log(v[pos])
    return out


def entropy_divergences(
    counts: np.ndarray, num_quantized_bins: int = 128, start_bin: int = 128, levels: str = "merged"
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P||Q) for every candidate edge i in [min(start_bin, n), n], n = len(counts).

    ``levels``: how a candidate's i bins are grouped into quantized levels: ``merged`` (i // nq
    bins each, the last level taking the remainder: TensorRT's description) or ``linspace``
    (bin j in level floor(j * nq / i): pytorch-quantization's digitize over linspace(0, i)).
    Returns (candidates, divergences); candidates whose P has mass where Q has none are +inf.
    """
    n = counts.size
    nq = num_quantized_bins
    total = counts.sum()
    cands = np.arange(min(max(start_bin, nq), n), n + 1)
    if cands.size == 0 or cands[0] < nq:  # fewer used bins than levels: no clipping is exact
        return np.array([n]), np.array([0.0])
    csum = np.concatenate([[0.0], np.cumsum(counts)])
    nz = np.concatenate([[0], np.cumsum(counts > 0)])
    clog = np.concatenate([[0.0], np.cumsum(_xlogx(counts))])

    if levels == "linspace":  # first bin of level g: ceil(g * i / nq), exact in integers
        edges = -((-cands[:, None] * np.arange(nq + 1)[None, :]) // nq)
    else:
        merged = cands // nq  # bins per level (all but the last level)
        edges = merged[:, None] * np.arange(nq + 1)[None, :]
        edges[:, -1] = cands  # the last level takes the remainder
    level_sum = csum[edges[:, 1:]] - csum[edges[:, :-1]]
    level_nz = nz[edges[:, 1:]] - nz[edges[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(level_nz > 0, level_sum * np.log(level_sum / np.maximum(level_nz, 1)), 0.0)
    sum_p_log_q = terms.sum(axis=1)

    outliers = total - csum[cands]
    last_count = counts[cands - 1]
    last_sum, last_nz = level_sum[:, -1], level_nz[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        last_log_q = np.where(last_nz > 0, np.log(last_sum / np.maximum(last_nz, 1)), 0.0)
    sum_p_log_q = sum_p_log_q + outliers * last_log_q
    sum_p_log_p = clog[cands - 1] + _xlogx(last_count + outliers)
    q_total = csum[cands]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (sum_p_log_p - sum_p_log_q) / total - math.log(total) + np.log(q_total)
    impossible = (last_count == 0) & (outliers > 0)  # P > 0 where Q = 0
    kl = np.where(impossible, np.inf, np.maximum(kl, 0.0))
    return cands, kl


@dataclass(frozen=True)
class MseCalibrator(Calibrator):
    """amax minimising the expected squared error of symmetric int8 quantization.

    Values are modelled as uniform within each histogram bin (exact zeros, which quantize
    exactly, are taken out). For a threshold T at bin edge i, scale s = T/127, the error is the
    integral of density * (x - s*round(x/s))^2 below T plus (x - T)^2 above it. Both are
    computed exactly from prefix sums of the density's moments, cell by quantization cell, so
    any bin edge can be a candidate (O(candidates x 128)); a coarse-to-fine pass over the edges
    finds the minimum.
    """

    name: ClassVar[str] = "mse"

    def _grid(self) -> np.ndarray:
        return np.arange(INT8_LEVELS + 1, dtype=np.float64) / INT8_LEVELS

    def _amax(self, hist: TensorHistogram) -> float:
        counts = hist.counts.astype(np.float64)
        counts[0] -= hist.zeros
        if not np.any(counts):
            return 0.0
        counts = counts[: int(np.flatnonzero(counts)[-1]) + 1]
        used, grid = counts.size, self._grid()
        # the objective is smooth in the threshold: a coarse pass over every `stride`-th edge,
        # then every edge around the coarse optimum
        stride = max(1, used // 512)
        coarse = np.unique(np.append(np.arange(1, used + 1, stride), used))
        best = int(coarse[int(np.argmin(grid_mse(counts, coarse, grid)))])
        fine = np.arange(max(1, best - stride), min(used, best + stride) + 1)
        return int(fine[int(np.argmin(grid_mse(counts, fine, grid)))]) * hist.width


def fp8_grid() -> np.ndarray:
    """E4M3's non-negative finite values over its largest (448): 0, the subnormals, ..., 1."""
    import ml_dtypes

    values = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # 0x7F is NaN
    return np.unique(values) / 448.0


def grid_mse(counts: np.ndarray, cands: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Expected total squared error (bin-width units) of rounding to the nearest of ``grid`` (sorted
    values in [0, 1], 0 and 1 included) scaled by each threshold in ``cands``, clipping above it.

    The density is ``counts[k]`` on [k, k+1). Moments M_p(x) = integral_0^x t^p f(t) dt come from
    prefix sums over whole bins plus the partial bin at x; each rounding cell (between midpoints of
    neighbouring grid values) adds integral of (x - q)^2 f exactly.
    """
    n = counts.size
    k = np.arange(n, dtype=np.float64)
    prefix = [np.concatenate([[0.0], np.cumsum(counts * ((k + 1) ** (p + 1) - k ** (p + 1)) / (p + 1))]) for p in range(3)]

    def moments(x: np.ndarray) -> list[np.ndarray]:
        x = np.minimum(x, n)
        fl = np.minimum(np.floor(x), n - 1).astype(np.intp)
        c = counts[fl]
        return [prefix[p][fl] + c * (x ** (p + 1) - fl.astype(np.float64) ** (p + 1)) / (p + 1) for p in range(3)]

    t = cands.astype(np.float64)[:, None]
    g = np.asarray(grid, dtype=np.float64)[None, :]
    mids = (g[:, 1:] + g[:, :-1]) / 2
    bounds = np.concatenate([np.zeros_like(t), mids * t, t], axis=1)  # cell edges
    cumulative = moments(bounds)
    m0, m1, m2 = (np.diff(m, axis=1) for m in cumulative)
    q = g * t  # each cell's representative value
    inside = (m2 - 2 * q * m1 + q * q * m0).sum(axis=1)
    tail0, tail1, tail2 = (prefix[p][n] - m[:, -1] for p, m in enumerate(cumulative))
    ct = t[:, 0]
    clipped = tail2 - 2 * ct * tail1 + ct * ct * tail0
    return inside + clipped


@dataclass(frozen=True)
class MseFp8Calibrator(MseCalibrator):
    """amax minimising the expected squared error of FP8 (E4M3) quantization, scale amax/448: the
    error of E4M3's grid (dense near 0, coarse near its top), not int8's uniform one."""

    name: ClassVar[str] = "mse-fp8"
    for_format: ClassVar[str] = "fp8"

    def _grid(self) -> np.ndarray:
        return fp8_grid()


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls
    for cls in (EntropyCalibrator, MinMaxCalibrator, PercentileCalibrator, MseCalibrator, EntropyTrtCalibrator, MseFp8Calibrator)
}
METHOD_NAMES = tuple(CALIBRATORS)
#: what ``all`` computes (``entropy-trt``, the reference, and ``mse-fp8``, for FP8, are asked for by name)
ALL_METHODS = ("entropy", "minmax", "percentile", "mse")


def make_calibrators(methods: str | list[str], percentile: float = 99.99) -> list[Calibrator]:
    """Calibrators for a method name, a comma list, or ``all``; unknown names are a clear error."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        names = list(ALL_METHODS)
    out: list[Calibrator] = []
    for name in names:
        if name not in CALIBRATORS:
            raise QuantkitError(f"unknown calibration method '{name}'; choose from {', '.join(METHOD_NAMES)} or all")
        if name in [c.name for c in out]:
            continue
        out.append(PercentileCalibrator(percentile) if name == "percentile" else CALIBRATORS[name]())
    if not out:
        raise QuantkitError("no calibration method given; choose from " + ", ".join(METHOD_NAMES) + " or all")
    return out
