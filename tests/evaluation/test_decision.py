"""A report that ends in a decision (issue 31): a large loss is flagged without --max-drop, and
what to ship per target never is a variant that loses more than the budget."""

from __future__ import annotations

import json

import onnx
from conftest import save
from onnx import numpy_helper
from test_class_names import ANGLES, brightness_classifier, image_folders

from quantkit.cli import main
from quantkit.options import DEFAULT_MAX_DROP


def test_a_large_loss_is_flagged_by_default_and_never_shipped(tmp_path):
    good = save(brightness_classifier({"character": "\n".join(ANGLES)}), tmp_path / "m.onnx")
    worse = brightness_classifier({})
    levels = next(i for i in worse.graph.initializer if i.name == "levels")
    levels.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(levels)[:, ::-1].copy(), "levels"))  # classes reversed
    bad = save(worse, tmp_path / "bad.onnx")
    data = image_folders(tmp_path / "val", ANGLES)
    argv = ["eval", str(good), "--data", str(data), "--color", "L", "--scale", str(1 / 255), "--metric", "top1"]
    assert main([*argv, "--variants", f"fp32,fp16,reversed={bad}", "--out-dir", str(tmp_path / "r"), "-q"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["max_drop"] == DEFAULT_MAX_DROP
    assert any(f.startswith("reversed loses 100.00 points") for f in report["flags"])
    decision = {d["target"]: d for d in report["decision"]}
    assert decision["onnxruntime on this CPU"]["variant"] in ("fp32", "fp16")
    trt = decision["TensorRT on a GPU"]
    assert trt["variant"] == "fp16" and any("quantkit fp16" in c for c in trt["commands"])
    v10 = next(c for c in trt["commands"] if c.startswith("# TensorRT 10.x"))
    assert "--stronglyTyped" in v10 and "--fp16" not in v10  # an FP16 model builds strongly typed
    assert "## Decision" in (tmp_path / "r" / "report.md").read_text().split("## Per-output fidelity")[1]
    assert onnx.load(str(bad))  # the variant file is untouched and still a model
