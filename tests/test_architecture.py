"""The package's shape: the flow's layering, a cheap ``import quantkit``, one session factory, old paths."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import quantkit
from quantkit import _compat

PACKAGE = Path(quantkit.__file__).parent

#: the flow, bottom to top: a module may import from its own layer or those below it
LAYERS = [
    {"errors", "_deps", "_io", "optypes", "model", "ranges", "trt_cache", "plan", "demo"},
    {"data"},
    {"options"},
    {"backends"},
    {"graph"},
    {"calibration"},
    {"export"},
    {"evaluation"},
    {"tuning"},
    {"report"},
    {"scaleout"},
    {"api", "cli", "__init__", "__main__", "_compat"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if head in names)


def imports_of(path: Path) -> list[str]:
    """Every quantkit module a file imports, at the top or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantkit") and node.level == 0:
            found.append(node.module)
            if node.module == "quantkit":
                found += [f"quantkit.{a.name}" for a in node.names if a.name != "__version__"]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("quantkit")]
    return found


def test_no_module_imports_from_above_it_in_the_flow():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        if path.name == "__init__.py" and module == "quantkit.__init__":
            continue
        mine = layer_of(module.removesuffix(".__init__") if module != "quantkit.__init__" else module)
        for imported in imports_of(path):
            if imported in ("quantkit", "quantkit.__version__"):
                continue
            if layer_of(imported) > mine:
                offences.append(f"{module} imports {imported}")
    assert offences == []


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        rel = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        layer_of(rel)  # raises StopIteration for a module outside the table


def test_ray_is_imported_only_in_scaleout():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "import ray" in text or 'require("ray"' in text:
            assert path.relative_to(PACKAGE).parts[0] == "scaleout", path


def test_one_place_creates_onnxruntime_sessions():
    makers = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "InferenceSession(" in p.read_text()]
    assert makers == ["backends/ort.py"]


def test_tensorrt_is_imported_only_by_its_backend():
    for path in PACKAGE.rglob("*.py"):
        if 'optional("tensorrt")' in path.read_text() or "import tensorrt" in path.read_text():
            assert path.relative_to(PACKAGE).as_posix() == "backends/trt.py"


def test_import_quantkit_and_version_stay_light():
    code = (
        "import sys, quantkit\n"
        "from quantkit.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('onnxruntime', 'onnx_graphsurgeon', 'onnx', 'PIL', 'tqdm', 'datasets', 'ray') if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY:\n" in out.stdout, out.stdout
    assert "quantkit 0." in out.stdout


def test_facade_exports_the_stages():
    for name in ("calibrate", "quantize_model", "convert_fp16", "apply_plan", "evaluate", "analyze", "tune", "RangeSet", "PrecisionPlan"):
        assert name in quantkit.__all__
        assert callable(getattr(quantkit, name))
    for name in ("DataOptions", "RuntimeOptions", "CalibrationOptions", "ExportOptions", "EvalOptions", "TuneOptions", "ScaleOut"):
        assert isinstance(getattr(quantkit, name), type)


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_import_paths_still_work_with_a_deprecation_warning(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = __import__(old, fromlist=["_"])
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    new = __import__(_compat.MOVED[old], fromlist=["_"])
    public = [n for n in vars(new) if not n.startswith("_") and not isinstance(getattr(new, n), type(sys))]
    assert public
    for name in public[:20]:
        assert getattr(module, name) is getattr(new, name)


def test_old_paths_keep_names_that_moved_elsewhere_and_the_facade_tune():
    import quantkit.tune  # rebinds quantkit.tune to the alias module
    from quantkit.runner import QUANTIZABLE_OP_TYPES, select_calibration_tensors  # noqa: F401 - the old names resolve

    from quantkit.api import tune

    assert callable(quantkit.tune)
    assert quantkit.tune.PrecisionSearch is __import__("quantkit.tuning.search", fromlist=["_"]).PrecisionSearch
    assert tune is not None


def test_old_package_paths_export_their_old_names():
    from quantkit.calibration import CalibrationStats, calibrate, collect_statistics, compute_ranges, write_outputs  # noqa: F401
    from quantkit.evaluation import evaluate, parse_variants, runtime_providers  # noqa: F401
    from quantkit.report import SCHEMA_PATH, to_json, to_markdown, write_report  # noqa: F401

    assert SCHEMA_PATH.is_file()


def test_every_lazy_export_resolves():
    import importlib

    for package in ("quantkit", *(f"quantkit.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists())):
        module = importlib.import_module(package)
        for name in getattr(module, "_EXPORTS", {}):
            assert getattr(module, name) is not None, f"{package}.{name}"


def test_every_cli_command_loads_and_has_help(capsys):
    from quantkit.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"usage: quantkit {name}" in capsys.readouterr().out
