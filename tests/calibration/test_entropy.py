"""Entropy calibration: the published algorithm exactly (entropy-trt), and the default that cannot collapse."""

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper

import quantkit
from quantkit.backends.ort import make_session
from quantkit.calibration.histogram import TensorHistogram
from quantkit.calibration.methods import EntropyCalibrator, EntropyTrtCalibrator, entropy_divergences, trt_histogram
from quantkit.evaluation.metrics import sqnr_db
from quantkit.export.qdq import quantize_model
from quantkit.model import load_model

RNG = np.random.default_rng(3)


def published_entropy(hist, edges, nbins=128, stride=1, start_bin=128):
    """pytorch-quantization's ``_compute_amax_entropy``, re-implemented loop by loop as published."""
    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences = []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        density = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                density[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                density[key] /= val
        q = np.array([density[d] if d != -1 else 0.0 for d in digitized])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()  # scipy.stats.entropy normalizes both
        if np.any((p > 0) & (q == 0)):
            divergences.append(np.inf)
            continue
        m = p > 0
        divergences.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return edges[last_argmin * stride + start_bin]


def single_batch(x):
    h = TensorHistogram()
    h.update(np.asarray(x, np.float32))
    return h


CASES = {
    "gaussian+outliers": np.concatenate([RNG.normal(size=50_000), RNG.normal(scale=8, size=50)]),
    "student-t": RNG.standard_t(3, size=50_000),
    "post-relu": np.maximum(RNG.normal(size=50_000), 0),
    "laplace": RNG.laplace(size=50_000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_entropy_trt_matches_the_published_algorithm_bin_for_bin(name):
    x = np.abs(CASES[name]).astype(np.float32)
    x = (x / x.max() * np.float32(1 - 2**-20)).astype(np.float32)  # max|x| just below 1: 2048 bins of 1/2048
    hist = single_batch(x)
    counts, width = trt_histogram(hist)
    reference_hist, edges = np.histogram(x, bins=2048, range=(0.0, 1.0))
    assert width == 1 / 2048
    np.testing.assert_array_equal(counts, reference_hist[: counts.size])
    assert EntropyTrtCalibrator().compute_amax(hist) == pytest.approx(published_entropy(reference_hist, edges), abs=1e-12)


def test_entropy_trt_divergences_equal_the_loop_for_every_candidate():
    counts = np.histogram(np.abs(CASES["student-t"]), bins=600)[0].astype(np.float64)
    counts[0] = counts[1]
    cands, kl = entropy_divergences(counts, levels="linspace")
    for k in (0, 50, 200, len(cands) - 1):
        i = int(cands[k])
        space = np.linspace(0, i, 129)
        level = np.digitize(np.arange(i), space) - 1
        q = np.zeros(i)
        for g in np.unique(level):
            members = (level == g) & (counts[:i] > 0)
            if members.any():
                q[members] = counts[:i][members].sum() / members.sum()
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        expected = np.inf if np.any(m & (q == 0)) else np.sum(p[m] * np.log(p[m] / q[m]))
        assert kl[k] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_default_differs_from_the_published_one_and_says_so():
    h = single_batch(CASES["student-t"])
    ours, published = EntropyCalibrator().compute_amax(h), EntropyTrtCalibrator().compute_amax(h)
    assert ours != published
    assert EntropyCalibrator.name == "entropy" and EntropyTrtCalibrator.name == "entropy-trt"
    assert "max_saturated" in EntropyCalibrator().params()


# ---- the two collapses, on models built here ----------------------------------------------------------------
def gap_classifier(bias: float = 0.6) -> onnx.ModelProto:
    """Conv -> Relu -> +bias -> GlobalAveragePool -> Gemm: the pooled features are strictly positive."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.5, size=(16, 3, 3, 3)).astype(np.float32)
    wf = rng.normal(0, 1, size=(10, 16)).astype(np.float32)
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [1, 16, 1, 1], np.full(16, bias, np.float32)),
        helper.make_tensor("wf", TensorProto.FLOAT, wf.shape, wf.ravel()),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "b"], ["rb"], name="shift"),
        helper.make_node("GlobalAveragePool", ["rb"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1, name="head"),
    ]
    return float_model(nodes, {"x": ["n", 3, 2, 2]}, {"logits": ["n", 10]}, inits, name="gap")


def int8_sqnr(path, data_path, x, **calibrator_options):
    """Entropy ranges (with ``calibrator_options``, if given) -> TensorRT Q/DQ -> output SQNR and top-1 agreement."""
    from quantkit.data import batches, open_source

    info = load_model(path)
    stats = quantkit.collect_statistics(info, batches(open_source(data_path, info), info, 32))
    ranges = quantkit.compute_ranges(stats, [EntropyCalibrator(**calibrator_options)], info)
    q, _ = quantize_model(info, ranges, method="entropy")
    ref = make_session(info.proto).run(None, {"x": x})[0]
    got = make_session(q).run(None, {"x": x})[0]
    return sqnr_db(ref, got), float(np.mean(ref.argmax(1) == got.argmax(1))), ranges


def test_entropy_never_clips_a_strictly_positive_pooled_tensor_to_its_minimum(tmp_path):
    path = save(gap_classifier(), tmp_path / "gap.onnx")
    x = np.random.default_rng(0).normal(size=(256, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    sqnr, agreement, ranges = int8_sqnr(path, tmp_path / "x.npy", x)
    gap = ranges.tensors["flat"] if "flat" in ranges.tensors else ranges.tensors["gap"]
    assert gap.min >= 0.5 and gap.zeros == 0  # no zeros, and an empty low region
    assert gap.amax["entropy"] > 0.9 * max(abs(gap.min), abs(gap.max))
    assert sqnr > 25 and agreement >= 0.97
    # without the saturation rule, KL is 0 at the tensor's minimum and the model collapses
    sqnr_plain, agreement_plain, ranges_plain = int8_sqnr(path, tmp_path / "x.npy", x, max_saturated=1.0)
    plain = ranges_plain.tensors["flat"].amax["entropy"]
    assert plain < 1.01 * gap.min and sqnr_plain < 5 and agreement_plain < agreement


def test_entropy_keeps_every_level_of_a_discrete_input():
    levels = np.arange(17, dtype=np.float32) / 16  # a digitised image: 17 grey levels
    x = RNG.choice(levels, size=100_000, p=np.linspace(1, 3, 17) / np.linspace(1, 3, 17).sum())
    h = single_batch(x)
    assert EntropyCalibrator().compute_amax(h) == 1.0
    # the raw KL search ties at zero for a threshold that saturates almost everything
    counts = h.counts[: h.used_bins].astype(np.float64)
    counts[0] -= h.zeros
    cands, kl = entropy_divergences(counts)
    assert cands[int(np.argmin(kl))] * h.width <= 1 / 8


def test_entropy_still_clips_far_outliers():
    x = np.concatenate([RNG.normal(size=100_000), [60.0, -80.0]])
    h = single_batch(x)
    assert EntropyCalibrator().compute_amax(h) < 0.2 * h.absmax
