"""Old import paths (quantkit 0.1's flat modules) as deprecated aliases, for one minor version.

``import quantkit.qdq`` still works: a meta-path finder answers the old names with an alias
module whose attributes forward to the new module, and warns once with a DeprecationWarning.
The aliases go in quantkit 0.3. Keeping them in one table here leaves the package tree clean.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: old module -> new module
MOVED = {
    "quantkit.atomic": "quantkit._io",
    "quantkit.config": "quantkit._io",
    "quantkit.progress": "quantkit._io",
    "quantkit.runner": "quantkit.backends.ort",
    "quantkit.engine_ort": "quantkit.backends.ort",
    "quantkit.engine_trt": "quantkit.backends.trt",
    "quantkit.trtexec": "quantkit.backends.trtexec",
    "quantkit.histogram": "quantkit.calibration.histogram",
    "quantkit.methods": "quantkit.calibration.methods",
    "quantkit.qdq": "quantkit.export.qdq",
    "quantkit.fp16": "quantkit.export.fp16",
    "quantkit.passes": "quantkit.graph.passes",
    "quantkit.optimize": "quantkit.graph.optimize",
    "quantkit.metrics": "quantkit.evaluation.metrics",
    "quantkit.sensitivity": "quantkit.tuning.sensitivity",
    "quantkit.tune": "quantkit.tuning.search",
    "quantkit.distributed": "quantkit.scaleout.ray",
}
#: names that moved to another module than their old module's new home
MOVED_NAMES = {
    "quantkit.runner": {
        "select_calibration_tensors": "quantkit.calibration.collect",
        "QUANTIZABLE_OP_TYPES": "quantkit.optypes",
    },
    "quantkit.sensitivity": {"apply_plan": "quantkit.export.apply"},
}
#: old modules whose name is also a function of the façade: the alias forwards calls to it,
#: since importing the old module rebinds that name on the package
CALLABLE = {"quantkit.tune": ("quantkit.api", "tune")}


class _Alias(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        old = self.__name__
        home = MOVED_NAMES.get(old, {}).get(name, MOVED[old])
        return getattr(importlib.import_module(home), name)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(MOVED[self.__name__]))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__name__ not in CALLABLE:
            raise TypeError(f"module {self.__name__} is not callable")
        module, name = CALLABLE[self.__name__]
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Alias(spec.name, f"Deprecated alias of {MOVED[spec.name]}.")

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} is deprecated and goes in quantkit 0.3; import from {MOVED[module.__name__]}",
            DeprecationWarning,
            stacklevel=2,
        )


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
