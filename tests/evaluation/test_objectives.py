"""Objectives against closed forms: detection F1 from hand-placed boxes, IoU from hand-counted
masks, SQNR and cosine against the fidelity module's own implementations, and the default choice."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main
from quantkit.data.batching import join_outputs
from quantkit.errors import QuantkitError
from quantkit.evaluation.metrics import cosine, sqnr_db
from quantkit.evaluation.objectives import choose_objective, decode_detections, match_counts, objective
from quantkit.evaluation.run import evaluate
from quantkit.options import EvalOptions

C = 3  # classes of the synthetic heads


def yolo_head(boxes: list[list[tuple[float, float, float, float, int, float]]], anchors: int = 400) -> np.ndarray:
    """[N, 4+C, anchors] (fields first): each (cx, cy, w, h, class, score) on its own anchor, the rest empty."""
    head = np.zeros((len(boxes), 4 + C, anchors), np.float32)
    head[:, :4] = 1.0  # empty anchors: tiny boxes with no score
    for n, sample in enumerate(boxes):
        for a, (cx, cy, w, h, cls, score) in enumerate(sample):
            head[n, :4, a] = cx, cy, w, h
            head[n, 4 + cls, a] = score
    return head


SCENE = [
    [(20, 20, 10, 10, 0, 0.9), (60, 60, 20, 10, 1, 0.8), (100, 30, 8, 16, 2, 0.7)],
    [(40, 40, 30, 30, 0, 0.95), (40, 41, 30, 30, 0, 0.6)],  # a duplicate that NMS removes
]


def test_detection_f1_closed_form():
    reference = yolo_head(SCENE)
    f1 = objective("detection-f1", conf=0.25)
    assert f1.measure([reference], [reference], None).value == 1.0
    assert [len(d) for d in decode_detections(reference, 0.25)] == [3, 1]  # the duplicate is suppressed
    worse = reference.copy()
    worse[0, 4 + 2, 2] = 0.1  # one detection falls below conf: a false negative
    worse[1, 4 + 1, 10] = 0.5  # a new box of another class where FP32 has none: a false positive
    worse[1, :4, 10] = 100, 100, 5, 5
    tp, fp, fn = 3, 1, 1  # over both images: 2 + 1 matched, 1 new, 1 lost
    assert f1.measure([worse], [reference], None).value == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # the same head anchors-first gives the same figure
    assert f1.measure([worse.transpose(0, 2, 1)], [reference.transpose(0, 2, 1)], None).value == pytest.approx(0.75)
    moved = reference.copy()
    moved[0, 0, 0] += 6  # IoU of a 10x10 box shifted by 6: 40/160 = 0.25 < 0.5, so no match
    assert f1.measure([moved], [reference], None).value == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_detection_f1_against_box_labels():
    reference = yolo_head(SCENE)
    labels = [np.array([[0, 15, 15, 25, 25], [1, 50, 55, 70, 65]]), np.array([[2, 25, 25, 55, 55]])]  # class, x1, y1, x2, y2
    # sample 0: two of three found match (the third is an extra); sample 1: a box of class 0 where the label says 2
    assert objective("detection-f1").measure([reference], [reference], labels).value == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))


def test_match_counts_is_greedy_by_score_and_class_aware():
    truth = np.array([[0, 0, 10, 10, 1.0, 0]])
    found = np.array([[0, 0, 10, 10, 0.5, 0], [0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.95, 1]])
    assert match_counts(found, truth) == (1, 2, 0)


def test_mask_iou_closed_form():
    ref = np.zeros((2, 1, 16, 16), np.float32)
    ref[0, 0, :8, :8] = 0.9  # 64 pixels
    ref[1, 0, 4:12, 4:12] = 0.8
    got = ref.copy()
    got[0, 0, :8, 6:8] = 0.2  # 16 pixels lost
    got[1, 0, 12:14, 4:12] = 0.7  # 16 pixels added
    iou = objective("mask-iou", threshold=0.5).measure([got], [ref], None).value
    assert iou == pytest.approx((48 + 64) / (64 + 80))  # intersection and union summed over the set
    seg_ref = np.zeros((1, 3, 16, 16), np.float32)
    seg_ref[0, 0] = 1
    seg_ref[0, 1, :, :4] = 2  # class 1 wins the first four columns
    seg = seg_ref.copy()
    seg[0, 2, :, 12:] = 3  # class 2 takes the last four columns from class 0
    # class 0: 128/192, class 1: 64/64, class 2: absent in FP32, 0/64 -> mean over present classes
    assert objective("mask-iou").measure([seg], [seg_ref], None).value == pytest.approx((128 / 192 + 1 + 0) / 3)


def test_sqnr_and_cosine_agree_with_the_fidelity_functions():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(16, 10)).astype(np.float32)
    got = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    assert objective("sqnr").measure([got], [ref], None).value == pytest.approx(sqnr_db(ref, got))
    per_sample = np.mean([cosine(r, g) for r, g in zip(ref, got, strict=True)])
    assert objective("cosine").measure([got], [ref], None).value == pytest.approx(per_sample)
    assert objective("sqnr").drop(40.0, 37.5) == 2.5 and objective("agreement").drop(1.0, 0.98) == pytest.approx(2.0)


def test_the_default_follows_the_outputs_and_labels():
    head = yolo_head(SCENE)

    def name(shape, labelled=False, ref=None):
        return choose_objective([shape], labelled, ref).name

    assert name((8, 1000), labelled=True) == "top1"
    assert name((8, 1000, 1, 1)) == "agreement"
    assert name(head.shape, ref=head) == "detection-f1"
    assert name((1, 8400, 84)) == "detection-f1"
    assert name((4, 1, 64, 64), ref=np.random.default_rng(0).random((4, 1, 64, 64))) == "mask-iou"
    assert name((4, 1, 64, 64), ref=np.random.default_rng(0).normal(size=(4, 1, 64, 64))) == "cosine"  # not probabilities
    assert name((2, 128, 384)) == "cosine"  # a transformer's hidden states are not a detection head
    assert name((2, 384)) in ("agreement",) and name((2, 1)) == "cosine"
    logits = head.copy()
    logits[:, 4:] = -5.0  # class logits outside [0, 1]: not a YOLO head with sigmoid scores
    assert name(logits.shape, ref=logits) == "cosine"
    assert "detection head" in choose_objective([head.shape], False, head).reason


def test_bad_objective_requests_fail_clearly(tmp_path):
    with pytest.raises(QuantkitError, match="unknown metric 'iou'"):
        objective("iou")
    with pytest.raises(QuantkitError, match="conf must be a number in"):
        objective("detection-f1", conf=2.0)
    with pytest.raises(QuantkitError, match="is not a file"):
        objective(f"{tmp_path}/nothing.py:f")
    (tmp_path / "m.py").write_text("def f(outputs, reference, labels):\n    return [1.0, 2.0]\n")
    with pytest.raises(QuantkitError, match="one per sample"):
        objective(f"{tmp_path}/m.py:f").measure([np.zeros((3, 2))], [np.zeros((3, 2))], None)
    with pytest.raises(QuantkitError, match="has no function g"):
        objective(f"{tmp_path}/m.py:g")
    with pytest.raises(QuantkitError, match="detection-f1 needs a YOLO-style head"):
        objective("detection-f1").measure([np.zeros((2, 10))], [np.zeros((2, 10))], None)


def detector_model() -> onnx.ModelProto:
    """x[N,3,32,32] -> 1x1 Conv to 4+C fields -> [N, 4+C, 1024] -> Sigmoid -> scaled: a YOLO-style head."""
    rng = np.random.default_rng(5)
    w = rng.normal(scale=1.5, size=(4 + C, 3, 1, 1)).astype(np.float32)
    b = np.array([0, 0, -1, -1, -3, -3, -3], np.float32)  # few anchors score above conf
    scale = np.array([32, 32, 12, 12, 1, 1, 1], np.float32).reshape(1, 4 + C, 1)
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, b.shape, b),
        helper.make_tensor("shape", TensorProto.INT64, [3], [0, 4 + C, -1]),
        helper.make_tensor("scale", TensorProto.FLOAT, scale.shape, scale.ravel()),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="head_conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="flatten"),
        helper.make_node("Sigmoid", ["r"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["s", "scale"], ["output0"], name="scale"),
    ]
    return float_model(nodes, {"x": ["N", 3, 32, 32]}, {"output0": ["N", 4 + C, 1024]}, inits)


def test_eval_chooses_and_reports_detection_f1_and_runs_a_user_metric(tmp_path, capsys):
    model = save(detector_model(), tmp_path / "det.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(16, 3, 32, 32)).astype(np.float32))
    np.save(tmp_path / "val.npy", rng.normal(size=(12, 3, 32, 32)).astype(np.float32))
    (tmp_path / "mine.py").write_text(
        "import numpy as np\n"
        "def score_gap(outputs, reference, labels):\n"
        "    return 1.0 - np.abs(outputs[0][:, 4:] - reference[0][:, 4:]).reshape(len(outputs[0]), -1).max(axis=1)\n"
    )
    common = ["eval", str(model), "--data", str(tmp_path / "val.npy"), "--calib", str(tmp_path / "calib.npy")]
    common += ["--variants", "fp32,int8:minmax", "--no-latency"]
    assert main([*common, "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "objective: detection-f1 (conf=0.25): the first output [12, 7, 1024] is a detection head" in out
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert doc["metrics"] == ["detection-f1"] and doc["schema_version"] == 2
    fp32, int8 = doc["variants"]
    assert fp32["metrics"]["detection-f1"] == 1.0 and 0.0 < int8["metrics"]["detection-f1"] <= 1.0
    assert "Objective: detection-f1" in (tmp_path / "r" / "report.md").read_text()
    assert main([*common, "--metric", f"detection-f1,{tmp_path}/mine.py:score_gap", "--conf", "0.5", "--out-dir", str(tmp_path / "u")]) == 0
    doc = json.loads((tmp_path / "u" / "report.json").read_text())
    assert doc["metrics"] == ["detection-f1", "score_gap"] and "conf=0.5" in doc["objective"]
    assert doc["variants"][0]["metrics"]["score_gap"] == 1.0 and doc["variants"][1]["noise"]["score_gap"] > 0
    assert main([*common, "--metric", "top1", "--out-dir", str(tmp_path / "x")]) == 2
    assert "needs labels" in capsys.readouterr().err


def test_an_objective_that_says_nothing_is_flagged(tmp_path):
    empty = yolo_head([[], []])  # FP32 detects nothing: every variant would score F1 1.0
    measured = objective("detection-f1").measure([empty], [empty], None)
    assert measured.value == 1.0 and "no detection at conf 0.25" in measured.warning()
    assert objective("detection-f1").measure([yolo_head(SCENE)], [yolo_head(SCENE)], None).warning() == ""
    dark = np.zeros((2, 1, 16, 16), np.float32)
    assert "no pixel is above 0.5" in objective("mask-iou").measure([dark], [dark], None).warning()
    # a low conf keeps NMS bounded: every anchor of a 21504-anchor head scores above 0
    busy = np.random.default_rng(0).random((1, 15, 21504)).astype(np.float32) * 100
    assert len(decode_detections(busy, 0.0)[0]) <= 300


def test_eval_flags_a_detector_that_finds_nothing(tmp_path):
    proto = detector_model()
    for init in proto.graph.initializer:
        if init.name == "b":
            init.CopyFrom(numpy_helper.from_array(np.array([0, 0, -1, -1, -30, -30, -30], np.float32), "b"))
    model = save(proto, tmp_path / "dark.onnx")
    np.save(tmp_path / "val.npy", np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32))
    report = evaluate(model, tmp_path / "val.npy", EvalOptions(variants="fp32", latency=False))
    assert any("detection-f1: the reference has no detection" in f for f in report.flags)


def test_a_state_batched_on_axis_1_joins_and_is_scored_per_sample():
    """flashvad's next_recurrent is [1, N, 64]: eval and tune joined its runs on axis 0 and then
    could not put it beside [N, 1] (internal error)."""
    rng = np.random.default_rng(0)
    runs = [(rng.normal(size=(5, 1)), rng.normal(size=(1, 5, 8))), (rng.normal(size=(3, 1)), rng.normal(size=(1, 3, 8)))]
    logits = join_outputs([r[0] for r in runs], [5, 3])
    state = join_outputs([r[1] for r in runs], [5, 3])
    assert logits.shape == (8, 1) and state.shape == (1, 8, 8)
    np.testing.assert_array_equal(state[0, 5:], runs[1][1][0])
    cos = objective("cosine").stats([logits, -state], [logits, state], None)
    # per sample: the logit agrees, the 8 state values are negated: cos = (l^2 - |s|^2) / (l^2 + |s|^2)
    l2, s2 = logits[:, 0] ** 2, np.sum(state[0] ** 2, axis=1)
    np.testing.assert_allclose(cos, (l2 - s2) / (l2 + s2))
