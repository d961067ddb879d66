import numpy as np
import pytest

from quantkit.calibration.histogram import SENTINEL_ABS, TensorHistogram


def collect(chunks, bins=2048):
    h = TensorHistogram(bins=bins)
    for c in chunks:
        h.update(c)
    return h


def test_streaming_equals_one_batch_after_range_growth():
    rng = np.random.default_rng(0)
    # each later batch widens the range (x0.1 -> x300), forcing several merges of old bins
    chunks = [rng.normal(0, s, size=5000).astype(np.float32) for s in (0.1, 0.5, 3.0, 1.0, 300.0, 2.0)]
    streamed = collect(chunks)
    one_shot = collect([np.concatenate(chunks)])
    assert streamed == one_shot
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert streamed.count == 30000
    assert streamed.absmax == np.abs(np.concatenate(chunks)).max()
    # at least `bins` bins cover [0, max|x|]
    assert streamed.used_bins >= 2048


def test_histogram_counts_match_numpy_on_the_same_edges():
    x = np.random.default_rng(1).laplace(size=20000).astype(np.float32)
    h = collect([x[:7000], x[7000:]])
    expected, _ = np.histogram(np.abs(x), bins=h.edges())
    np.testing.assert_array_equal(h.counts, expected)


def test_merge_of_shards_equals_one_run_in_any_order():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(0, s, size=3000).astype(np.float32) for s in (1.0, 50.0, 0.01, 7.0)]
    a, b = collect(chunks[:2]), collect(chunks[2:])
    one = collect(chunks)
    assert a.merge(b) == one
    assert b.merge(a) == one
    # merging does not modify its inputs
    assert a == collect(chunks[:2])


def test_nonfinite_and_sentinels_are_counted_and_kept_out():
    x = np.array([0.0, 0.0, 1.5, -2.0, np.nan, np.inf, -np.inf, np.finfo(np.float32).min], dtype=np.float32)
    h = collect([x])
    assert (h.min, h.max, h.count, h.zeros) == (-2.0, 1.5, 4, 2)
    assert (h.nonfinite, h.sentinels) == (3, 1)
    assert h.counts.sum() == 4
    assert SENTINEL_ABS < np.finfo(np.float32).max


def test_zeros_only_then_data():
    h = collect([np.zeros(100, np.float32), np.array([3.0], np.float32)])
    assert h.zeros == 100 and h.counts[0] == 100 and h.absmax == 3.0
    assert h == collect([np.concatenate([np.zeros(100, np.float32), [3.0]]).astype(np.float32)])


def test_serialization_round_trip():
    h = collect([np.random.default_rng(3).normal(size=1000).astype(np.float32)])
    assert TensorHistogram.from_dict(h.to_dict()) == h


def test_tiny_and_huge_magnitudes():
    tiny = collect([np.array([1e-38, -3e-38], np.float32)])
    assert tiny.absmax == pytest.approx(3e-38) and tiny.counts.sum() == 2
    huge = collect([np.array([1e29, -5e29], np.float32)])
    assert huge.absmax == pytest.approx(5e29, rel=1e-6) and huge.counts.sum() == 2


@pytest.mark.parametrize("bins", [100, 255, 3000])
def test_bins_must_be_power_of_two(bins):
    with pytest.raises(ValueError):
        TensorHistogram(bins=bins)
