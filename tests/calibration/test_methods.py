import math

import numpy as np
import pytest

from quantkit.calibration.histogram import TensorHistogram
from quantkit.calibration.methods import (
    EntropyCalibrator,
    MinMaxCalibrator,
    MseCalibrator,
    PercentileCalibrator,
    entropy_divergences,
    make_calibrators,
    suppress_spikes,
)
from quantkit.errors import QuantkitError
from quantkit.ranges import amax_to_scale

RNG = np.random.default_rng(0)
DISTRIBUTIONS = {
    "gaussian": RNG.normal(size=100_000),
    "laplacian": RNG.laplace(size=100_000),
    "post_relu": np.maximum(RNG.normal(size=100_000), 0.0),
}


def hist_of(x):
    h = TensorHistogram()
    h.update(np.asarray(x, dtype=np.float32))
    return h


def reference_kl_search(counts, num_quantized_bins=128, start_bin=128):
    """The published algorithm (Migacz, GTC 2017), one candidate at a time, in plain Python/numpy."""
    results = []
    for i in range(start_bin, len(counts) + 1):
        reference = counts[:i].astype(np.float64).copy()
        reference[i - 1] += counts[i:].sum()
        sliced = counts[:i].astype(np.float64)
        nonzero = sliced != 0
        merged = i // num_quantized_bins
        candidate = np.zeros(i)
        for j in range(num_quantized_bins):
            start = j * merged
            stop = i if j == num_quantized_bins - 1 else start + merged
            norm = nonzero[start:stop].sum()
            if norm:
                candidate[start:stop] = np.where(nonzero[start:stop], sliced[start:stop].sum() / norm, 0.0)
        p = reference / reference.sum()
        q = candidate / candidate.sum()
        if np.any((p > 0) & (q == 0)):
            results.append(math.inf)
            continue
        mask = p > 0
        results.append(float(np.sum(p[mask] * np.log(p[mask] / q[mask]))))
    return np.arange(start_bin, len(counts) + 1), np.array(results)


def fake_quant(x, amax):
    s = amax / 127.0
    return np.clip(np.round(x / s), -127, 127) * s


def test_minmax_is_exact():
    for x in DISTRIBUTIONS.values():
        x32 = x.astype(np.float32)
        assert MinMaxCalibrator().compute_amax(hist_of(x32)) == float(np.abs(x32).max())


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(name, p):
    x = DISTRIBUTIONS[name].astype(np.float32)
    h = hist_of(x)
    amax = PercentileCalibrator(p).compute_amax(h)
    assert abs(amax - np.percentile(np.abs(x), p)) <= h.width


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_entropy_divergences_equal_the_reference_loop(name):
    h = hist_of(DISTRIBUTIONS[name])
    counts = h.counts.astype(np.float64)
    counts[0] -= h.zeros
    counts = counts[: int(np.flatnonzero(counts)[-1]) + 1]
    cands, kl = entropy_divergences(counts)
    ref_cands, ref_kl = reference_kl_search(counts)
    np.testing.assert_array_equal(cands, ref_cands)
    finite = np.isfinite(ref_kl)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    # without the spike guard, the calibrator returns the reference's threshold
    amax = EntropyCalibrator(suppress_spikes=False).compute_amax(h)
    assert amax == pytest.approx(min(ref_cands[np.argmin(ref_kl)] * h.width, h.absmax))


def test_entropy_clips_outliers_of_a_heavy_tail():
    x = np.concatenate([RNG.normal(size=100_000), [60.0, -80.0]])  # two far outliers
    h = hist_of(x)
    amax = EntropyCalibrator().compute_amax(h)
    assert amax < 0.2 * h.absmax
    # and the clipped range quantizes the bulk (everything but the two outliers) far better
    bulk = x[np.abs(x) < 10]
    assert np.mean((fake_quant(bulk, amax) - bulk) ** 2) < 0.1 * np.mean((fake_quant(bulk, h.absmax) - bulk) ** 2)


def test_spike_guard_flattens_isolated_spikes_only():
    counts = np.array([0, 5, 6, 1000, 5, 0, 0, 4, 3], dtype=np.float64)
    np.testing.assert_array_equal(suppress_spikes(counts), [0, 5, 6, 6, 5, 0, 0, 4, 3])
    smooth = np.exp(-(np.linspace(0, 5, 500) ** 2)) * 1e5
    # a smooth histogram changes only at its maximum, by the step to its neighbour
    assert np.abs(suppress_spikes(smooth) - smooth).max() <= 1e-3 * smooth.max()


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_mse_matches_brute_force_on_the_data(name):
    x = DISTRIBUTIONS[name].astype(np.float32)[:30000]
    h = hist_of(x)
    amax = MseCalibrator().compute_amax(h)
    edges = np.arange(1, h.used_bins + 1) * h.width
    brute = np.array([np.mean((fake_quant(x, t) - x) ** 2) for t in edges])
    ours = np.mean((fake_quant(x, amax) - x) ** 2)
    assert ours <= brute.min() * 1.01


def test_constant_tensor_gets_a_valid_scale():
    h = hist_of(np.zeros(64))
    for cal in make_calibrators("all"):
        assert cal.compute_amax(h) == 0.0
    assert amax_to_scale(0.0) == 1.0
    for bad in (float("nan"), float("inf"), 1e-45):
        scale = amax_to_scale(bad)
        assert math.isfinite(scale) and scale > 0


def test_constant_nonzero_tensor():
    h = hist_of(np.full(100, -2.5))
    for cal in make_calibrators("all"):
        amax = cal.compute_amax(h)
        assert 0 < amax <= 2.5
        assert abs(fake_quant(np.float64(-2.5), amax) + 2.5) <= amax / 127  # representable


def test_make_calibrators():
    assert [c.name for c in make_calibrators("all")] == ["entropy", "minmax", "percentile", "mse"]
    assert make_calibrators("percentile", percentile=99.9)[0].percentile == 99.9
    with pytest.raises(QuantkitError, match="unknown calibration method 'kl'"):
        make_calibrators("kl")
    with pytest.raises(QuantkitError):
        make_calibrators("percentile", percentile=120)


def fp8_fake_quant(x, amax):
    import ml_dtypes

    scale = amax / 448.0
    return np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_mse_fp8_matches_brute_force_on_the_fp8_grid(name):
    from quantkit.calibration.methods import MseFp8Calibrator

    x = DISTRIBUTIONS[name].astype(np.float32)[:30000]
    h = hist_of(x)
    amax = MseFp8Calibrator().compute_amax(h)
    edges = np.arange(1, h.used_bins + 1, 4) * h.width
    brute = np.array([np.mean((fp8_fake_quant(x, t) - x) ** 2) for t in edges])
    assert np.mean((fp8_fake_quant(x, amax) - x) ** 2) <= brute.min() * 1.01
    # FP8's grid is fine near zero: its best threshold clips far less than int8's
    assert amax > MseCalibrator().compute_amax(h)
