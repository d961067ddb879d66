import json

import numpy as np
import pytest
from conftest import planted_case

import quantkit
from quantkit.cli import main
from quantkit.evaluation.metrics import METRICS
from quantkit.export.qdq import quantize_model
from quantkit.plan import PrecisionPlan
from quantkit.tuning.search import run_search as tune
from quantkit.tuning.sensitivity import Evaluator
from quantkit.tuning.sensitivity import rank_nodes as analyze


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    return (tmp, *planted_case(tmp))


def test_sensitivity_ranks_the_planted_nodes_first(planted):
    _, info, ranges, data = planted
    result = analyze(info, ranges, Evaluator(info, data, None, None), method="minmax")
    assert set(result.ranking()[:2]) == {"conv3", "conv5"}
    assert result.all_int8.accuracy < 0.5 and result.baseline.accuracy == 1.0
    by_name = {n.name: n for n in result.nodes}
    assert by_name["conv3"].enable_one_loss > 50 and by_name["conv1"].enable_one_loss < 5


def test_tune_falls_back_exactly_the_planted_nodes_not_a_prefix(planted, tmp_path):
    _, info, ranges, data = planted
    result = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path,
        quantkit.TuneOptions(max_drop=1.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert result.target_met and sorted(result.best.fallback) == ["conv3", "conv5"]
    history = json.loads((tmp_path / "tune_history.json").read_text())
    assert len(history["trials"]) == len(result.trials) and history["best_trial"] == result.best.index
    # the plan round-trips through quantize: exactly those nodes stay unquantized
    plan = PrecisionPlan.load(tmp_path / "precision_plan.json")
    _, report = quantize_model(info, ranges, method="minmax", plan=plan)
    assert set(report.int8_nodes) == {"conv1", "conv2", "conv4", "conv6", "head"}
    assert report.kept_float["conv3"] == "plan: fp32" and report.kept_float["conv5"] == "plan: fp32"
    assert (tmp_path / "planted.tuned.onnx").exists()


def test_forced_stop_keeps_the_full_history_and_the_best_plan(planted, tmp_path):
    _, info, ranges, data = planted
    result = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path,
        quantkit.TuneOptions(max_drop=1.0, max_trials=3),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert result.stopped == "max-trials" and len(result.trials) == 3
    history = json.loads((tmp_path / "tune_history.json").read_text())
    assert [t["trial"] for t in history["trials"]] == [0, 1, 2]
    assert all({"fallback", "accuracy", "drop_points", "meets_target", "latency_ms"} <= set(t) for t in history["trials"])
    best = PrecisionPlan.load(tmp_path / "precision_plan.json")  # the best so far: the all-fallback trial, which meets
    assert result.best.meets and set(best.nodes) == set(result.best.fallback)
    timed = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path / "t",
        quantkit.TuneOptions(max_drop=1.0, timeout=0.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert timed.stopped == "timeout" and (tmp_path / "t" / "tune_history.json").exists()


def test_target_already_met_and_unreachable(planted, tmp_path):
    _, info, ranges, data = planted
    easy = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path / "a",
        quantkit.TuneOptions(max_drop=100.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert easy.best.fallback == [] and any("already meets" in m for m in easy.messages)
    hard = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path / "b",
        quantkit.TuneOptions(max_drop=-1.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert not hard.target_met and any("cannot be met" in m for m in hard.messages)
    assert (tmp_path / "b" / "precision_plan.json").exists()  # the best found is still saved


def test_cli_tune_and_sensitivity(planted, tmp_path, capsys):
    tmp, _, _, _ = planted
    args = [str(tmp / "planted.onnx"), "--calib", str(tmp / "calib.npy"), "--data", str(tmp / "val.npy"), "--method", "minmax"]
    assert main(["sensitivity", *args, "--out-dir", str(tmp_path / "s"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert {n["name"] for n in doc["nodes"][:2]} == {"conv3", "conv5"}
    page = (tmp_path / "s" / "sensitivity.html").read_text()
    assert page.count("<svg") == 2 and "Local SQNR per node" in page  # the gains and each node's own error
    assert main(["tune", *args, "--max-drop", "1", "--fallback", "fp16", "--start-from-known", "--out-dir", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "known-sensitive start" in out
    plan = json.loads((tmp_path / "t" / "precision_plan.json").read_text())
    assert {"conv3", "conv5"} <= set(plan["nodes"]) and set(plan["nodes"].values()) == {"fp16"}
    assert "chosen" in (tmp_path / "t" / "tune_report.html").read_text()


def test_the_objective_noise_is_the_binomial_standard_error(planted):
    _, info, ranges, data = planted
    result = analyze(info, ranges, Evaluator(info, data[:1], None, None), method="minmax", subset=None)
    assert result.notes[0].startswith("objective: agreement")
    assert result.all_int8.noise == 0.0 or any("standard error" in n for n in result.notes)
    labels = [int(i % 10) for i in range(64)]
    ev = Evaluator(info, data[:1], ("top1", METRICS["top1"]), labels)
    p = ev.baseline.accuracy
    # the bootstrap over samples against the closed form of a proportion's standard error
    assert ev.baseline.noise == pytest.approx(100 * np.sqrt(p * (1 - p) / 64), rel=0.15)


def test_target_finer_than_the_standard_error_warns(planted, tmp_path):
    _, info, ranges, data = planted
    labels = [int(i % 10) for i in range(64)]
    ev = Evaluator(info, data[:1], ("top1", METRICS["top1"]), labels)
    result = tune(
        info,
        ranges,
        ev,
        tmp_path,
        quantkit.TuneOptions(max_drop=0.5, max_trials=1),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert any("standard error" in m and "use more validation samples" in m for m in result.messages)


def test_a_missed_target_is_named_so_and_exits_non_zero(planted, tmp_path, capsys):
    tmp, _, _, _ = planted
    args = [str(tmp / "planted.onnx"), "--calib", str(tmp / "calib.npy"), "--data", str(tmp / "val.npy"), "--method", "minmax"]
    code = main(["tune", *args, "--max-drop", "-1", "--out-dir", str(tmp_path / "t"), "--quiet"])
    assert code == 4 and "was not met" in capsys.readouterr().err
    assert (tmp_path / "t" / "planted.tuned.misses-target.onnx").exists()
    assert not (tmp_path / "t" / "planted.tuned.onnx").exists()


def test_a_broken_best_model_is_never_written(planted, tmp_path, capsys):
    """Stopped after the all-INT8 trial, whose output is all zeros: history and plan, no model."""
    tmp, _, _, _ = planted
    args = [str(tmp / "planted.onnx"), "--calib", str(tmp / "calib.npy"), "--data", str(tmp / "val.npy"), "--method", "minmax"]
    code = main(["tune", *args, "--max-trials", "1", "--out-dir", str(tmp_path / "t"), "--quiet"])
    assert code == 3 and "broken" in capsys.readouterr().err
    assert (tmp_path / "t" / "tune_history.json").exists()
    assert not list((tmp_path / "t").glob("*.onnx"))


def test_timeout_holds_during_sensitivity(planted, tmp_path):
    _, info, ranges, data = planted
    result = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path,
        quantkit.TuneOptions(max_drop=1.0, timeout=0.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert result.stopped == "timeout" and any("sensitivity stopped after 0 of" in m for m in result.messages)
    assert len(result.trials) == 1  # the all-INT8 trial, which always runs


def test_sqnr_ranking_finds_the_planted_nodes_with_two_passes(planted, tmp_path):
    _, info, ranges, data = planted
    ev = Evaluator(info, data, None, None)
    result = analyze(info, ranges, ev, method="minmax", ranking="sqnr")
    assert set(result.ranking()[:2]) == {"conv3", "conv5"} and result.evaluations == 1  # the all-INT8 pass only
    by_name = {n.name: n for n in result.nodes}
    # conv5's own error shows although conv3 has already collapsed the all-INT8 signal before it
    assert by_name["conv5"].output_sqnr_db < 1 and by_name["conv5"].local_sqnr_db < 10 < by_name["conv1"].local_sqnr_db
    tuned = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path,
        quantkit.TuneOptions(max_drop=1.0, ranking="sqnr"),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert tuned.target_met and sorted(tuned.best.fallback) == ["conv3", "conv5"]


def test_choose_method_tunes_the_method_whose_all_int8_scores_best(planted, tmp_path):
    import quantkit
    from quantkit.tuning.sensitivity import build_candidate

    tmp, info, _, data = planted
    ranges = quantkit.calibrate(
        tmp / "planted.onnx", tmp / "calib.npy", quantkit.CalibrationOptions(methods="minmax,percentile,entropy")
    ).ranges
    ev = Evaluator(info, data, None, None)
    plan = PrecisionPlan(default="int8")
    alone = {m: ev.evaluate(build_candidate(info, ranges, plan, method=m, target="tensorrt")).accuracy for m in ranges.methods}
    best = max(ranges.methods, key=lambda m: (alone[m], -list(ranges.methods).index(m)))
    result = tune(info, ranges, Evaluator(info, data, None, None), tmp_path, quantkit.TuneOptions(max_drop=1.0, choose_method=True))
    assert result.method == best and any(m.startswith("all-INT8 by calibration method") for m in result.messages)
    history = json.loads((tmp_path / "tune_history.json").read_text())
    assert history["method"] == best and history["all_int8_by_method"] == pytest.approx(alone)
