"""Scale-out on a local Ray instance with 2 workers: identical results, and no trial lost or duplicated."""

import json
import os

import numpy as np
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, conv_model, planted_case, save

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "ray>=2.9"')

import quantkit  # noqa: E402
from quantkit.scaleout.ray import KILL_ONCE_ENV, RayExecutor, ray_cluster, shard_bounds  # noqa: E402
from quantkit.tuning.search import run_search as tune  # noqa: E402
from quantkit.tuning.sensitivity import Evaluator  # noqa: E402
from quantkit.tuning.sensitivity import rank_nodes as analyze  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("kill")
    os.environ[KILL_ONCE_ENV] = str(marker_dir / "armed-later")  # workers inherit the driver's environment
    with ray_cluster(2) as r:
        yield r, marker_dir
    os.environ.pop(KILL_ONCE_ENV, None)


def test_shards_are_whole_batches():
    assert shard_bounds(200, 4, 32) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert shard_bounds(10, 4, 32) == [(0, 10)]


def test_sharded_calibration_is_byte_identical(cluster, tmp_path):
    path = save(conv_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    # later samples are larger: the range grows at shard boundaries, and merging must be exact
    data = rng.normal(size=(200, 3, 8, 8)).astype(np.float32) * np.linspace(0.1, 40, 200, dtype=np.float32)[:, None, None, None]
    np.save(tmp_path / "x.npy", data)
    single = quantkit.calibrate(
        path,
        tmp_path / "x.npy",
        quantkit.CalibrationOptions(methods="all"),
        out=tmp_path / "single",
        data_options=quantkit.DataOptions(batch_size=16),
    )
    sharded = quantkit.calibrate(
        path,
        tmp_path / "x.npy",
        quantkit.CalibrationOptions(methods="all"),
        out=tmp_path / "sharded",
        data_options=quantkit.DataOptions(batch_size=16),
        scale_out=quantkit.ScaleOut(workers=2),
    )
    for name in sorted(p.name for p in (tmp_path / "single").iterdir()):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert sharded.stats.histograms == single.stats.histograms


def test_sharded_image_folder_matches_too(cluster, tmp_path, demo_preprocess):
    options = quantkit.CalibrationOptions(methods="entropy,minmax")
    data = quantkit.DataOptions(num_samples=160, preprocess=demo_preprocess)
    one = quantkit.calibrate(DEMO_MODEL, DEMO_CALIB, options, data_options=data).ranges
    two = quantkit.calibrate(DEMO_MODEL, DEMO_CALIB, options, data_options=data, scale_out=quantkit.ScaleOut(workers=2)).ranges
    assert two.dumps() == one.dumps()


def _planted(tmp_path):
    return planted_case(tmp_path, val_samples=256)


def test_distributed_sensitivity_equals_single_process(cluster, tmp_path):
    r, _ = cluster
    info, ranges, data = _planted(tmp_path)
    local = analyze(info, ranges, Evaluator(info, data, None, None), method="minmax")
    executor = RayExecutor(r, info, ranges, "minmax", "tensorrt", workers=2)
    remote = analyze(info, ranges, Evaluator(info, data, None, None), method="minmax", executor=executor)
    assert remote.ranking() == local.ranking()
    assert [n.to_json() for n in remote.nodes] == [n.to_json() for n in local.nodes]


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, tmp_path):
    r, marker_dir = cluster
    info, ranges, data = _planted(tmp_path)
    reference = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path / "local",
        quantkit.TuneOptions(max_drop=1.0),
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    armed = marker_dir / "armed-later"
    armed.mkdir()  # from now on, the first task to run kills its worker once
    executor = RayExecutor(r, info, ranges, "minmax", "tensorrt", workers=2)
    result = tune(
        info,
        ranges,
        Evaluator(info, data, None, None),
        tmp_path / "ray",
        quantkit.TuneOptions(max_drop=1.0),
        executor=executor,
        export=quantkit.ExportOptions(method="minmax", allow_missing=True),
    )
    assert (armed / "killed").exists()
    history = json.loads((tmp_path / "ray" / "tune_history.json").read_text())
    plans = [tuple(sorted(t["fallback"])) for t in history["trials"]]
    assert len(plans) == len(set(plans))  # no trial duplicated
    assert [t["trial"] for t in history["trials"]] == list(range(len(plans)))  # none lost
    assert any("retried after its worker died" in n for n in history["notes"] + result.sensitivity.notes)
    assert sorted(result.best.fallback) == sorted(reference.best.fallback) == ["conv3", "conv5"]


def test_cli_sensitivity_on_two_workers(cluster, tmp_path):
    from quantkit.cli import main

    _planted(tmp_path)
    args = [str(tmp_path / "planted.onnx"), "--calib", str(tmp_path / "calib.npy"), "--data", str(tmp_path / "val.npy")]
    args += ["--method", "minmax"]
    assert main(["sensitivity", *args, "--workers", "2", "--out-dir", str(tmp_path / "s"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert {n["name"] for n in doc["nodes"][:2]} == {"conv3", "conv5"}
