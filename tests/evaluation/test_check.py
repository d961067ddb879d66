"""The fidelity check leaves a transformer's padding positions out, and only those."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import float_model
from onnx import TensorProto, helper

from quantkit.evaluation.check import check_fidelity, token_positions

B, S, D = 4, 10, 6


def hidden_model(padding_noise: float = 0.0, token_noise: float = 0.0):
    """hidden = x, plus a perturbation at padding positions and (scaled) everywhere else."""
    inits = [
        helper.make_tensor("pad_noise", TensorProto.FLOAT, [], [padding_noise]),
        helper.make_tensor("tok_noise", TensorProto.FLOAT, [], [token_noise]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "m"], ["pad"]),
        helper.make_node("Unsqueeze", ["pad", "axes"], ["pad3"]),
        helper.make_node("Mul", ["pad3", "pad_noise"], ["p"]),
        helper.make_node("Mul", ["x", "tok_noise"], ["t"]),
        helper.make_node("Add", ["x", "p"], ["xp"]),
        helper.make_node("Add", ["xp", "t"], ["hidden"]),
    ]
    model = float_model(nodes, {"x": ["N", S, D]}, {"hidden": ["N", S, D]}, inits)
    model.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", S]))
    return model


def feeds():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 5, 2, 10])
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int64)
    return [{"x": rng.normal(size=(B, S, D)).astype(np.float32), "attention_mask": mask}]


def test_padding_positions_are_left_out():
    f = feeds()
    assert token_positions(f).sum() == 20
    result = check_fidelity(hidden_model(), hidden_model(padding_noise=1e3), f)
    assert result.ok and result.outputs[0].sqnr_db == float("inf")
    assert "at the 20 real tokens (padding left out)" in result.summary()


def test_a_model_broken_at_real_tokens_still_fails():
    result = check_fidelity(hidden_model(), hidden_model(token_noise=-1.0), feeds())  # hidden = 0 at real tokens
    assert not result.ok and "is constant (all zeros)" in result.failure()


@pytest.mark.parametrize(
    "feed",
    [
        {"x": np.zeros((2, 3)), "mask": np.ones((2, 3), np.int64)},  # not a padding-mask name
        {"x": np.zeros((2, 3)), "attention_mask": np.full((2, 3), 0.5, np.float32)},  # not 0/1
        {"x": np.zeros((2, 3)), "attention_mask": np.ones((2, 1, 3), np.int64)},  # not [batch, sequence]
    ],
)
def test_only_a_2d_binary_attention_mask_counts(feed):
    assert token_positions([feed]) is None


def test_eval_leaves_padding_out_of_every_metric(tmp_path):
    from conftest import save

    import quantkit

    reference = save(hidden_model(), tmp_path / "ref.onnx")
    noisy = save(hidden_model(padding_noise=1e3), tmp_path / "pad.onnx")
    broken = save(hidden_model(token_noise=0.5), tmp_path / "tok.onnx")
    f = feeds()[0]
    np.savez(tmp_path / "val.npz", **f)
    options = quantkit.EvalOptions(variants=f"fp32,padding={noisy},tokens={broken}", latency=False)
    report = quantkit.evaluate(reference, tmp_path / "val.npz", options)
    assert any("padding left out: metrics count the 20 real tokens" in n for n in report.flags)
    padding, tokens = report.variant("padding"), report.variant("tokens")
    assert padding.fidelity[0].sqnr_db == float("inf") and not padding.collapsed
    # hidden = 1.5 x at real tokens: SQNR = 20 log10(1 / 0.5) = 6.02 dB, independent of the padding
    assert tokens.fidelity[0].sqnr_db == pytest.approx(20 * np.log10(2.0), abs=1e-3)
    # axis 1 is the sequence: no per-position "slices" (the last positions hold a real token or two)
    assert padding.fidelity[0].slices == [] and tokens.fidelity[0].slices == []


def test_the_tuning_evaluator_scores_real_tokens_only(tmp_path):
    import onnx
    from conftest import save

    import quantkit
    from quantkit.data.batching import Batch
    from quantkit.tuning.sensitivity import Evaluator

    info = quantkit.load_model(save(hidden_model(), tmp_path / "ref.onnx"))
    f = feeds()[0]
    evaluator = Evaluator(info, [Batch([f"s{i}" for i in range(B)], f)], objective="sqnr")
    assert evaluator.evaluate(onnx.load(str(save(hidden_model(padding_noise=1e3), tmp_path / "p.onnx")))).sqnr_db == float("inf")
    broken = evaluator.evaluate(onnx.load(str(save(hidden_model(token_noise=0.5), tmp_path / "t.onnx"))))
    assert broken.sqnr_db == pytest.approx(20 * np.log10(2.0), abs=1e-3)
