"""The audio device layer: 24 kHz frames in and out whatever the device does, bounded
latency when the model is slow, honest counters, and device failures in plain words.

PortAudio is replaced by a scriptable stand-in here (tests/app_support.py); the real thing
is exercised against PulseAudio in test_app_live.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from app_support import FakeSoundDevice, PortAudioError

from moshivis_mlx.app import audio as audio_mod
from moshivis_mlx.app.audio import AudioIO, OutputFifo, device_error, list_devices
from moshivis_mlx.errors import EXIT_AUDIO_DEVICE, AudioDeviceError
from moshivis_mlx.stream import RELEASED

FRAME_SIZE = RELEASED.frame_size


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def read_frames(audio: AudioIO, n: int, timeout: float = 3.0) -> list[np.ndarray]:
    frames, deadline = [], time.monotonic() + timeout
    while len(frames) < n and time.monotonic() < deadline:
        f = audio.read_frame(timeout=0.2)
        if f is not None:
            frames.append(f)
    return frames


@pytest.mark.parametrize("rate,only_native", [(24000, False), (48000, True), (44100, True)])
def test_frames_are_24khz_mono_whatever_the_device(rate, only_native):
    sd = FakeSoundDevice(rate=rate, only_native=only_native, channels=2 if only_native else 1,
                         speed=4.0)
    audio = AudioIO(backend=sd)
    audio.open()
    assert (audio.in_rate, audio.out_rate) == (rate, rate)
    assert audio.in_channels == (2 if only_native else 1)
    audio.start()
    try:
        frames = read_frames(audio, 8)
        assert len(frames) == 8 and all(f.shape == (FRAME_SIZE,) for f in frames)
        x = np.concatenate(frames[2:])
        assert abs(dominant_hz(x, 24000) - 440) < 10  # the device's 440 Hz tone, at 24 kHz
        assert 0.15 < np.sqrt(np.mean(x**2)) < 0.25  # 0.3 amplitude sine: ~0.21 RMS
        # The model's frames reach the speaker, converted to its rate and channels.
        t = np.arange(3 * FRAME_SIZE) / 24000
        voice = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
        for i in range(3):  # within the speaker's backlog limit
            audio.write_frame(voice[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
        time.sleep(0.5)
    finally:
        audio.close()
    played = np.concatenate(sd.stream("output").played)
    assert played.shape[1] == sd.stream("output").channels
    mono = played[:, 0]
    start = int(np.argmax(np.abs(mono) > 0.05))
    voice_out = mono[start:start + round(2.5 * FRAME_SIZE * rate / 24000)]
    assert np.sqrt(np.mean(voice_out**2)) > 0.3  # 0.5 amplitude sine: ~0.35 RMS
    assert abs(dominant_hz(voice_out, rate) - 1000) < 15
    np.testing.assert_array_equal(played[:, 0], played[:, -1])


def test_a_slow_model_drops_frames_instead_of_piling_up_latency():
    sd = FakeSoundDevice(speed=4.0)
    audio = AudioIO(backend=sd)
    audio.open()
    audio.start()
    try:
        time.sleep(1.5)  # 75 frames arrive (4x real time) while the model reads none
        assert audio.backlog == audio.max_input_backlog + 2  # full: the rest are dropped
        frames = read_frames(audio, 3)
        assert len(frames) == 3
        assert audio.dropped >= 60
        assert audio.backlog <= audio.max_input_backlog
    finally:
        audio.close()
    # The counters account for every block the microphone gave: read, dropped or queued.
    assert audio.input_blocks == len(frames) + audio.dropped + audio.backlog


def test_underruns_are_counted_once_playing():
    sd = FakeSoundDevice(speed=4.0)
    audio = AudioIO(backend=sd)
    audio.open()
    audio.start()
    try:
        time.sleep(0.3)
        assert audio.underruns == 0  # nothing played yet: silence is not an underrun
        audio.write_frame(np.full(FRAME_SIZE, 0.1, dtype=np.float32))
        time.sleep(0.6)  # the prebuffer and the frame play, then nothing comes
        assert audio.underruns >= 2
    finally:
        audio.close()
    # Exactly the blocks the speaker played after the frame, empty, are underruns.
    played = sd.stream("output").played
    frame = next(i for i, block in enumerate(played) if block.any())
    assert audio.underruns == len(played) - 1 - frame


def test_output_fifo_keeps_order_and_bounds_latency():
    fifo = OutputFifo(max_frames=3)
    for i in range(5):
        fifo.push(np.full(4, i, dtype=np.float32))
    assert fifo.dropped == 2
    out = np.zeros(6, dtype=np.float32)
    assert fifo.read_into(out) == 6
    np.testing.assert_array_equal(out, [2, 2, 2, 2, 3, 3])
    out = np.zeros(8, dtype=np.float32)
    assert fifo.read_into(out) == 6
    np.testing.assert_array_equal(out[:6], [3, 3, 4, 4, 4, 4])


def test_a_microphone_that_stops_delivering_is_detected(monkeypatch):
    monkeypatch.setattr(audio_mod, "STALL_SECONDS", 0.4)
    sd = FakeSoundDevice(speed=4.0, input_stops_after=5, inactive_when_stopped=False)
    audio = AudioIO(backend=sd)
    audio.open()
    audio.start()
    try:
        read_frames(audio, 5)
        time.sleep(0.6)
        with pytest.raises(AudioDeviceError, match="stopped delivering audio"):
            audio.check()
    finally:
        audio.close()


def test_a_stream_that_dies_is_detected():
    sd = FakeSoundDevice(speed=4.0, input_stops_after=3)
    audio = AudioIO(backend=sd)
    audio.open()
    audio.start()
    try:
        read_frames(audio, 3)
        time.sleep(0.2)
        with pytest.raises(AudioDeviceError, match="microphone stopped"):
            audio.check()
    finally:
        audio.close()


@pytest.mark.parametrize("text,kind,device,expected", [
    ("Error querying device -1", "input", None, "no microphone found"),
    ("No input device matching 'usb mic'", "input", "usb mic", "no input device matching"),
    ("Error opening InputStream: Device unavailable [PaErrorCode -9985]", "input", None,
     "busy or unavailable"),
    ("Error opening InputStream: Unanticipated host error [PaErrorCode -9999]: "
     "'AUHAL' [Core Audio error -66748]", "input", None, "Privacy & Security > Microphone"),
    ("Error querying device -1", "output", None, "no audio output device found"),
])
def test_device_errors_say_what_to_do(text, kind, device, expected):
    e = device_error(PortAudioError(text), kind, device)
    assert expected in str(e)
    assert e.exit_code == EXIT_AUDIO_DEVICE and "\n" not in str(e)


def test_device_list():
    text = list_devices(FakeSoundDevice(rate=48000))
    assert "0  Fake Microphone  (1 in, 48000 Hz)  <- default input" in text
    assert "1  Fake Speakers  (2 out, 48000 Hz)  <- default output" in text
