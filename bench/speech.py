"""Speech-like audio and FunASR's FSMN-VAD features, for the zoo's streaming VAD (no recordings ship
here and nothing is downloaded at run time beyond the wheel).

The audio: voiced stretches of 0.6-1.8 s (a glottal pulse train at 100-220 Hz with vibrato, shaped
by three formant resonances that move at a syllable rate of 3-6 Hz) between pauses of 0.3-1.2 s,
over a low noise floor. The features are the model's own front end (its config.yaml): 80 log-mel
filterbank energies over 25 ms Hamming frames every 10 ms, stacked five frames at a time (LFR
m=5, n=1) and normalized with the model's CMVN (am.mvn, in the wheel).
"""

from __future__ import annotations

import re

import numpy as np

RATE = 16000
FRAME, SHIFT, N_FFT, N_MELS, LFR_M = 400, 160, 512, 80, 5


def cmvn(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) from a Kaldi nnet am.mvn: its AddShift, then its Rescale vector."""
    shift, scale = re.findall(r"<LearnRateCoef> 0 \[([^\]]*)\]", text)[:2]
    return np.array(shift.split(), np.float32), np.array(scale.split(), np.float32)


def _mel_bank() -> np.ndarray:
    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    points = np.linspace(mel(20.0), mel(RATE / 2), N_MELS + 2)
    freqs = mel(np.arange(N_FFT // 2 + 1) * RATE / N_FFT)
    bank = np.zeros((N_MELS, N_FFT // 2 + 1))
    for m in range(N_MELS):
        low, centre, high = points[m : m + 3]
        bank[m] = np.clip(np.minimum((freqs - low) / (centre - low), (high - freqs) / (high - centre)), 0, None)
    return bank


def fbank(wave: np.ndarray) -> np.ndarray:
    """80 log-mel energies per 10 ms (Kaldi's conventions: 16-bit scale, DC removed, pre-emphasis 0.97)."""
    samples = wave * 32768.0
    count = 1 + (len(samples) - FRAME) // SHIFT
    frames = np.stack([samples[i * SHIFT : i * SHIFT + FRAME] for i in range(count)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1]
    power = np.abs(np.fft.rfft(frames * np.hamming(FRAME), N_FFT)) ** 2
    return np.log(np.maximum(power @ _mel_bank().T, 1e-10)).astype(np.float32)


def low_frame_rate(feats: np.ndarray) -> np.ndarray:
    """Each frame with the next LFR_M - 1 (the first repeated in front, as FunASR pads)."""
    padded = np.concatenate([np.repeat(feats[:1], (LFR_M - 1) // 2, axis=0), feats])
    last = len(padded) - 1
    return np.stack([np.concatenate([padded[min(i + k, last)] for k in range(LFR_M)]) for i in range(len(feats))])


def speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    out = rng.normal(0.0, 0.003, t.size)
    start = 0.3
    while start < seconds - 0.5:
        length = rng.uniform(0.6, 1.8)
        voiced = (t >= start) & (t < start + length)
        f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 5) * t[voiced]))
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        source = sum(np.sin(k * phase) / k for k in range(1, 30))
        envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t[voiced])) ** 2
        spectrum = np.fft.rfft(source * envelope)
        freqs = np.fft.rfftfreq(int(voiced.sum()), 1 / RATE)
        formants = sum(np.exp(-(((freqs - f) / 120.0) ** 2)) for f in rng.uniform([500, 1200, 2500], [800, 2000, 3000]))
        out[voiced] += 0.1 * np.fft.irfft(spectrum * (0.05 + formants), int(voiced.sum()))
        start += length + rng.uniform(0.3, 1.2)
    return out


def fsmn_vad_features(count: int, seed: int, mvn: str, seconds: float = 6.0) -> dict[str, np.ndarray]:
    """FSMN-VAD feeds: ``speech`` [count, T, 400] and its four caches at their start (zeros)."""
    shift, scale = cmvn(mvn)
    speech = []
    for i in range(count):
        feats = low_frame_rate(fbank(speech_like(seconds, np.random.default_rng(seed * 1000 + i))))
        speech.append(((feats + shift) * scale).astype(np.float32))
    caches = {f"in_cache{k}": np.zeros((count, 128, 19, 1), np.float32) for k in range(4)}
    return {"speech": np.stack(speech), **caches}


def speech_decisions(ref: list[np.ndarray], got: list[np.ndarray], feeds: dict) -> float:
    """Frames on FP32's side of the VAD's decision: speech where the silence posterior (class 0,
    its config's sil_pdf_ids) is under 0.5."""
    return float(np.mean((ref[0][..., 0] < 0.5) == (got[0][..., 0] < 0.5)))
