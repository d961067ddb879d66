import html
import json
import math
import re
import shutil
import subprocess

import jsonschema
import numpy as np
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_PREPROCESS, DEMO_VAL

import quantkit
from quantkit.backends.ort import runtime_providers
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.evaluation.metrics import cosine, fidelity, sqnr_db, top1_agreement, top_k
from quantkit.evaluation.run import evaluate
from quantkit.evaluation.variants import parse_variants
from quantkit.report.eval import SCHEMA_PATH, to_json, write_report

# ---- metrics against hand-computed values -------------------------------------------------------


def test_sqnr_of_a_known_perturbation():
    ref = np.ones(1000)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)  # signal 1, noise 0.01 per element
    assert sqnr_db(ref, ref * 1.01) == pytest.approx(40.0)
    assert sqnr_db(ref, ref) == math.inf and sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


def test_cosine_and_agreement_and_top_k():
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(-1.0)
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = [1, 1, 2, 1]
    assert top_k(1)([scores], labels) == 0.5  # rows 0 and 2
    assert top_k(2)([scores], labels) == 1.0
    other = scores.copy()
    other[3] = [0.1, 0.8, 0.1]
    assert top1_agreement(scores, other) == 0.75


def test_a_collapsed_slice_is_caught_where_the_whole_output_looks_fine():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 640, size=(8, 4, 100))  # large box coordinates
    scores = rng.uniform(0, 1, size=(8, 80, 100))
    ref = np.concatenate([boxes, scores], axis=1)
    out = ref.copy()
    out[:, 4:] = 0.0  # every class score zeroed, as a shared int8 scale does
    f = fidelity("output0", ref, out)
    assert f.sqnr_db > 20  # the whole tensor still looks good
    assert len(f.collapsed_slices) == 80 and all(s.start >= 4 for s in f.collapsed_slices)
    named = fidelity("output0", ref, out, slices=[(1, 0, 4), (1, 4, 84)])
    assert [s.collapsed for s in named.slices] == [False, True]


def test_variant_parsing():
    names = [(s.name, s.kind, s.method, s.target) for s in parse_variants("fp16,int8:mse,int8-tensorrt:entropy", "ort-cpu")]
    assert names == [
        ("fp32", "fp32", None, None),
        ("fp16", "fp16", None, None),
        ("int8:mse", "int8", "mse", "onnxruntime"),
        ("int8-tensorrt:entropy", "int8", "entropy", "tensorrt"),
    ]
    with pytest.raises(QuantkitError, match="unknown variant"):
        parse_variants("int4", "ort-cpu")
    with pytest.raises(QuantkitError, match="int8"):
        parse_variants("int8:kl", "ort-cpu")


# ---- the demo end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, demo_preprocess):
    out = tmp_path_factory.mktemp("report")
    result = evaluate(
        DEMO_MODEL,
        DEMO_VAL,
        quantkit.EvalOptions(
            variants="fp32,fp16,int8:entropy,int8:minmax,int8:percentile,int8:mse,int8-tensorrt:entropy,modelopt",
            num_calib_samples=256,
            max_drop=1.0,
        ),
        calib=DEMO_CALIB,
        data_options=quantkit.DataOptions(preprocess=demo_preprocess),
    )
    write_report(result, out)
    return result, out


def test_report_covers_every_variant_and_validates(demo_report):
    result, out = demo_report
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc == json.loads(json.dumps(to_json(result)))
    by_name = {v["name"]: v for v in doc["variants"]}
    assert list(by_name) == [
        "fp32",
        "fp16",
        "int8:entropy",
        "int8:minmax",
        "int8:percentile",
        "int8:mse",
        "int8-tensorrt:entropy",
        "modelopt",
    ]
    fp32 = by_name["fp32"]["metrics"]["top1"]
    assert fp32 == pytest.approx(0.981)
    for name in ["fp16", "int8:entropy", "int8:minmax", "int8:percentile", "int8:mse", "int8-tensorrt:entropy"]:
        v = by_name[name]
        assert v["error"] is None and v["metrics"]["top1"] >= fp32 - 0.01 and v["size_bytes"] < by_name["fp32"]["size_bytes"]
        # TensorRT's format is fake quantization on a CPU: measured for accuracy only, never timed as a CPU candidate
        assert (v["latency"] is None) == (name == "int8-tensorrt:entropy")
        assert name != "int8-tensorrt:entropy" or (v["latency"] is None and "not timed" in v["notes"][0])
        assert name == "int8-tensorrt:entropy" or v["latency"]["batch1_p50_ms"] > 0
    assert by_name["modelopt"]["error"].startswith('nvidia-modelopt is not installed: pip install ".[modelopt]"')
    assert not any("int8-tensorrt:entropy is not faster" in f for f in doc["flags"])
    md = (out / "report.md").read_text()
    assert "| int8:mse |" in md and "modelopt" in md


def test_html_report_opens_in_a_real_browser(demo_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    _, out = demo_report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = (out / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1400", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, timeout=120, check=True, text=True).stdout
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"))
    assert shot.stat().st_size > 20_000 and image.std() > 10  # rendered content, not a blank page
    for text in ("Accuracy vs latency", "FP32 baseline", "int8:entropy", "Model size", "<svg", "<table"):
        assert text in dom, text
    # the same page with a probe that measures, as laid out by the browser, every chart's text boxes
    probe = """<script>window.onload = () => { const found = [];
      document.querySelectorAll("svg").forEach((svg, k) => {
        const texts = [...svg.querySelectorAll("text")].filter(t => t.textContent.trim());
        const boxes = texts.map(t => [t.textContent, t.getBoundingClientRect()]);
        boxes.forEach(([a, r], i) => boxes.slice(i + 1).forEach(([b, q]) => {
          const apart = r.right - 1 <= q.left || q.right - 1 <= r.left || r.bottom - 1 <= q.top || q.bottom - 1 <= r.top;
          if (!apart) found.push(k + ":" + a + "|" + b);
        }));
      });
      document.body.setAttribute("data-overlaps", JSON.stringify(found)); };</script>"""
    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run([chromium, *flags, "--dump-dom", probed.as_uri()], capture_output=True, timeout=120, check=True, text=True).stdout
    overlaps = re.search(r'data-overlaps="([^"]*)"', dom)
    assert overlaps is not None, "the probe did not run"
    assert html.unescape(overlaps.group(1)) == "[]", html.unescape(overlaps.group(1))


def test_unlabelled_class_scores_are_judged_by_agreement_with_fp32(tmp_path, demo_preprocess):
    np.save(tmp_path / "val.npy", np.random.default_rng(0).normal(size=(40, 1, 28, 28)).astype(np.float32))
    result = evaluate(
        DEMO_MODEL,
        tmp_path / "val.npy",
        quantkit.EvalOptions(variants="fp32,fp16", latency=False),
        data_options=quantkit.DataOptions(preprocess=demo_preprocess),
    )
    assert not result.labelled and result.metric_names == ["agreement"]
    assert "class scores" in result.objective and "no labels" in result.objective
    fp16 = result.variant("fp16")
    assert fp16.metrics["agreement"] == pytest.approx(fp16.fidelity[0].top1_agreement) and fp16.metrics["agreement"] >= 0.95
    assert result.variant("fp32").metrics["agreement"] == 1.0
    with pytest.raises(QuantkitError, match="top1 metric needs labels"):  # never silently dropped
        evaluate(
            DEMO_MODEL,
            tmp_path / "val.npy",
            quantkit.EvalOptions(variants="fp32", latency=False, metrics=["top1"]),
            data_options=quantkit.DataOptions(preprocess=demo_preprocess),
        )


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(QuantkitError, match="not available here.*pip install onnxruntime-gpu"):
        runtime_providers("ort-cuda")
    args = [
        "eval",
        str(DEMO_MODEL),
        "--data",
        str(DEMO_VAL),
        "--preprocess-config",
        str(DEMO_PREPROCESS),
        "--no-latency",
        "--num-samples",
        "64",
    ]
    # labels that do not fit the output: a metric needing more classes than the model has
    code = main([*args, "--metric", "top5", "--variants", "fp32", "--out-dir", str(tmp_path / "a"), "--quiet"])
    assert code == 0  # top5 over 10 classes is fine
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    code = main([*args, "--variants", f"fp16,mine={broken},int8:entropy", "--out-dir", str(tmp_path / "b"), "--quiet"])
    assert code == 0  # the other variants still run
    doc = json.loads((tmp_path / "b" / "report.json").read_text())
    by_name = {v["name"]: v for v in doc["variants"]}
    assert by_name["mine"]["error"].startswith("does not run on ort-cpu")
    assert "calibration data" in by_name["int8:entropy"]["error"]  # no --calib given
    assert by_name["fp16"]["error"] is None
    code = main([*args, "--runtime", "tensorrt", "--out-dir", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and "TensorrtExecutionProvider" in capsys.readouterr().err


def test_labels_that_do_not_match_the_outputs(tmp_path, demo_preprocess):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"image": [np.zeros(784, np.float32).tolist()] * 8, "label": [[1, 2]] * 8}
    pq.write_table(pa.table(rows), tmp_path / "val.parquet")
    with pytest.raises(QuantkitError, match="metric top1 does not fit the outputs of fp32.*one integer per sample"):
        evaluate(
            DEMO_MODEL,
            tmp_path / "val.parquet",
            quantkit.EvalOptions(variants="fp32", latency=False),
            data_options=quantkit.DataOptions(preprocess=demo_preprocess),
        )
    rows["label"] = [12] * 8  # class 12 of a 10-class model
    pq.write_table(pa.table(rows), tmp_path / "val.parquet")
    with pytest.raises(QuantkitError, match="output scores 10 classes"):
        evaluate(
            DEMO_MODEL,
            tmp_path / "val.parquet",
            quantkit.EvalOptions(variants="fp32", latency=False),
            data_options=quantkit.DataOptions(preprocess=demo_preprocess),
        )


def test_eval_exits_non_zero_when_the_fp32_baseline_cannot_run(tmp_path, capsys):
    """Without the preprocessing the model needs, every variant fails: that is an error, not a report."""
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3, 28, 28), np.float32))  # 3 channels for a 1-channel model
    code = main(["eval", str(DEMO_MODEL), "--data", str(bad), "--variants", "fp32,fp16", "--no-latency", "--out-dir", str(tmp_path / "r")])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "report.json").exists()


def test_eval_reuses_the_preprocessing_recorded_in_ranges_json(tmp_path):
    """Calibrated with a preprocessing config, evaluated with --ranges and no config: the same preprocessing."""
    out = tmp_path / "cal"
    args = ["--data", str(DEMO_CALIB), "--preprocess-config", str(DEMO_PREPROCESS), "--num-samples", "64", "--quiet"]
    assert main(["calibrate", str(DEMO_MODEL), *args, "--method", "minmax", "--out-dir", str(out)]) == 0
    report = tmp_path / "r"
    argv = ["eval", str(DEMO_MODEL), "--data", str(DEMO_VAL), "--ranges", str(out / "ranges.json"), "--num-samples", "128"]
    assert main([*argv, "--variants", "fp32,int8:minmax", "--no-latency", "--out-dir", str(report), "--quiet"]) == 0
    doc = json.loads((report / "report.json").read_text())
    assert doc["variants"][0]["metrics"]["top1"] > 0.95  # MNIST normalisation reused: without it, FP32 fails
