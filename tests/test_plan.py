import pytest

from quantkit.errors import QuantkitError
from quantkit.plan import PrecisionPlan

NAMES = ["/stem/Conv", "/head/cls/Conv", "/head/box/Conv", "/blocks.0/attn/MatMul", "/blocks.0/mlp/MatMul"]


def test_exact_names_beat_patterns_and_the_first_pattern_wins():
    plan = PrecisionPlan(
        default="int8",
        nodes={"/head/*": "fp16", "/head/box/Conv": "fp32", "re:.*/attn/.*": "fp16", "re:/blocks\\..*": "fp32"},
    )
    assert plan.resolve(NAMES) == {
        "/stem/Conv": "int8",
        "/head/cls/Conv": "fp16",
        "/head/box/Conv": "fp32",
        "/blocks.0/attn/MatMul": "fp16",
        "/blocks.0/mlp/MatMul": "fp32",
    }


def test_round_trip_and_yaml(tmp_path):
    plan = PrecisionPlan(default="fp16", fallback="fp32", nodes={"/stem/Conv": "fp32"})
    plan.save(tmp_path / "plan.json")
    assert PrecisionPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "plan.yaml").write_text("default: fp16\nnodes:\n  /stem/Conv: FP32\n")
    assert PrecisionPlan.load(tmp_path / "plan.yaml").resolve(NAMES)["/stem/Conv"] == "fp32"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default": "int4"}, "must be one of int8, fp16, fp32"),
        ({"fallback": "int8"}, "fallback must be fp16 or fp32"),
        ({"nodes": {"re:([": "fp16"}}, "not a valid regular expression"),
        ({"nodes": {"/stem/Conv": "half"}}, "plan entry '/stem/Conv'"),
    ],
)
def test_bad_plans(kwargs, message):
    with pytest.raises(QuantkitError, match=message):
        PrecisionPlan(**kwargs)


def test_bad_plan_files(tmp_path):
    (tmp_path / "p.json").write_text('{"default": "int8", "layers": {}}')
    with pytest.raises(QuantkitError, match="unknown key"):
        PrecisionPlan.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(QuantkitError, match="must hold a mapping"):
        PrecisionPlan.load(tmp_path / "p.json")
    with pytest.raises(QuantkitError, match="precision plan not found"):
        PrecisionPlan.load(tmp_path / "missing.json")
