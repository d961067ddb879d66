"""The Python API end to end on a model of the user's own (not the demo): calibrate, quantize with the
fidelity check, evaluate. Each step's result is checked against what the same stage's command writes."""

import numpy as np
import onnx
import pytest
from conftest import conv_model, save

import quantkit
from quantkit.cli import main


@pytest.fixture()
def own_model(tmp_path):
    path = save(conv_model(channels=3), tmp_path / "mine.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(64, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "val.npy", rng.normal(size=(48, 3, 8, 8)).astype(np.float32))
    return tmp_path, path


def test_calibrate_quantize_evaluate_through_the_api(own_model):
    tmp, path = own_model
    before = path.read_bytes()
    calibrated = quantkit.calibrate(path, tmp / "calib.npy", quantkit.CalibrationOptions(methods="minmax,entropy"), out=tmp / "cal")
    assert set(calibrated.ranges.methods) == {"minmax", "entropy"} and (tmp / "cal" / "ranges.json").exists()

    options = quantkit.QuantizeOptions(ranges=tmp / "cal" / "ranges.json", method="minmax")
    result = quantkit.quantize(path, tmp / "mine.int8.onnx", options, data=tmp / "val.npy")
    assert result.fidelity.ok and result.output.exists() and path.read_bytes() == before
    written = onnx.load(str(result.output))
    assert sum(n.op_type == "QuantizeLinear" for n in written.graph.node) == len(result.report.activation_params) > 0
    assert {p.key: p.value for p in written.metadata_props}["quantkit.method"] == "minmax"

    # the command writes the same bytes as the API (one implementation, two ways in)
    cli_out = tmp / "cli.int8.onnx"
    ranges = str(tmp / "cal" / "ranges.json")
    assert (
        main(["quantize", str(path), "--ranges", ranges, "--method", "minmax", "--data", str(tmp / "val.npy"), "-o", str(cli_out), "-q"])
        == 0
    )
    assert cli_out.read_bytes() == result.output.read_bytes()

    report = quantkit.evaluate(path, tmp / "val.npy", quantkit.EvalOptions(variants="fp32,int8:minmax", latency=False), ranges_path=ranges)
    int8 = report.variant("int8:minmax")
    assert int8.error is None and report.variant("fp32").metrics[report.metric_names[0]] == pytest.approx(1.0)
    assert int8.fidelity[0].sqnr_db > 20  # a healthy INT8 conv net


def test_the_api_check_refuses_a_broken_model_and_writes_nothing(own_model):
    tmp, path = own_model
    quantkit.calibrate(path, tmp / "calib.npy", quantkit.CalibrationOptions(methods="minmax"), out=tmp / "cal")
    options = quantkit.QuantizeOptions(ranges=tmp / "cal" / "ranges.json")
    strict = quantkit.CheckOptions(min_sqnr=200.0)  # no INT8 model is that close to FP32
    with pytest.raises(quantkit.QuantkitError, match="the new model is broken") as refused:
        quantkit.quantize(path, tmp / "x.onnx", options, data=tmp / "val.npy", check=strict)
    assert refused.value.exit_code == 3 and refused.value.check is not None and not (tmp / "x.onnx").exists()
    forced = quantkit.quantize(path, tmp / "x.onnx", options, data=tmp / "val.npy", check=quantkit.CheckOptions(min_sqnr=200.0, force=True))
    assert not forced.fidelity.ok and "wrote a broken model (forced)" in forced.summary()
