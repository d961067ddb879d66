"""Scale-out beside the flow: ``ray`` is the only module that imports Ray. It depends on
calibration and tuning (a ``Collector`` and a ``TrialExecutor``), never the reverse."""

from quantkit._deps import lazy_exports

_EXPORTS = dict.fromkeys(["RayCollector", "RayExecutor", "ray_cluster"], "quantkit.scaleout.ray")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
