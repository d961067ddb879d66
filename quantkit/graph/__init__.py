"""Network structure optimization: the fusion passes (``passes``) and their pipeline with layer counts (``optimize``)."""

from quantkit._deps import lazy_exports

_EXPORTS = {"PASSES": "quantkit.graph.optimize", "optimize_model": "quantkit.graph.optimize"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
