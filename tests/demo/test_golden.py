"""The demo's artifacts, byte for byte: what quantize, fp16 and the caches make from the demo's ranges.

``golden/SHA256SUMS`` holds the SHA-256 of every artifact ``quantkit demo`` writes;
``golden/PLACEMENT_SHA256SUMS`` that of the pure Q/DQ placement of each target as it was before
the placement became rules as data (HEAD 6d50b28), which the TensorRT target's mixed model (FP16
outside the Q/DQ, since issue 28) is converted from. ``golden/ranges.json`` is that run's ranges and
``golden/kept_float.json`` every node each placement left in float, with its reason. Calibration
runs onnxruntime, whose float results may differ in the last bits between CPUs, so this test starts
from the recorded ranges: everything after calibration is pure graph and NumPy work and must repeat
exactly. ``python scripts/check_demo_golden.py reports/demo`` compares a whole demo run, ranges.json included.
"""

import hashlib
import json
from pathlib import Path

import pytest

from quantkit.calibration.pipeline import write_outputs
from quantkit.demo import MODEL
from quantkit.export.apply import apply_plan
from quantkit.export.fp16 import convert_fp16
from quantkit.export.qdq import quantize_model
from quantkit.model import load_model
from quantkit.options import QuantizeOptions
from quantkit.ranges import RangeSet

GOLDEN = Path(__file__).parent / "golden"


def golden_sums(file: str = "SHA256SUMS") -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in (GOLDEN / file).read_text().splitlines())}


@pytest.fixture(scope="module")
def demo():
    return load_model(MODEL), RangeSet.load(GOLDEN / "ranges.json")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_the_demo_qdq_models_are_byte_identical_and_keep_their_reasons(demo, target):
    model, ranges = demo
    quantized, report = quantize_model(model, ranges, method="entropy", target=target)
    assert sha(quantized.SerializeToString()) == golden_sums("PLACEMENT_SHA256SUMS")[f"demo_cnn.int8.{target}.onnx"]
    assert report.kept_float == json.loads((GOLDEN / "kept_float.json").read_text())[target]
    written = apply_plan(model, ranges, None, QuantizeOptions(method="entropy", target=target).export("int8")).model
    assert sha(written.SerializeToString()) == golden_sums()[f"demo_cnn.int8.{target}.onnx"]  # what quantize writes


def test_the_demo_fp16_model_is_byte_identical(demo):
    model, ranges = demo
    converted, _ = convert_fp16(model.proto, ranges=ranges)
    assert sha(converted.SerializeToString()) == golden_sums()["demo_cnn.fp16.onnx"]


def test_the_demo_ranges_and_caches_are_byte_identical(demo, tmp_path):
    _, ranges = demo
    written = {p.name: sha(p.read_bytes()) for p in write_outputs(ranges, tmp_path)}
    expected = {k: v for k, v in golden_sums().items() if k == "ranges.json" or k.endswith(".cache")}
    assert written == expected
