"""Report on a real third-party model: PaddleOCR's text-direction classifier (ch_ppocr_mobile_v2.0_cls).

The model ships inside the rapidocr-onnxruntime wheel (``make third-party-report`` installs it
with pip, --no-deps). Its inputs are 48x192 text-line crops and its two classes are upright (0)
and upside-down (180) text. The labelled data is built here, deterministically: lines of real
English text (the Zen of Python, from the standard library's ``this`` module) rendered with
Pillow's bundled font at varied sizes, offsets and grey levels, half of them rotated by 180
degrees. Calibration and validation lines are disjoint.

Writes reports/ppocr_cls/report.{json,md,html}.
"""

from __future__ import annotations

import codecs
import importlib.util
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bench.common import ROOT


def zen_lines() -> list[str]:
    import this  # noqa: F401 - prints the Zen once; the text is ROT13 in this.s

    text = codecs.decode(sys.modules["this"].s, "rot13")
    words = [w for w in text.replace("\n", " ").split(" ") if w]
    rng = random.Random(0)
    lines = []
    for _ in range(1400):
        start = rng.randrange(len(words))
        lines.append(" ".join(words[start : start + rng.randint(2, 5)]))
    return lines


def render(text: str, rng: random.Random) -> Image.Image:
    background = rng.randint(200, 255)
    image = Image.new("RGB", (192, 48), (background,) * 3)
    font = ImageFont.load_default(size=rng.randint(20, 30))
    ink = rng.randint(0, 70)
    ImageDraw.Draw(image).text((rng.randint(2, 12), rng.randint(2, 10)), text, fill=(ink,) * 3, font=font)
    return image


def build(folder: Path, lines: list[str], seed: int) -> None:
    rng = random.Random(seed)
    for i, line in enumerate(lines):
        image = render(line, rng)
        label = "180" if i % 2 else "0"
        if label == "180":
            image = image.rotate(180)
        (folder / label).mkdir(parents=True, exist_ok=True)
        image.save(folder / label / f"{i:05d}.png")


def model_path() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4 (make third-party-report does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def build_dataset(root: Path) -> tuple[Path, Path]:
    """Disjoint calibration (400) and validation (1,000) image folders under ``root``."""
    lines = zen_lines()
    calib, val = root / "calib", root / "val"
    build(calib, lines[:400], seed=1)
    build(val, lines[400:], seed=2)
    return calib, val


#: PP-OCR's classifier preprocessing: BGR, (x/255 - 0.5) / 0.5, NCHW
PREPROCESS = {"scale": 1 / 255, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "color": "BGR", "layout": "NCHW"}


def main() -> None:
    model = model_path()

    import quantkit
    from quantkit.data import PreprocessSpec
    from quantkit.evaluation.run import evaluate
    from quantkit.report.eval import to_markdown, write_report

    with tempfile.TemporaryDirectory() as tmp:
        calib, val = build_dataset(Path(tmp))
        preprocess = PreprocessSpec(**PREPROCESS)
        result = evaluate(
            model,
            val,
            quantkit.EvalOptions(
                variants="fp32,fp16,int8:entropy,int8:minmax,int8:percentile,int8:mse,int8-tensorrt:percentile,modelopt",
                num_calib_samples=400,
                max_drop=1.0,
            ),
            calib=calib,
            quiet=False,
            data_options=quantkit.DataOptions(preprocess=preprocess),
        )
    result.data["path"] = "Zen of Python text lines rendered by scripts/ppocr_cls_report.py (1,000 validation, 400 calibration)"
    out = ROOT / "reports" / "ppocr_cls"
    for path in write_report(result, out):
        print(f"wrote {path}")
    print(to_markdown(result).split("## Per-output fidelity")[0])


if __name__ == "__main__":
    main()
