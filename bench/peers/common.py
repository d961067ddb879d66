"""What the peers' scripts share: the samples, the opset they need, the peak RSS line."""

import sys

import numpy as np
import onnx


def samples(calib: str) -> list[dict[str, np.ndarray]]:
    """The calibration arrays as one-sample feeds, the form every peer's data reader takes."""
    data = dict(np.load(calib))
    count = len(next(iter(data.values())))
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(count)]


def at_least_opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """Quark and AIMET refuse per-channel weights below opset 13 (quantkit converts likewise)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return onnx.version_converter.convert_version(model, 13) if opset < 13 else model


def peak_rss() -> None:
    status = open("/proc/self/status").read().splitlines()
    print("PEAK_RSS_KB", next(line.split()[1] for line in status if line.startswith("VmHWM")), file=sys.stderr)
