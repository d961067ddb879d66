"""Train the small demo CNN on the bundled MNIST split and export it to ONNX.

Architecture (chosen to exercise what quantkit handles): Conv+BN+ReLU stacks, a residual block
with a skip-connection Add, an Inception-style block (three sibling 1x1 convolutions on the same
input, a 3x3 path and a max-pool branch, joined by Concat, as in the seed article), global
average pooling and a Gemm classifier. BatchNormalization is kept in the exported graph so
the structure-optimization passes have real BN to fold.

Needs CPU torch:  pip install torch==2.13.0
Run:              python scripts/train_demo_model.py
Writes:           calib_data/demo_cnn.onnx and calib_data/demo_cnn.json (FP32 accuracy record)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent / "calib_data"
MEAN, STD = 0.1307, 0.3081


def cbr(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=True), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = cbr(c, c, 3)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.a(x)) + x)


class Inception(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = cbr(cin, 16, 1)
        self.b2 = nn.Sequential(cbr(cin, 16, 1), cbr(16, 24, 3))
        self.b3 = nn.Sequential(cbr(cin, 8, 1), cbr(8, 8, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), cbr(cin, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class DemoCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(1, 16, 3), cbr(16, 32, 3, stride=2), Residual(32), Inception(32), cbr(56, 64, 3, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def load_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(folder.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f), dtype=np.float32) for f in files])
    y = np.array([int(f.parent.name) for f in files])
    return x, y


def load_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    x = np.stack([np.asarray(Image.open(io.BytesIO(img["bytes"])), dtype=np.float32) for img in table["image"]])
    return x, np.array(table["label"])


def normalize(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((x / 255.0 - MEAN) / STD).astype(np.float32)[:, None])


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    xtr, ytr = load_folder(ROOT / "mnist" / "calib")
    xva, yva = load_parquet(ROOT / "mnist" / "val.parquet")
    xtr_t, ytr_t, xva_t = normalize(xtr), torch.from_numpy(ytr), normalize(xva)

    model = DemoCNN()
    epochs = 12
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(ytr) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            xb = xtr_t[idx]
            # small random shifts: a cheap augmentation that keeps 4,000 images from overfitting
            dx, dy = np.random.randint(-2, 3, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xva_t).argmax(1).numpy() == yva).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f} val top-1 {acc * 100:.2f}%")

    model.eval()
    out = ROOT / "demo_cnn.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
        dynamo=False,
    )
    record = {
        "model": "demo_cnn.onnx",
        "task": "MNIST digit classification (10 classes), input image[N,1,28,28] float32",
        "preprocess": {"scale": 1 / 255, "mean": [MEAN], "std": [STD], "color": "L", "layout": "NCHW"},
        "train_split": "calib_data/mnist/calib (4,000 images)",
        "val_split": "calib_data/mnist/val.parquet (1,000 images)",
        "fp32_val_top1": round(float(acc), 4),
        "epochs": epochs,
        "torch": torch.__version__,
    }
    (ROOT / "demo_cnn.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
