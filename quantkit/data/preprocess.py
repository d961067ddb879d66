"""Image preprocessing spec: how a decoded image becomes a model input array.

Order of operations (torchvision's, which most exported models were trained with):
convert colour -> resize -> center-crop -> to float -> * scale -> (x - mean) / std -> layout -> dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from quantkit._io import read_mapping_file
from quantkit.errors import QuantkitError
from quantkit.model import InputSpec

COLORS = ("RGB", "BGR", "L")
LAYOUTS = ("NCHW", "NHWC")


def _size(value: Any, flag: str) -> tuple[int, int] | int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or isinstance(value, float):
        raise QuantkitError(f"{flag} must be N or HxW with whole positive numbers, got {value!r}")
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise QuantkitError(f"{flag} must be N or HxW, got {value!r}")
    try:
        ints = [int(p) if not isinstance(p, (bool, float)) else int("x") for p in parts]
    except (TypeError, ValueError):
        raise QuantkitError(f"{flag} must be N or HxW with whole positive numbers, got {value!r}") from None
    if any(i <= 0 or i > 65536 for i in ints):
        raise QuantkitError(f"{flag} must be positive (at most 65536), got {value!r}")
    if len(ints) == 1:
        return ints[0]
    if len(ints) == 2:
        return (ints[0], ints[1])
    raise QuantkitError(f"{flag} must be N or HxW, got {value!r}")


def _floats(value: Any, flag: str) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, bool) or not isinstance(value, (str, list, tuple)):
        raise QuantkitError(f"{flag} must be a number or a comma list of numbers, got {value!r}")
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(p) for p in parts if not isinstance(p, bool))
        if len(out) != len(parts) or not all(math.isfinite(x) for x in out):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise QuantkitError(f"{flag} must be a number or a comma list of numbers, got {value!r}") from None


@dataclass(frozen=True)
class PreprocessSpec:
    """Preprocessing for image data. ``None`` fields are inferred from the model input."""

    resize: int | tuple[int, int] | None = None  # int: shorter side; (h, w): exact size
    center_crop: int | tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color: str | None = None  # RGB, BGR or L; default from the model's channel count
    layout: str | None = None  # NCHW or NHWC; default from the model input's shape
    dtype: str | None = None  # default: the model input's dtype
    # keep the aspect ratio: scale into resize's HxW and pad the rest (centred, grey 114, as YOLO
    # exports expect); detectors need it, a plain resize distorts their boxes
    letterbox: bool = False

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "preprocessing options") -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QuantkitError(f"{source}: unknown preprocessing key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        v = {k: values[k] for k in values if values[k] is not None}
        for key in ("color", "layout", "dtype"):
            if key in v and not isinstance(v[key], str):
                raise QuantkitError(f"{source}: {key} must be a string, got {v[key]!r} ({type(v[key]).__name__}); quote it in YAML")
        scale = v.get("scale", 1.0 / 255.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise QuantkitError(f"{source}: scale must be a positive number, got {scale!r}")
        if "dtype" in v:
            try:
                dtype = np.dtype(v["dtype"])
            except (TypeError, ValueError, SyntaxError):  # numpy parses some strings as Python literals
                raise QuantkitError(f"{source}: dtype {v['dtype']!r} is not a numpy dtype (e.g. float32, float16, uint8)") from None
            if dtype.kind not in "fiu":
                raise QuantkitError(f"{source}: dtype must be a numeric type, got {v['dtype']!r}")
        spec = cls(
            resize=_size(v.get("resize"), f"{source}: resize"),
            center_crop=_size(v.get("center_crop"), f"{source}: center_crop"),
            scale=float(scale),
            mean=_floats(v.get("mean"), f"{source}: mean"),
            std=_floats(v.get("std"), f"{source}: std"),
            color=(v["color"].upper() if "color" in v else None),
            layout=(v["layout"].upper() if "layout" in v else None),
            dtype=v.get("dtype"),
            letterbox=_flag(v.get("letterbox", False), f"{source}: letterbox"),
        )
        if spec.letterbox and not isinstance(spec.resize, tuple):
            raise QuantkitError(f"{source}: letterbox needs resize as HxW (the size to pad to), e.g. resize 640x640")
        if spec.color is not None and spec.color not in COLORS:
            raise QuantkitError(f"{source}: color must be one of {', '.join(COLORS)}, got {spec.color}")
        if spec.layout is not None and spec.layout not in LAYOUTS:
            raise QuantkitError(f"{source}: layout must be NCHW or NHWC, got {spec.layout}")
        if spec.std is not None and any(s == 0 for s in spec.std):
            raise QuantkitError(f"{source}: std must not contain 0")
        return spec

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        """Read a JSON or YAML file with the same keys as the CLI flags."""
        return cls.from_mapping(read_mapping_file(path, "preprocessing config"), str(path))

    def merged(self, overrides: dict[str, Any]) -> PreprocessSpec:
        """This spec with the non-None ``overrides`` (CLI flags win over a config file)."""
        base = {k: v for k, v in asdict(self).items()}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return PreprocessSpec.from_mapping(base)

    def resolved(self, spec: InputSpec) -> PreprocessSpec:
        """Fill the inferred fields from the model input this spec feeds."""
        shape = spec.shape
        layout = self.layout
        if layout is None:
            layout = "NHWC" if len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"
        channels = shape[1 if layout == "NCHW" else 3] if len(shape) == 4 else None
        color = self.color or ("L" if channels == 1 else "RGB")
        dtype = self.dtype or str(spec.dtype)
        return replace(self, layout=layout, color=color, dtype=dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def apply(self, image: Image.Image) -> np.ndarray:
        """Image -> array for one sample (no batch axis), in the resolved layout and dtype."""
        mode = "L" if self.color == "L" else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        if self.letterbox and isinstance(self.resize, tuple):
            image = _letterbox(image, self.resize)
        elif self.resize is not None:
            image = _resize(image, self.resize)
        if self.center_crop is not None:
            image = _center_crop(image, self.center_crop)
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.color == "BGR":
            arr = arr[:, :, ::-1]
        arr = arr * np.float32(self.scale)
        if self.mean is not None:
            arr = arr - np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            arr = arr / np.asarray(self.std, dtype=np.float32)
        if self.layout != "NHWC":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.dtype(self.dtype or "float32"))


def _resize(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    w, h = image.size
    if isinstance(size, int):  # shorter side to `size`, keeping the aspect ratio
        if w <= h:
            new = (size, max(1, round(h * size / w)))
        else:
            new = (max(1, round(w * size / h)), size)
    else:
        new = (size[1], size[0])
    return image if new == (w, h) else image.resize(new, Image.BILINEAR)


def _letterbox(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to fit (h, w) with the aspect ratio kept, then pad evenly with grey (114)."""
    h, w = size
    iw, ih = image.size
    ratio = min(w / iw, h / ih)
    new = (max(1, round(iw * ratio)), max(1, round(ih * ratio)))
    scaled = image if new == (iw, ih) else image.resize(new, Image.BILINEAR)
    fill = 114 if image.mode == "L" else (114, 114, 114)
    canvas = Image.new(image.mode, (w, h), fill)
    canvas.paste(scaled, ((w - new[0]) // 2, (h - new[1]) // 2))
    return canvas


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise QuantkitError(f"{where} must be true or false, got {value!r}")


def _center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    ch, cw = (size, size) if isinstance(size, int) else size
    w, h = image.size
    if ch > h or cw > w:
        raise QuantkitError(
            f"center_crop {ch}x{cw} is larger than the (resized) image {h}x{w}; lower center_crop or raise resize",
            option=("center_crop", "resize"),
        )
    left, top = round((w - cw) / 2.0), round((h - ch) / 2.0)
    return image.crop((left, top, left + cw, top + ch))
