"""Bad input, kind by kind: exit 2, one line on stderr naming the culprit, no traceback, no new
file, and no input changed (issue: every bad input a one-line error)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, conv_model, save
from onnx import numpy_helper

from quantkit.cli import main


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a small model, data, a good ranges.json, a cache and a plan to corrupt."""
    root = tmp_path_factory.mktemp("bad")
    model = save(conv_model(), root / "m.onnx")
    np.save(root / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    assert main(["calibrate", str(model), "--data", str(root / "x.npy"), "--method", "all", "--out-dir", str(root / "cal"), "--quiet"]) == 0
    shutil.copy(DEMO_MODEL, root / "demo.onnx")
    proto = conv_model()
    for i, t in enumerate(proto.graph.initializer):  # raw data, so that it can live outside the model file
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    (root / "ext").mkdir()
    onnx.save(proto, str(root / "ext" / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    return root


def ranges_doc(work):
    return json.loads((work / "cal" / "ranges.json").read_text())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def corrupt_ranges(work, name, change):
    doc = ranges_doc(work)
    change(doc)
    return write(work / f"{name}.json", json.dumps(doc))


def first_tensor(doc):
    return next(iter(doc["tensors"].values()))


def case_table(work):
    m, x, rng, out = str(work / "m.onnx"), str(work / "x.npy"), str(work / "cal" / "ranges.json"), str(work / "out.onnx")

    def amax(value):
        return corrupt_ranges(work, f"amax_{value}", lambda d: first_tensor(d)["amax"].update({"entropy": value}))

    bad_pp = {
        "scale": '{"scale": "abc"}',
        "color5": '{"color": 5}',
        "resize_float": '{"resize": 1.5}',
        "resize_zero": '{"resize": 0}',
        "resize_neg": '{"resize": -3}',
        "dtype": '{"dtype": "float99"}',
    }
    pp_files = {k: write(work / f"pp_{k}.json", v) for k, v in bad_pp.items()}
    pp_files["yaml_color_yes"] = write(work / "pp_yes.yaml", "color: yes\n")
    data_dir = work / "npys"
    data_dir.mkdir(exist_ok=True)
    np.save(data_dir / "a.npy", np.zeros((2, 3, 8, 8), np.float32))
    (data_dir / "b.npy").write_bytes(b"\x93NUMPY garbage")
    obj_dir = work / "objnpy"
    obj_dir.mkdir(exist_ok=True)
    np.save(obj_dir / "a.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    plan_int = write(work / "plan_int.json", json.dumps({"default": "int8", "nodes": {"3": "fp32"}}).replace('"3"', "3"))
    plan_yaml_int = write(work / "plan_int.yaml", "default: int8\nnodes:\n  3: fp32\n")
    long_header = write(work / "long.cache", "TRT-" + "9" * 5000 + "-EntropyCalibration2\nx: 3c010204\n")
    dup = write(work / "dup.cache", "TRT-101401-EntropyCalibration2\nx: 3c010204\nx: 3c010204\n")
    short_hex = write(work / "short.cache", "TRT-101401-EntropyCalibration2\nx: 3c0\n")
    nan_cache = write(work / "nan.cache", "TRT-101401-EntropyCalibration2\nx: 7fc00000\n")
    neg_cache = write(work / "neg.cache", "TRT-101401-EntropyCalibration2\nx: bc010204\n")
    other_cache = write(work / "other.cache", "TRT-101401-EntropyCalibration2\nnot_a_tensor: 3c010204\n")
    (work / "adir").mkdir(exist_ok=True)
    existing_file = write(work / "existing.txt", "x")
    half_cache = write(work / "half.cache", "TRT-101401-EntropyCalibration2\nc1: 3c010204\nu1: 3c010204\nu2: 3c010204\nu3: 3c010204\n")
    keyed = {"corrupt": b"\x93NUMPY garbage", "pickled": None}
    for kind, raw in keyed.items():
        (work / f"keyed_{kind}").mkdir(exist_ok=True)
        if raw is None:
            np.save(work / f"keyed_{kind}" / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            (work / f"keyed_{kind}" / "x.npy").write_bytes(raw)
    metric = write(
        work / "metrics.py",
        "import sys\ndef nan(o, r, l): return float('nan')\ndef none(o, r, l): return None\ndef leave(o, r, l): sys.exit(0)\n",
    )
    plan_v1_list = write(work / "plan_v.json", json.dumps({"version": [1], "default": "int8"}))
    bad_yaml = write(work / "bad.yaml", "resize: [1, 2\n  bad: : :\n")
    garbage_parquet = write(work / "garbage.parquet", "garbage")
    ev = ["eval", m, "--data", x, "--variants", "fp32", "--no-latency"]
    other_ranges = str(corrupt_ranges(work, "other_model", lambda d: d["model"].update({"sha256": "0" * 64})))
    ext_model, ext_data = str(work / "ext" / "model.onnx"), str(work / "ext" / "w.bin")
    return {
        # inputs overwritten
        "quantize -o is the model": ["quantize", m, "--ranges", rng, "-o", m],
        "fp16 -o is the model": ["fp16", m, "--ranges", rng, "-o", m],
        "optimize -o is the model": ["optimize", m, "-o", m],
        "quantize -o is the ranges": ["quantize", m, "--ranges", rng, "-o", rng],
        # output paths
        "fp16 output folder missing": ["fp16", m, "--ranges", rng, "-o", str(work / "nope" / "a.onnx")],
        "optimize output folder missing": ["optimize", m, "-o", str(work / "nope" / "a.onnx")],
        "cache output folder missing": ["cache", "--from-ranges", rng, "-o", str(work / "nope" / "a.cache")],
        "build output folder missing": ["build", m, "--runtime", "ort-cpu", "-o", str(work / "nope" / "a.onnx")],
        "-o is a directory": ["quantize", m, "--ranges", rng, "-o", str(work / "adir")],
        "eval --report is a file": ["eval", m, "--data", x, "--variants", "fp32", "--no-latency", "--out-dir", str(existing_file)],
        "calibrate --out is a file": ["calibrate", m, "--data", x, "--out-dir", str(existing_file)],
        # bad amax in ranges.json
        "amax NaN": ["quantize", m, "--ranges", str(amax(float("nan"))), "-o", out],
        "amax negative": ["quantize", m, "--ranges", str(amax(-1.0)), "-o", out],
        "amax zero": ["quantize", m, "--ranges", str(amax(0.0)), "-o", out],
        "amax beyond float32": ["quantize", m, "--ranges", str(amax(1e39)), "-o", out],
        "ranges missing tensors": [
            "quantize", m, "--ranges", str(corrupt_ranges(work, "notensors", lambda d: d.pop("tensors"))), "-o", out,
        ],
        "ranges min is a string": [
            "quantize", m, "--ranges", str(corrupt_ranges(work, "minstr", lambda d: first_tensor(d).update({"min": "0"}))), "-o", out,
        ],
        "ranges is a directory": ["quantize", m, "--ranges", str(work / "adir"), "-o", out],
        # caches
        "cache header with a 5000-digit version": ["quantize", m, "--from-cache", str(long_header), "-o", out],
        "cache with a duplicate tensor": ["quantize", m, "--from-cache", str(dup), "-o", out],
        "cache with 3-digit hex": ["quantize", m, "--from-cache", str(short_hex), "-o", out],
        "cache with a NaN scale": ["quantize", m, "--from-cache", str(nan_cache), "-o", out],
        "cache with a negative scale": ["quantize", m, "--from-cache", str(neg_cache), "-o", out],
        "cache of another model": ["quantize", m, "--from-cache", str(other_cache), "-o", out],
        "cache path is a directory": ["quantize", m, "--from-cache", str(work / "adir"), "-o", out],
        "trt-version with non-ASCII digits": ["calibrate", m, "--data", x, "--trt-version", "１０.1", "--out-dir", str(work / "o1")],
        # preprocessing configs
        **{
            f"preprocess {k}": [
                "calibrate", str(work / "demo.onnx"), "--data", str(DEMO_CALIB), "--preprocess-config", str(f),
                "--out-dir", str(work / f"o_{k}"),
            ]
            for k, f in pp_files.items()
        },
        # plans
        "plan with integer node keys (JSON)": ["quantize", m, "--ranges", rng, "--plan", str(plan_int), "-o", out],
        "plan with integer node keys (YAML)": ["quantize", m, "--ranges", rng, "--plan", str(plan_yaml_int), "-o", out],
        # numbers and data
        "--seed -1": ["calibrate", m, "--data", x, "--seed", "-1", "--out-dir", str(work / "o2")],
        "--num-bins huge": ["calibrate", m, "--data", x, "--num-bins", "1073741824", "--out-dir", str(work / "o3")],
        "--max-memory nonsense": ["calibrate", m, "--data", x, "--max-memory", "lots", "--out-dir", str(work / "o4")],
        "a corrupt .npy in a data folder": ["calibrate", m, "--data", str(data_dir), "--out-dir", str(work / "o5")],
        "an object-dtype .npy in a data folder": ["calibrate", m, "--data", str(obj_dir), "--out-dir", str(work / "o6")],
        "eval --variants ,": ["eval", m, "--data", x, "--variants", ",", "--no-latency", "--out-dir", str(work / "r1")],
        "eval --slice out of range": [
            "eval", m, "--data", x, "--variants", "fp32,fp16", "--no-latency", "--slice", "y:7:0-4", "--out-dir", str(work / "r2"),
        ],
        "eval --labels file missing": [
            "eval", m, "--data", x, "--labels", str(work / "nolabels.csv"), "--no-latency", "--out-dir", str(work / "r3"),
        ],
        "fidelity check on no samples": ["quantize", m, "--ranges", rng, "--check-samples", "0", "-o", out],
        "fidelity threshold NaN": ["quantize", m, "--ranges", rng, "--min-sqnr", "nan", "-o", out],
        "a required flag missing": ["calibrate", m],
        "a flag's value not among its choices": ["quantize", m, "--ranges", rng, "--weight-bits", "9", "-o", out],
        "model file missing": ["inspect", str(work / "missing.onnx")],
        "model is not ONNX": ["inspect", str(existing_file)],
        # second round (hardening): inputs never touched
        "quantize -o is the model's external data": ["quantize", ext_model, "--ranges", rng, "-o", ext_data],
        "fp16 -o is the model's external data": ["fp16", ext_model, "--no-ranges", "-o", ext_data],
        "--log-file is the model": ["quantize", m, "--ranges", rng, "-o", out, "--log-file", m],
        "--log-file is the ranges": ["quantize", m, "--ranges", rng, "-o", out, "--log-file", rng],
        "--log-file in a missing folder": ["quantize", m, "--ranges", rng, "-o", out, "--log-file", str(work / "nope" / "log")],
        # no exit 0 with a wrong artifact
        "eval --ranges of another model": [
            "eval", m, "--data", x, "--variants", "int8:entropy", "--no-latency", "--ranges", other_ranges, "--out-dir", str(work / "r4"),
        ],
        "cache of another model, one name matching": ["quantize", m, "--from-cache", str(half_cache), "-o", out],
        "user metric returns NaN": [*ev, "--metric", f"{metric}:nan", "--out-dir", str(work / "r5")],
        "user metric returns None": [*ev, "--metric", f"{metric}:none", "--out-dir", str(work / "r6")],
        "user metric calls sys.exit(0)": [*ev, "--metric", f"{metric}:leave", "--out-dir", str(work / "r7")],
        "int4 with --quantize-attention": ["quantize", m, "--format", "int4-weights", "--quantize-attention", "-o", out],
        "int4 --block-size 48": ["quantize", m, "--format", "int4-weights", "--block-size", "48", "-o", out],
        # exit 2, not an internal error
        "--measure-speed 100000000": ["quantize", m, "--ranges", rng, "--target", "onnxruntime", "--measure-speed", "100000000", "-o", out],
        "a corrupt keyed .npy": ["calibrate", m, "--data", str(work / "keyed_corrupt"), "--out-dir", str(work / "o7")],
        "a pickled keyed .npy": ["calibrate", m, "--data", str(work / "keyed_pickled"), "--out-dir", str(work / "o8")],
        # one line naming the flag
        "a YAML parse error": ["calibrate", m, "--data", x, "--preprocess-config", str(bad_yaml), "--out-dir", str(work / "o9")],
        "a garbage parquet file": ["calibrate", m, "--data", str(garbage_parquet), "--out-dir", str(work / "o10")],
        "--check-samples 0 names its flag": ["quantize", m, "--ranges", rng, "--check-samples", "0", "-o", out],
        "a bad --exclude-nodes regex": ["quantize", m, "--ranges", rng, "--exclude-nodes", "(", "-o", out],
        "plan version [1]": ["quantize", m, "--ranges", rng, "--plan", str(plan_v1_list), "-o", out],
    }  # fmt: skip


#: what the one line must say, where the kind is about naming the culprit
EXPECTED = {
    "quantize -o is the model's external data": "external data of",
    "fp16 -o is the model's external data": "external data of",
    "--log-file is the model": "(--log-file)",
    "--log-file is the ranges": "(--log-file)",
    "--log-file in a missing folder": "(--log-file)",
    "eval --ranges of another model": "another model",
    "cache of another model, one name matching": "cache of another model",
    "user metric calls sys.exit(0)": "SystemExit",
    "--measure-speed 100000000": "(--measure-speed)",
    "--check-samples 0 names its flag": "--check-samples",
    "a bad --exclude-nodes regex": "(--exclude-nodes)",
    "int4 --block-size 48": "--block-size",
    "a YAML parse error": "line 2, column 6",
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


CASES = [
    "quantize -o is the model", "fp16 -o is the model", "optimize -o is the model", "quantize -o is the ranges",
    "fp16 output folder missing", "optimize output folder missing", "cache output folder missing", "build output folder missing",
    "-o is a directory", "eval --report is a file", "calibrate --out is a file",
    "amax NaN", "amax negative", "amax zero", "amax beyond float32", "ranges missing tensors", "ranges min is a string",
    "ranges is a directory", "cache header with a 5000-digit version", "cache with a duplicate tensor", "cache with 3-digit hex",
    "cache with a NaN scale", "cache with a negative scale", "cache of another model", "cache path is a directory",
    "trt-version with non-ASCII digits", "preprocess scale", "preprocess color5", "preprocess resize_float", "preprocess resize_zero",
    "preprocess resize_neg", "preprocess dtype", "preprocess yaml_color_yes", "plan with integer node keys (JSON)",
    "plan with integer node keys (YAML)", "--seed -1", "--num-bins huge", "--max-memory nonsense", "a corrupt .npy in a data folder",
    "an object-dtype .npy in a data folder", "eval --variants ,", "eval --slice out of range", "eval --labels file missing",
    "fidelity check on no samples", "fidelity threshold NaN", "a required flag missing", "a flag's value not among its choices",
    "model file missing", "model is not ONNX",
    "quantize -o is the model's external data", "fp16 -o is the model's external data", "--log-file is the model",
    "--log-file is the ranges", "--log-file in a missing folder", "eval --ranges of another model",
    "cache of another model, one name matching", "user metric returns NaN", "user metric returns None", "user metric calls sys.exit(0)",
    "int4 with --quantize-attention", "int4 --block-size 48", "--measure-speed 100000000", "a corrupt keyed .npy", "a pickled keyed .npy",
    "a YAML parse error", "a garbage parquet file", "--check-samples 0 names its flag", "a bad --exclude-nodes regex", "plan version [1]",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(work, case):
    argv = case_table(work)[case]
    before = snapshot(work)
    done = subprocess.run([sys.executable, "-m", "quantkit", *argv], capture_output=True, text=True, cwd=work, timeout=300)
    after = snapshot(work)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert EXPECTED.get(case, "") in err[0], err[0]
    assert after == before, {k: v for k, v in after.items() if before.get(k) != v}


def test_the_table_covers_every_case(work):
    assert sorted(case_table(work)) == sorted(CASES)
