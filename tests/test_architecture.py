"""The package's shape: the flow's layering, no cycles inside a layer, heavy optional imports only
where they belong, a cheap ``import quantkit``, one session factory.

The checker (``package_imports``, ``layer_violations``, ``cycles_within_layers``,
``misplaced_heavy_imports``) reads absolute, relative and ``importlib``/``__import__`` string
imports, at the top of a file or inside functions. Each check is shown to fail on a planted
violation of its kind, so none of them can pass by seeing nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import quantkit

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
    {"api", "cli", "__init__", "__main__"},
]

#: optional heavy dependencies -> the only modules (relative to the package) that may import them
HEAVY_HOMES = {
    "tensorrt": {"backends/trt.py"},
    "ray": {"scaleout/ray.py"},
    "modelopt": {"evaluation/variants.py"},
}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def _string_imports(node: ast.Call) -> str | None:
    """The module a call ``importlib.import_module("x")`` / ``__import__("x")`` / ``require("x", ...)`` /
    ``optional("x")`` names with a literal (an f-string's literal head for ``quantkit.cli.{module}``)."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__", "require", "optional") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def imports_of(path: Path, root: Path) -> list[str]:
    """Every module a file imports (absolute, relative, or by a string), at the top or inside functions."""
    module = module_name(path, root)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, path.name == "__init__.py", node.level, node.module) if node.level else node.module
            if target:
                found.append(target)
                found += [f"{target}.{a.name}" for a in node.names]  # from pkg import submodule
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.Call) and (named := _string_imports(node)):
            found.append(named)
    return found


def package_imports(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """module -> (file, the modules of the same package it imports)."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    out = {}
    for module, path in modules.items():
        inside = [m for m in imports_of(path, root) if m == top or m.startswith(top + ".")]
        # "from quantkit.export import rules" names a module; "from quantkit.export import quantize_model" does not
        out[module] = (path, sorted({m for m in inside if m in modules or m.rsplit(".", 1)[0] in modules or m == top}))
    return out


def layer_of(module: str, layers: list[set[str]]) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(layers):
        if head in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def _owner(imported: str, modules: dict) -> str:
    """The module an imported name lives in (``pkg.mod.name`` -> ``pkg.mod``)."""
    return imported if imported in modules else imported.rsplit(".", 1)[0]


def layer_violations(root: Path, layers: list[set[str]]) -> list[str]:
    graph = package_imports(root)
    top = root.name
    offences = []
    for module, (_, imported) in graph.items():
        mine = layer_of(module, layers)
        for name in imported:
            owner = _owner(name, graph)
            if owner in (top, f"{top}.__init__") or name == f"{top}.__version__":
                continue
            if layer_of(owner, layers) > mine:
                offences.append(f"{module} imports {owner}")
    return sorted(set(offences))


def cycles_within_layers(root: Path, layers: list[set[str]]) -> list[list[str]]:
    """Import cycles among modules of one layer (a package's ``__init__`` re-exports lazily, so it is left out)."""
    graph = package_imports(root)
    edges: dict[str, set[str]] = {}
    for module, (path, imported) in graph.items():
        if path.name == "__init__.py":
            continue
        owners = {_owner(n, graph) for n in imported}
        edges[module] = {
            o
            for o in owners
            if o in graph and o != module and graph[o][0].name != "__init__.py" and layer_of(o, layers) == layer_of(module, layers)
        }
    return list(_cycles(edges))


def _cycles(edges: dict[str, set[str]]) -> Iterator[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    yield from found


def misplaced_heavy_imports(root: Path, homes: dict[str, set[str]]) -> list[str]:
    offences = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for name in imports_of(path, root):
            heavy = name.split(".")[0]
            if heavy in homes and rel not in homes[heavy]:
                offences.append(f"{rel} imports {heavy}")
    return sorted(set(offences))


# ---- the checks on quantkit ---------------------------------------------------------------------


def test_the_checker_reads_this_package():
    graph = package_imports(PACKAGE)
    assert len(graph) > 50
    edges = sum(len(imported) for _, imported in graph.values())
    assert edges > 200  # a checker that parsed nothing would pass every test below
    assert "quantkit.data.sources" in graph["quantkit.data.batching"][1]  # a relative import, resolved


def test_no_module_imports_from_above_it_in_the_flow():
    assert layer_violations(PACKAGE, LAYERS) == []


def test_every_module_has_a_layer():
    modules = list(package_imports(PACKAGE))
    assert [layer_of(m, LAYERS) for m in modules]  # raises for a module outside the table
    assert {m.split(".")[1] for m in modules if "." in m} - {n for layer in LAYERS for n in layer} == set()


def test_no_import_cycle_inside_a_layer():
    assert cycles_within_layers(PACKAGE, LAYERS) == []


def test_optional_heavy_imports_only_where_they_belong():
    assert misplaced_heavy_imports(PACKAGE, HEAVY_HOMES) == []


def test_one_place_creates_onnxruntime_sessions():
    makers = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "InferenceSession(" in p.read_text()]
    assert makers == ["backends/ort.py"]


# ---- each check fails on a planted violation of its kind ----------------------------------------


def plant(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "pkg"
    for name, text in {"__init__.py": "", "low/__init__.py": "", "high/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


PLANTED_LAYERS = [{"low"}, {"high"}, {"__init__"}]


@pytest.mark.parametrize(
    "text",
    [
        "from pkg.high.a import x\n",  # absolute
        "from ..high.a import x\n",  # relative
        "def f():\n    import pkg.high.a\n",  # inside a function
        "import importlib\nm = importlib.import_module('pkg.high.a')\n",  # a string import
        "m = __import__('pkg.high.a')\n",
    ],
)
def test_an_upward_import_is_found_in_every_form(tmp_path, text):
    root = plant(tmp_path, {"low/b.py": text, "high/a.py": "x = 1\n"})
    assert layer_violations(root, PLANTED_LAYERS) == ["pkg.low.b imports pkg.high.a"]


def test_a_cycle_inside_a_layer_is_found(tmp_path):
    root = plant(tmp_path, {"low/a.py": "from . import b\n", "low/b.py": "from .c import y\n", "low/c.py": "from pkg.low.a import z\n"})
    assert cycles_within_layers(root, PLANTED_LAYERS) == [["pkg.low.a", "pkg.low.b", "pkg.low.c"]]
    clean = plant(tmp_path / "clean", {"low/a.py": "from . import b\n", "low/b.py": "y = 1\n"})
    assert cycles_within_layers(clean, PLANTED_LAYERS) == []


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("import tensorrt\n", "tensorrt"),
        ("from ray import remote\n", "ray"),
        ("trt = optional('tensorrt')\n", "tensorrt"),
        ("ray = require('ray', 'workers')\n", "ray"),
    ],
)
def test_a_heavy_import_outside_its_home_is_found(tmp_path, text, name):
    root = plant(tmp_path, {"low/a.py": text, "high/trt.py": "import tensorrt\n", "high/ray.py": "import ray\n"})
    assert misplaced_heavy_imports(root, {"tensorrt": {"high/trt.py"}, "ray": {"high/ray.py"}}) == [f"low/a.py imports {name}"]


def test_a_module_outside_the_layers_is_refused(tmp_path):
    root = plant(tmp_path, {"stray/__init__.py": "", "stray/a.py": "x = 1\n"})
    with pytest.raises(AssertionError, match="pkg.stray is in no layer"):
        layer_violations(root, PLANTED_LAYERS)


# ---- the package's surface ------------------------------------------------------------------------


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
    for name in ("calibrate", "quantize", "fp16", "evaluate", "analyze", "tune", "build", "RangeSet", "PrecisionPlan"):
        assert name in quantkit.__all__
        assert callable(getattr(quantkit, name))
    for name in ("DataOptions", "RuntimeOptions", "CalibrationOptions", "ExportOptions", "EvalOptions", "TuneOptions", "ScaleOut"):
        assert isinstance(getattr(quantkit, name), type)


def test_old_module_paths_are_gone():
    for old in ("quantkit.qdq", "quantkit.atomic", "quantkit.runner", "quantkit._compat"):
        with pytest.raises(ModuleNotFoundError):
            __import__(old)


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
