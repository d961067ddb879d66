"""The extras resolve to an environment with exactly one onnxruntime flavour (pip's resolver, dry run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

FLAVOURS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn"}


@pytest.mark.parametrize("extra", ["modelopt", "distributed"])
def test_an_extra_leaves_one_onnxruntime(extra, tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), f"{ROOT}[{extra}]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        if "ResolutionImpossible" in done.stderr or "conflict" in done.stderr.lower():
            pytest.fail(f"[{extra}] does not resolve: {done.stderr[-1500:]}")
        pytest.skip(f"pip could not reach the package index: {done.stderr.strip().splitlines()[-1:]}")
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert names & FLAVOURS == {"onnxruntime"}, sorted(names & FLAVOURS)
    assert {"modelopt": "nvidia-modelopt", "distributed": "ray"}[extra] in names


def test_the_sdist_holds_what_make_test_needs(tmp_path):
    import tarfile

    subprocess.run([sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    names = {n.split("/", 1)[1] for n in tarfile.open(next(tmp_path.glob("*.tar.gz"))).getnames() if "/" in n}
    for needed in ("Makefile", "tests/conftest.py", "tests/fakequant.py", "calib_data/demo_cnn.onnx", "quantkit/demo/calib.parquet"):
        assert needed in names, needed
    assert any(n.startswith("calib_data/mnist/calib/") for n in names)


def test_the_readme_example_runs_from_the_wheel_outside_the_repository(tmp_path):
    """The README's Python example in a fresh virtualenv holding only the wheel (its dependencies
    come from this environment's site-packages as a plain path: no editable install of the clone),
    run from a folder outside the repository."""
    import re
    import sysconfig
    import venv
    from pathlib import Path

    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "-o", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    wheel = next((tmp_path / "dist").glob("*.whl"))
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True)
    target = site.stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, str(wheel)], check=True, timeout=600)
    # the dependencies, not quantkit: a path entry is not scanned for .pth files, so the clone's editable finder stays out
    (Path(target) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    script = tmp_path / "outside" / "example.py"
    script.parent.mkdir()
    script.write_text(block + "\nimport quantkit as q\nprint('FROM', q.__file__)\n")
    done = subprocess.run([python, str(script)], cwd=script.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"FROM {target}" in done.stdout  # the wheel's quantkit ran, not the clone's
