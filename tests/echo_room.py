"""A simulated room for the echo-canceller tests: speech, a loudspeaker-to-microphone
impulse response, a delay, microphone noise, and the measures the tests assert on.

The microphone hears `far * rir` (the model's voice from the speaker, delayed by the
devices and the air) plus noise, plus the user's voice during double talk. Everything is
float32 at 24 kHz in [-1, 1].
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 24000
FRAME = 1920

MODEL_TEXT = ("Here is a picture of a small harbour at sunset. There are three boats near the "
              "wooden pier, and the sky is orange and pink above the hills. A man is walking "
              "his dog along the water, and some seagulls are flying over the masts.")
USER_TEXT = "Wait, what colour is the boat on the left? Tell me about the dog."


def have_speech_tools() -> bool:
    return bool(shutil.which("espeak-ng") and shutil.which("sox"))


def spoken(text: str, voice: str = "en-us", pitch: int = 50, speed: int = 160) -> np.ndarray:
    """`text` read by espeak-ng, at 24 kHz (sox), float32, peak 0.5."""
    with tempfile.TemporaryDirectory() as d:
        raw, out = Path(d) / "raw.wav", Path(d) / "out.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed),
                        "-w", str(raw), text], check=True, capture_output=True)
        subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out)],
                       check=True, capture_output=True)
        with wave.open(str(out)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    x = pcm.astype(np.float32) / 32768.0
    return (0.5 * x / max(1e-9, float(np.abs(x).max()))).astype(np.float32)


def voiced(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A speech-like synthetic signal: a glottal-ish harmonic series with a wandering pitch,
    two moving formant-like resonances and syllable-rate on/off envelopes (peak 0.5)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = f0 * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    formants = [700 + 300 * np.sin(2 * np.pi * 2.1 * t), 1800 + 500 * np.sin(2 * np.pi * 1.3 * t)]
    x = np.zeros(n)
    for k in range(1, 40):
        fk = k * pitch
        gain = sum(np.exp(-((fk - f) / 250.0) ** 2) for f in formants) + 0.05
        x += gain * np.sin(k * phase) / k
    syllables = (np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)) > -0.3).astype(float)
    words = (np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 6)) > -0.5).astype(float)
    env = np.convolve(syllables * words, np.hanning(480) / np.hanning(480).sum(), mode="same")
    x = x * env + 0.01 * rng.standard_normal(n) * env
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def model_voice(seconds: float) -> np.ndarray:
    """The model's voice: real speech when espeak-ng and sox exist, else synthetic."""
    if have_speech_tools():
        x = spoken(MODEL_TEXT, voice="en-us+f3", pitch=60)
    else:
        x = voiced(seconds, 210.0, seed=1)
    return fit(x, seconds)


def user_voice(seconds: float) -> np.ndarray:
    if have_speech_tools():
        x = spoken(USER_TEXT, voice="en-gb+m3", pitch=35)
    else:
        x = voiced(seconds, 120.0, seed=2)
    return fit(x, seconds)


def fit(x: np.ndarray, seconds: float) -> np.ndarray:
    """`x` looped or cut to exactly `seconds`."""
    n = int(seconds * RATE)
    reps = -(-n // len(x))
    return np.tile(x, reps)[:n].astype(np.float32)


def room_response(length_ms: float = 250.0, rt60_ms: float = 300.0, seed: int = 0,
                  reverb_db: float = -9.0) -> np.ndarray:
    """A loudspeaker-to-microphone impulse response: a direct path at tap 0, then
    exponentially decaying noise (reverberation reaching -60 dB after `rt60_ms`), with a
    2 ms gap standing for the first reflection's extra distance."""
    rng = np.random.default_rng(seed)
    n = int(length_ms * RATE / 1000)
    t = np.arange(n) / RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / (rt60_ms / 1000))
    tail[: int(0.002 * RATE)] = 0.0
    h = 10 ** (reverb_db / 20) * tail / np.sqrt(np.sum(tail ** 2))
    h[0] += 1.0  # the direct path
    return h.astype(np.float32)


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)
    return y[:n]


@dataclass
class Room:
    """A simulated room: what the speaker plays reaches the microphone through `rir` after
    `delay_ms`, scaled by `echo_gain`, plus white noise `noise_db` below the echo."""

    delay_ms: float = 80.0
    echo_gain: float = 0.5
    noise_db: float = 45.0
    reverb_db: float = -9.0
    rt60_ms: float = 300.0
    seed: int = 0

    def echo(self, far: np.ndarray) -> np.ndarray:
        h = room_response(rt60_ms=self.rt60_ms, seed=self.seed, reverb_db=self.reverb_db)
        d = int(round(self.delay_ms * RATE / 1000))
        e = fft_convolve(far, h)[: len(far)] * self.echo_gain
        return np.concatenate([np.zeros(d), e])[: len(far)].astype(np.float32)

    def noise(self, n: int, level_of: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.mean(level_of.astype(np.float64) ** 2))
        rng = np.random.default_rng(self.seed + 100)
        return (rng.standard_normal(n) * rms * 10 ** (-self.noise_db / 20)).astype(np.float32)


def run_canceller(canceller, far: np.ndarray, mic: np.ndarray) -> np.ndarray:
    """Plays `far` and records `mic` frame by frame through `canceller`, the way the app
    does: each frame is handed to the speaker (far_end) and the microphone frame of the
    same period is cleaned (near_end)."""
    out = []
    for i in range(0, len(far) - FRAME + 1, FRAME):
        canceller.far_end(far[i:i + FRAME])
        out.append(canceller.near_end(mic[i:i + FRAME]))
    return np.concatenate(out)


def energy_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-20)


def erle_db(echo_mic: np.ndarray, out: np.ndarray) -> float:
    """Echo return loss enhancement: the echo-only microphone's energy over the
    canceller's output energy, in dB."""
    return energy_db(echo_mic) - energy_db(out)


def best_lag(out: np.ndarray, clean: np.ndarray, max_lag: int = 960) -> int:
    """The delay (0..`max_lag` samples) of `clean` inside `out` (cross-correlation peak)."""
    size = 1 << (len(out) + len(clean)).bit_length()
    cc = np.fft.irfft(np.fft.rfft(out, size) * np.conj(np.fft.rfft(clean, size)), size)
    return int(np.argmax(cc[:max_lag + 1]))


def aligned_correlation(out: np.ndarray, clean: np.ndarray, max_lag: int = 960) -> float:
    """Pearson correlation of `out` with `clean` once `out` is shifted back by its delay
    (the canceller delays its output by its own block processing)."""
    lag = best_lag(out, clean, max_lag)
    n = min(len(clean), len(out) - lag)
    return float(np.corrcoef(clean[:n], out[lag:lag + n])[0, 1])
