"""``quantkit demo`` from the built wheel alone, outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from conftest import ROOT

from quantkit.cli import main
from quantkit.demo import VARIANTS

RUN_FROM_WHEEL = """
import sys
# the repository's editable install must not answer for the wheel's files
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
sys.path.insert(0, sys.argv[1])
import quantkit
assert quantkit.__file__.startswith(sys.argv[1]), quantkit.__file__
from quantkit.cli import main
sys.exit(main(["demo", "--out-dir", sys.argv[2], "--quiet"]))
"""


def test_demo_runs_from_the_wheel_outside_the_repo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("quantkit_onnx-*.whl"))
    members = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "quantkit/demo/demo_cnn.onnx",
        "quantkit/demo/calib.parquet",
        "quantkit/demo/val.parquet",
        "quantkit/report/report_schema.json",
    ):
        assert name in members, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", RUN_FROM_WHEEL, str(site), str(elsewhere / "out")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo outputs are in" in done.stdout
    doc = json.loads((elsewhere / "out" / "report.json").read_text())
    assert [v["name"] for v in doc["variants"]] == VARIANTS.split(",")
    fp32 = doc["variants"][0]["metrics"]["top1"]
    assert fp32 > 0.97 and doc["variants"][2]["metrics"]["top1"] > fp32 - 0.01  # int8:entropy keeps the accuracy


def test_demo_refuses_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["demo", "--out-dir", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "taken" in capsys.readouterr().err
