"""Shapes: letterbox preprocessing, the stride a feature pyramid needs, and build's optimization profile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DEMO_MODEL, float_model, save
from onnx import TensorProto, helper
from PIL import Image

from quantkit.cli import main
from quantkit.data import PreprocessSpec, batches, open_source
from quantkit.data.batching import first_sample
from quantkit.errors import QuantkitError
from quantkit.model import load_model


def test_letterbox_keeps_the_aspect_and_pads_evenly():
    image = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))  # 40 wide, 20 high
    spec = PreprocessSpec.from_mapping({"resize": "32x32", "letterbox": True, "scale": 1.0, "layout": "NCHW", "color": "RGB"})
    arr = spec.apply(image)
    assert arr.shape == (3, 32, 32)
    # scaled by 32/40 to 32x16, centred: 8 grey rows above and below
    assert (arr[:, :8] == 114).all() and (arr[:, 24:] == 114).all() and (arr[:, 8:24] == 200).all()
    with pytest.raises(QuantkitError, match="letterbox needs resize as HxW"):
        PreprocessSpec.from_mapping({"resize": 32, "letterbox": True})


def pyramid_model():
    """x[N,3,H,W] -> conv s2 -> conv s2 -> 2x upsample -> Concat with the s2 map: an FPN join at 1/4."""
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(size=108).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 3, 3], rng.normal(size=144).astype(np.float32))
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="down1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="down2"),
        helper.make_node("Resize", ["c2", "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("Concat", ["c1", "up"], ["y"], axis=1, name="join"),
    ]
    return float_model(nodes, {"x": ["N", 3, "H", "W"]}, {"y": ["N", 8, "h", "w"]}, [w1, w2, scales])


def test_a_size_the_pyramid_cannot_take_is_caught_before_onnxruntime(tmp_path):
    info = load_model(save(pyramid_model(), tmp_path / "fpn.onnx"))
    assert info.inputs[0].stride == 4
    assert load_model(DEMO_MODEL).inputs[0].stride == 1  # a classifier joins no paths of different depth
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 30, 30), np.float32))
    with pytest.raises(QuantkitError, match=r"30x30, but the model's height and width must be multiples of 4.*32x32.*letterbox") as refused:
        list(batches(open_source(tmp_path / "bad.npy", info), info, 2))
    assert refused.value.option == ("resize", "letterbox")  # the CLI shows (--resize, --letterbox)
    np.save(tmp_path / "good.npy", np.zeros((2, 3, 32, 24), np.float32))
    assert len(list(batches(open_source(tmp_path / "good.npy", info), info, 2))) == 1


def test_build_takes_its_profile_from_calibration_and_warns_without_one(tmp_path, capsys):
    model = save(pyramid_model(), tmp_path / "fpn.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).normal(size=(10, 3, 32, 64)).astype(np.float32))
    assert (
        main(["calibrate", str(model), "--data", str(tmp_path / "calib.npy"), "--batch-size", "4", "--out-dir", str(tmp_path / "c"), "-q"])
        == 0
    )
    assert json.loads((tmp_path / "c" / "ranges.json").read_text())["calibration"]["input_shapes"]["x"] == [[4, 3, 32, 64], [2, 3, 32, 64]]
    main(["build", str(model), "--ranges", str(tmp_path / "c" / "ranges.json"), "-o", str(tmp_path / "fpn.engine")])
    out, err = capsys.readouterr()
    assert "--minShapes=x:1x3x32x64 --optShapes=x:4x3x32x64 --maxShapes=x:4x3x32x64" in out and "no optimization profile" not in err
    main(["build", str(model), "-o", str(tmp_path / "fpn2.engine")])
    out, err = capsys.readouterr()
    assert "# warning: x[Nx3xHxW] float32 has dynamic dimensions and no optimization profile" in out and "--minShapes" not in out
    assert len(err.strip().splitlines()) == 1  # the error alone: the warning sits with the trtexec lines it is about


def test_first_sample_cuts_each_input_along_its_batch_axis_and_keeps_a_shared_one(tmp_path):
    """A VAD's inputs: audio [N, 512], a state batched on axis 1 ([2, N, 8]) and a scalar sample rate
    shared by every sample (tune's latency took v[:1] of each, which a 0-d input cannot give)."""
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["state"], ["stateN"])]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", 8]),
        ],
    )
    model = load_model(save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "vad.onnx"))
    x, state, sr = np.arange(3 * 512.0).reshape(3, 512), np.arange(2 * 3 * 8.0).reshape(2, 3, 8), np.array(16000)
    one = first_sample(model, {"x": x, "state": state, "sr": sr})
    np.testing.assert_array_equal(one["x"], x[:1])
    np.testing.assert_array_equal(one["state"], state[:, :1])
    assert one["sr"] is sr
