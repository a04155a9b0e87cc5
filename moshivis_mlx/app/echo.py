"""Acoustic echo cancellation: the microphone without the model's own voice.

Through laptop speakers the microphone hears what the model says, and a full-duplex model
then answers itself. The canceller sits between the audio devices and the conversation:
every frame sent to the speaker is given to `far_end` (the reference), every microphone
frame goes through `near_end`, and the model only ever sees the cleaned microphone.

The work is done by WebRTC's audio processing module (AEC3: a delay estimator, a
frequency-domain adaptive filter and a residual-echo suppressor, with the high-pass filter
it requires), through the `pywebrtc-audio` bindings. Why that package:
- wheels for macOS arm64 and x86-64, Linux x86-64 and aarch64 (manylinux_2_28) and
  Windows, Python 3.10-3.14, 0.4 MB, numpy its only dependency, so it can be a main
  dependency (the canceller is on by default);
- numpy float32 in and out, any multiple of 10 ms per call, the GIL released;
- 24 kHz works natively (WebRTC splits it into bands itself): no resampling here.
The alternatives: `livekit` wraps the same AEC3 but is a 12 MB real-time SDK whose every
10 ms call goes through a protobuf FFI, and its steeper high-pass filter (-14 dB at 80 Hz,
against -0.6 dB) changes the waveform of a low voice more;
`speexdsp`, `webrtc-audio-processing` and `aec-audio-processing` ship source only (a C++
toolchain, swig or meson to install); `pyaec` (Speex) reached 13-20 dB in the same room.

Alignment. The reference is paired with the microphone by order: the n-th reference
sample is compared with the n-th microphone sample, after `delay_ms - ALIGN_MARGIN_MS`
of silence put in front of the reference. AEC3 finds the remaining delay itself (it
handles a few ms to about 500 ms), so the margin only has to cover an over-reported
device latency; without the alignment, speaker paths longer than 500 ms (Bluetooth, big
buffers) would not be cancelled at all. A microphone frame that arrives before its
reference is compared with silence, which is what the speaker played.

Figures (tests/test_app_echo.py, a simulated laptop: a 250 ms room response, 40-700 ms
of delay, noise 45 dB below the echo; docs/APP.md has the tables): 32-34 dB less echo
from 2 s after it starts, 40-48 dB after 4 s; the module delays the microphone by 9.3 ms;
about 1 ms of CPU per 80 ms frame. In double talk AEC3 favours removing echo: it holds
down the first 100-200 ms of each word the user says while the model speaks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import AudioDeviceError
from ..stream import RELEASED

SAMPLE_RATE, FRAME_SIZE = RELEASED.sample_rate, RELEASED.frame_size

ALIGN_MARGIN_MS = 80.0
"""How much earlier than the reported delay the reference is aligned: AEC3 needs the echo
to come after its reference, so an over-reported latency must not make it come before."""
MAX_LEAD_S = 0.5
"""Reference kept beyond the alignment when the speaker side runs ahead of the microphone
(dropped microphone frames): older samples are dropped, memory stays bounded."""
ERLE_WINDOW_S = 1.0
"""The echo return loss enhancement in `stats` is over this much far-end activity."""
FAR_ACTIVE_DBFS = -50.0
"""A reference frame louder than this (RMS) means the speaker is playing."""
ECHO_TAIL_S = 0.3
"""A microphone frame may hold the echo of reference frames up to this old."""
FLOOR = 1e-10
"""Energy floor (-100 dBFS) so silence does not divide by zero."""

INSTALL_FIX = ("reinstall the app (pip install moshivis-mlx) to get pywebrtc-audio, or run "
               "with --no-echo-cancel (with headphones there is no echo)")


@dataclass(frozen=True)
class EchoStats:
    """What the status line shows: `erle_db` is how much quieter the echo is after the
    canceller (dB, over the last second during which the model was heard; None before),
    `far_active` whether the speaker is playing now."""

    enabled: bool
    erle_db: float | None
    far_active: bool
    delay_ms: float
    frames: int


def load_apm(sample_rate: int) -> Any:
    """A WebRTC audio processor with echo cancellation only (no noise suppression, no
    gain control: the model hears the room as it is); a one-line error if missing."""
    try:
        from pywebrtc_audio import AudioProcessor
    except ImportError as e:
        raise AudioDeviceError(f"echo cancellation is unavailable ({e})", INSTALL_FIX) from None
    return AudioProcessor(sample_rate=sample_rate, echo_cancellation=True)


def _energy(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0


def _mono_float(pcm: np.ndarray) -> np.ndarray:
    """Float32 in [-1, 1], one contiguous channel (int16 frames are scaled)."""
    x = np.asarray(pcm)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


class EchoCanceller:
    """WebRTC AEC3 on 24 kHz mono float32 frames in [-1, 1]; see the module docstring.

    Call `far_end` with every frame sent to the speaker and `near_end` with every
    microphone frame, from one thread. Frames must be multiples of 10 ms (the app's
    80 ms frames are). `delay_ms` is how long after `far_end` its echo reaches
    `near_end`: output latency + input latency + output prebuffer."""

    enabled = True

    def __init__(self, sample_rate: int = SAMPLE_RATE, frame_size: int = FRAME_SIZE,
                 delay_ms: float = 0.0):
        if sample_rate % 100:
            raise ValueError(f"the echo canceller works on 10 ms blocks; {sample_rate} Hz has "
                             f"no whole number of samples in 10 ms (resample first)")
        self.sample_rate = int(sample_rate)
        self.frame_size = int(frame_size)
        self.block = self.sample_rate // 100
        self._apm = load_apm(self.sample_rate)
        self._window = max(1, round(ERLE_WINDOW_S * self.sample_rate / self.frame_size))
        self._tail = max(1, round(ECHO_TAIL_S * self.sample_rate / self.frame_size))
        self.delay_ms = 0.0
        self._reset_state()
        self.set_delay_ms(delay_ms)

    def _reset_state(self) -> None:
        self._ref = np.zeros(0, dtype=np.float32)  # reference not yet paired
        self._skip = 0  # reference samples still to drop (the delay was shortened)
        self._far_levels: deque[float] = deque(maxlen=self._tail)
        self._erle: deque[tuple[float, float]] = deque(maxlen=self._window)
        self._frames = 0

    def reset(self) -> None:
        """Forgets the echo path and the statistics (devices reopened, a new room)."""
        self._apm.reset()
        delay, self.delay_ms = self.delay_ms, 0.0
        self._reset_state()
        self.set_delay_ms(delay)

    def _aligned(self, ms: float) -> int:
        """Samples of silence in front of the reference for a delay of `ms`."""
        return round(max(0.0, ms - ALIGN_MARGIN_MS) * self.sample_rate / 1000)

    def set_delay_ms(self, ms: float) -> None:
        """Aligns the reference with the echo: the devices' reported latency in ms."""
        if ms < 0:
            raise ValueError(f"the echo delay cannot be negative, got {ms} ms")
        change = self._aligned(ms) - self._aligned(self.delay_ms)
        self.delay_ms = float(ms)
        if change > 0:  # the next microphone samples pair with older sound: silence first
            self._ref = np.concatenate([np.zeros(change, dtype=np.float32), self._ref])
        elif change < 0:
            drop = min(-change, len(self._ref))
            self._ref = self._ref[drop:]
            self._skip += -change - drop
        # A hint only: AEC3 estimates the remaining delay itself.
        self._apm.stream_delay_ms = int(round(min(ms, ALIGN_MARGIN_MS)))

    def far_end(self, pcm: np.ndarray) -> None:
        """The frame just sent to the speaker, exactly as sent."""
        x = _mono_float(pcm)
        if self._skip:
            drop = min(self._skip, len(x))
            x, self._skip = x[drop:], self._skip - drop
        self._ref = np.concatenate([self._ref, x])
        limit = self._aligned(self.delay_ms) + round(MAX_LEAD_S * self.sample_rate)
        if len(self._ref) > limit:
            self._ref = self._ref[len(self._ref) - limit:]

    def _take_reference(self, n: int) -> np.ndarray:
        """The next `n` reference samples; silence where the speaker had nothing yet."""
        ref, self._ref = self._ref[:n], self._ref[n:]
        if len(ref) < n:
            ref = np.concatenate([ref, np.zeros(n - len(ref), dtype=np.float32)])
        return ref

    def near_end(self, pcm: np.ndarray) -> np.ndarray:
        """The microphone frame -> the same frame without the echo (float32)."""
        mic = _mono_float(pcm)
        if len(mic) % self.block:
            raise ValueError(f"microphone frames must be multiples of 10 ms "
                             f"({self.block} samples), got {len(mic)}")
        ref = self._take_reference(len(mic))
        out = self._apm.process(mic, ref)
        self._account(ref, mic, out)
        return out

    def _account(self, ref: np.ndarray, mic: np.ndarray, out: np.ndarray) -> None:
        self._frames += 1
        self._far_levels.append(_energy(ref))
        if self.far_active:
            self._erle.append((_energy(mic), _energy(out)))

    @property
    def far_active(self) -> bool:
        """Whether the speaker played something whose echo can be in the last frame."""
        threshold = 10 ** (FAR_ACTIVE_DBFS / 10)
        return any(e > threshold for e in self._far_levels)

    @property
    def stats(self) -> EchoStats:
        erle = None
        if self._erle:
            mic = sum(m for m, _ in self._erle)
            out = sum(o for _, o in self._erle)
            erle = 10 * np.log10(max(mic, FLOOR) / max(out, FLOOR))
        return EchoStats(True, None if erle is None else float(erle), self.far_active,
                         self.delay_ms, self._frames)


class NoEchoCanceller:
    """The pass-through for --no-echo-cancel (headphones): the same calls, no change."""

    enabled = False

    def __init__(self, sample_rate: int = SAMPLE_RATE, frame_size: int = FRAME_SIZE,
                 delay_ms: float = 0.0):
        self.sample_rate, self.frame_size, self.delay_ms = sample_rate, frame_size, delay_ms
        self._frames = 0

    def reset(self) -> None:
        self._frames = 0

    def set_delay_ms(self, ms: float) -> None:
        self.delay_ms = float(ms)

    def far_end(self, pcm: np.ndarray) -> None:
        pass

    def near_end(self, pcm: np.ndarray) -> np.ndarray:
        self._frames += 1
        return _mono_float(pcm)

    @property
    def stats(self) -> EchoStats:
        return EchoStats(False, None, False, self.delay_ms, self._frames)


def echo_canceller(enabled: bool = True, sample_rate: int = SAMPLE_RATE,
                   frame_size: int = FRAME_SIZE,
                   delay_ms: float = 0.0) -> EchoCanceller | NoEchoCanceller:
    """The canceller the app uses: WebRTC AEC3, or the pass-through when disabled."""
    cls = EchoCanceller if enabled else NoEchoCanceller
    return cls(sample_rate=sample_rate, frame_size=frame_size, delay_ms=delay_ms)
