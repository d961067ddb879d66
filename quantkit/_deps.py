"""Optional dependencies: one way to import them, and one table of install hints.

quantkit's base install runs everything on CPU through onnxruntime. Ray, TensorRT, ModelOpt,
YAML and the GPU build of onnxruntime are extras, imported only where a feature needs them,
through ``require`` (a clear error naming the extra when missing) or ``optional`` (None).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from quantkit.errors import QuantkitError

#: the distribution's name on PyPI (``quantkit`` there is an unrelated project)
DIST_NAME = "quantkit-onnx"

#: module -> (what it is, how to get it). The hints name the packages themselves, which pip can
#: always resolve, and the extra of this distribution that pins them.
INSTALL_HINTS: dict[str, tuple[str, str]] = {
    "ray": ("Ray", f'pip install "ray>=2.9" (the {DIST_NAME}[distributed] extra)'),
    "tensorrt": (
        "TensorRT",
        f"pip install tensorrt (the {DIST_NAME}[gpu] extra; its libraries come from NVIDIA's index) on a machine with an NVIDIA GPU",
    ),
    "modelopt": (
        "nvidia-modelopt",
        f'pip install ".[modelopt]" in the {DIST_NAME} source (ModelOpt and its ONNX requirements without the second '
        "onnxruntime that nvidia-modelopt[onnx] would add; a CUDA torch, about 7 GB)",
    ),
    "yaml": ("PyYAML", "pip install pyyaml"),
    "datasets": ("Hugging Face datasets", "pip install datasets"),
    "onnxruntime_gpu": (
        "onnxruntime-gpu",
        "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (one onnxruntime flavour at a time) on a machine with an NVIDIA GPU",
    ),
}


def install_hint(module: str) -> str:
    """How to install the extra that provides ``module`` (its top-level name)."""
    return INSTALL_HINTS.get(module.split(".")[0], (module, f"pip install {module}"))[1]


def optional(module: str) -> ModuleType | None:
    """``module`` if it can be imported, else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def require(module: str, feature: str) -> ModuleType:
    """``module``, or a one-line error saying that ``feature`` needs it and how to install it."""
    found = optional(module)
    if found is None:
        what = INSTALL_HINTS.get(module.split(".")[0], (module, ""))[0]
        raise QuantkitError(f"{feature} needs {what}, which is not installed: {install_hint(module)}")
    return found


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Any, Any]:
    """Module ``__getattr__``/``__dir__`` that import ``exports`` (name -> module) on first use.

    Lets ``import quantkit`` (and its subpackages) stay cheap: onnxruntime, onnx-graphsurgeon and
    the rest load only when a name that needs them is used.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
