"""quantize's default "auto" algorithms: where the check finds the model short of FP32 (a task
measure, or an SQNR with too little room) it tries the rewrites and the weight algorithms, keeps a
trial only when the check scores it higher, says what it tried, and records what it kept; a model
the check passes in full is left alone."""

from __future__ import annotations

import importlib
import re

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import helper, numpy_helper
from test_equalize import chain_model

from quantkit.api.quantize import _Score
from quantkit.backends.ort import make_session
from quantkit.cli import main
from quantkit.errors import QuantkitError


@pytest.fixture()
def calibrated(tmp_path):
    model = save(chain_model(), tmp_path / "chain.onnx")
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert (
        main(["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--method", "all", "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    )
    return model, x, tmp_path


def sqnr(model, path, x) -> float:
    ref = make_session(str(model)).run(None, {"x": x})[0]
    got = make_session(str(path)).run(None, {"x": x})[0]
    return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))


def test_a_model_short_of_fp32_gets_the_trials_and_keeps_only_what_the_check_scores_higher(calibrated, capsys):
    model, x, tmp = calibrated
    base = ["quantize", str(model), "--ranges", str(tmp / "r" / "ranges.json"), "--method", "minmax", "--high-precision", "fp32"]
    capsys.readouterr()
    assert main([*base, "--force", "-o", str(tmp / "auto.onnx")]) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("algorithms (auto):")]
    assert "+bias-correction" in line and "refused" in line  # the default is refused on the chain's spread channels
    assert main([*base, "--force", "--algorithms", "none", "-q", "-o", str(tmp / "none.onnx")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp / "auto.onnx")).metadata_props}
    kept = meta.get("quantkit.algorithms")
    assert ("applied " + kept in line) if kept else ("none applied" in line)
    # the check's samples are the data's first; over all of them the kept trial is no worse
    assert sqnr(model, tmp / "auto.onnx", x) >= sqnr(model, tmp / "none.onnx", x) - 0.1
    assert "quantkit.algorithms" not in {p.key for p in onnx.load(str(tmp / "none.onnx")).metadata_props}


def test_a_model_the_check_passes_in_full_is_left_alone(tmp_path, capsys):
    """A Gemm of normal data: all-INT8 keeps about 35 dB and its embedding-like output has no task
    to fall short of, so nothing is tried (and nothing recorded)."""
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    model = save(float_model(nodes, {"x": ["N", 16]}, {"y": ["N", 64]}, inits), tmp_path / "fc.onnx")
    np.save(tmp_path / "x.npy", rng.normal(size=(64, 16)).astype(np.float32))
    assert main(["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "-o", str(tmp_path / "q.onnx")]) == 0
    assert "algorithms (auto)" not in capsys.readouterr().out
    assert "quantkit.algorithms" not in {p.key for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}


def test_auto_is_given_alone():
    assert main(["quantize", "m.onnx", "--ranges", "r.json", "--algorithms", "auto,gptq", "-o", "q.onnx"]) == 2


@pytest.mark.parametrize(
    ("a", "b", "better"),
    [
        ((True, 0.5, 10.0), (False, 0.9, 30.0), True),  # passing beats any failing
        ((False, 0.6, 5.0), (False, 0.5, 30.0), True),  # then the task
        ((True, 1.0, 20.05), (True, 1.0, 20.0), False),  # an SQNR gain within the check's noise is no gain
        ((True, 1.0, 20.5), (True, 1.0, 20.0), True),
    ],
)
def test_a_trial_must_earn_its_change(a, b, better):
    assert _Score(*a).better_than(_Score(*b)) is better


def outlier_matmul(tmp_path):
    """X [N, 32] @ W [32, 16], X's first four channels 100x the others and W's rows for them small:
    a per-tensor INT8 grid sized for the outliers rounds the other channels, which carry the
    output, to a few levels (a transformer's LayerNorm outliers, in miniature)."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(32, 16)).astype(np.float32)
    w[:4] *= 0.01
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    model = save(float_model(nodes, {"x": ["N", 32]}, {"y": ["N", 16]}, [numpy_helper.from_array(w, "w")]), tmp_path / "mm.onnx")
    x = rng.normal(size=(64, 32)).astype(np.float32)
    x[:, :4] *= 100
    np.save(tmp_path / "x.npy", x)
    assert (
        main(["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--method", "all", "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    )
    return model, x


def test_an_embedding_short_of_fp32_by_its_cosine_gets_the_smoothquant_trial(tmp_path, capsys):
    """No output has a task here, so the worst cosine decides; SmoothQuant is tried on the MatMul
    and kept because the check scores it higher, and the whole data agrees."""
    model, x = outlier_matmul(tmp_path)
    base = ["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "--method", "minmax", "--high-precision", "fp32"]
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "auto.onnx")]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("algorithms (auto):")]
    assert "applied smoothquant" in line and "(default cosine 0." in line
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "auto.onnx")).metadata_props}
    assert meta["quantkit.algorithms"] == "smoothquant"
    assert main([*base, "--algorithms", "none", "-q", "-o", str(tmp_path / "none.onnx")]) == 0
    assert sqnr(model, tmp_path / "auto.onnx", x) > sqnr(model, tmp_path / "none.onnx", x) + 3


def test_a_trial_the_model_does_not_take_leaves_the_default_standing(tmp_path, capsys, monkeypatch):
    """A rewrite that fails on the model (here SmoothQuant, made to refuse) is noted and skipped:
    an optional trial never turns a model the default writes into an error."""
    api = importlib.import_module("quantkit.api.quantize")  # the module: the package exports its function

    def refuse(*args, **kwargs):
        raise QuantkitError("no statistics for this activation")

    monkeypatch.setattr(api, "smooth_model", refuse)
    model, _ = outlier_matmul(tmp_path)
    base = ["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "--method", "minmax", "--high-precision", "fp32"]
    capsys.readouterr()
    assert main([*base, "--force", "-o", str(tmp_path / "auto.onnx")]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("algorithms (auto):")]
    assert "+smoothquant not applicable (no statistics for this activation)" in line and "+bias-correction" in line


@pytest.mark.parametrize(
    ("score", "enough"),
    [
        ((True, 1.0, 35.0), True),
        ((True, 1.0, 25.0), False),  # every check sample agrees, but at 25 dB the held-out ones may not
        ((True, 0.98, 40.0), False),
        ((False, 1.0, 40.0), False),
    ],
)
def test_good_enough_asks_for_the_task_and_an_sqnr_with_room_to_spare(score, enough):
    assert _Score(*score).good_enough is enough


def test_a_classifier_the_check_agrees_with_at_a_low_sqnr_gets_the_trials(tmp_path, capsys):
    """Two logits, +-10 x[:, 0]: an outlier of 1000 in another input channel sets minmax's step to
    about 8, so every sign survives (top-1 agreement 100%) at about 14 dB; auto tries the trials."""
    rng = np.random.default_rng(3)
    w = np.zeros((2, 4), np.float32)
    w[0, 0], w[1, 0] = 1.0, -1.0
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    model = save(float_model(nodes, {"x": ["N", 4]}, {"y": ["N", 2]}, [numpy_helper.from_array(w, "w")]), tmp_path / "fc.onnx")
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[:, 0] = 10 * np.sign(x[:, 0])
    x[::8, 1] = 1000.0
    np.save(tmp_path / "x.npy", x)
    calibrate = ["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--method", "minmax", "--out-dir", str(tmp_path / "r")]
    assert main([*calibrate, "-q"]) == 0
    capsys.readouterr()
    args = ["quantize", str(model), "--ranges", str(tmp_path / "r" / "ranges.json"), "--high-precision", "fp32", "--force"]
    assert main([*args, "-o", str(tmp_path / "q.onnx")]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("algorithms (auto):")]
    default = re.search(r"\(default (\d+\.\d) dB, ", line)  # no task measure shown: every check sample agrees
    assert default and float(default.group(1)) < 20
    assert "+bias-correction" in line


def test_gptq_then_the_empirical_correction_reuses_gptq_and_equals_both_named(calibrated, capsys, monkeypatch):
    """With every trial scored higher than the last (a stand-in judge), auto keeps its last trial,
    gptq + empirical-bias-correction: it runs GPTQ once (the extension starts from the gptq trial's
    model) and writes the bytes that naming both algorithms writes."""
    api = importlib.import_module("quantkit.api.quantize")
    judged, rounded = [], []

    def rising(*args, **kwargs):
        judged.append(1)
        return _Score(True, 0.5, 10.0 + len(judged))

    def counted(*args, **kwargs):
        rounded.append(1)
        return optimize_rounding(*args, **kwargs)

    optimize_rounding = api.optimize_rounding
    monkeypatch.setattr(api, "_judge", rising)
    monkeypatch.setattr(api, "optimize_rounding", counted)
    monkeypatch.setattr(api, "_auto_rewrites", lambda job: [])  # the weight trials alone
    model, _, tmp = calibrated
    base = ["quantize", str(model), "--ranges", str(tmp / "r" / "ranges.json"), "--method", "minmax", "--high-precision", "fp32", "-q"]
    assert main([*base, "--force", "-o", str(tmp / "auto.onnx")]) == 0
    assert len(rounded) == 1
    meta = {p.key: p.value for p in onnx.load(str(tmp / "auto.onnx")).metadata_props}
    assert meta["quantkit.algorithms"] == "gptq,empirical-bias-correction"
    assert main([*base, "--force", "--algorithms", "gptq,empirical-bias-correction", "-o", str(tmp / "named.onnx")]) == 0
    assert (tmp / "auto.onnx").read_bytes() == (tmp / "named.onnx").read_bytes()


@pytest.mark.parametrize(
    ("a", "b", "better"),
    [
        # PP-OCRv4's recogniser on 32 check samples: one string more is within the noise of 86%
        # agreement (a standard error of 6.1%), so 2.5 dB decides
        ((True, 0.844, 16.0, False, 32), (True, 0.875, 13.5, False, 32), True),
        ((True, 0.875, 13.5, False, 32), (True, 0.844, 16.0, False, 32), False),
        # near 100% the noise is small: one flip of 32 (3.1%) is more than its 2.2%
        ((True, 1.0, 10.0, False, 32), (True, 0.969, 20.0, False, 32), True),
        # a measure that is not a share of samples (samples=0: a mask IoU) is taken as it is
        ((True, 0.875, 13.5), (True, 0.844, 16.0), True),
    ],
)
def test_a_task_difference_within_its_sampling_noise_is_decided_by_the_sqnr(a, b, better):
    assert _Score(*a).better_than(_Score(*b)) is better
