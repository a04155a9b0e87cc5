"""Resampling and WAV I/O: the pieces between the user's audio and Mimi's 24 kHz frames."""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest

from moshivis_mlx.resample import Resampler, resample
from moshivis_mlx.wav import AudioFileError, WavReader, WavWriter, read_wav, write_wav

RATES = [8000, 11025, 16000, 22050, 44100, 48000, 96000]


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", RATES)
def test_resample_keeps_tones_and_timing(rate):
    for a, b in ((rate, 24000), (24000, rate)):
        x = tone(1000, a)
        y = resample(x, a, b)
        assert len(y) == round(len(x) * b / a)
        ref = tone(1000, b, len(y) / b)
        # Same phase and amplitude (no delay), well below audibility (-80 dB).
        assert np.abs(y - ref)[200:-200].max() < 1e-4


@pytest.mark.parametrize("rate", [44100, 48000, 96000])
def test_resample_removes_what_24khz_cannot_hold(rate):
    x = tone(15000, rate)  # above 12 kHz: would alias to 9 kHz without filtering
    y = resample(x, rate, 24000)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-3  # from 0.35 RMS: > 50 dB down


@pytest.mark.parametrize("a,b", [(44100, 24000), (22050, 24000), (24000, 48000)])
def test_streaming_equals_offline_for_any_block_size(a, b):
    x = np.random.default_rng(0).standard_normal(a // 2).astype(np.float32) * 0.1
    whole = resample(x, a, b)
    for block in (1, 7, 1764, 3528, len(x)):
        r = Resampler(a, b)
        parts = [r.process(x[i:i + block]) for i in range(0, len(x), block)] + [r.flush()]
        out = np.concatenate(parts)
        assert len(out) == len(whole)
        np.testing.assert_allclose(out, whole, atol=1e-6)


def test_streaming_resampler_memory_is_bounded():
    r = Resampler(44100, 24000)
    block = np.zeros(3528, dtype=np.float32)
    total = 0
    for _ in range(2000):  # 160 s
        total += len(r.process(block))
        assert len(r._buf) < 3528 + 2 * r.half + 2
    assert abs(total - 2000 * 3528 * 24000 / 44100) <= r.half


# -- WAV -------------------------------------------------------------------------------

SOX_FORMATS = {
    "pcm8": ["-b", "8", "-e", "unsigned-integer"],
    "pcm16": ["-b", "16", "-e", "signed-integer"],
    "pcm24": ["-b", "24", "-e", "signed-integer"],
    "pcm32": ["-b", "32", "-e", "signed-integer"],
    "float32": ["-b", "32", "-e", "floating-point"],
}


@pytest.mark.parametrize("fmt", sorted(SOX_FORMATS))
@pytest.mark.system("sox")
def test_reads_what_sox_writes(tmp_path, fmt):
    src = tmp_path / "src.wav"
    x = np.stack([tone(440, 22050, 0.5), tone(880, 22050, 0.5, 0.25)], axis=1)
    write_wav(src, x, 22050)
    out = tmp_path / f"{fmt}.wav"
    subprocess.run(["sox", str(src), *SOX_FORMATS[fmt], str(out)], check=True)
    y, rate = read_wav(out)
    assert rate == 22050 and y.shape == x.shape and y.dtype == np.float32
    tol = 1.5 / 128 if fmt == "pcm8" else 1.5 / 32768
    np.testing.assert_allclose(y, x, atol=tol)


def test_writer_keeps_the_file_valid_while_writing(tmp_path):
    path = tmp_path / "rec.wav"
    w = WavWriter(path, 24000, channels=2, sync_every=1000)
    w.write(np.full((2500, 2), 0.25, dtype=np.float32))
    # Not closed (a crash now): the header already covers what was synced.
    y, rate = read_wav(path)
    assert rate == 24000 and y.shape[1] == 2 and y.shape[0] >= 2000
    w.close()
    y, _ = read_wav(path)
    assert y.shape == (2500, 2)
    np.testing.assert_allclose(y, 0.25, atol=1e-4)


def test_reader_streams_in_blocks(tmp_path):
    path = tmp_path / "a.wav"
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (10001, 3)).astype(np.float32)
    write_wav(path, x, 16000)
    with WavReader(path) as r:
        assert (r.sample_rate, r.channels, r.frames) == (16000, 3, 10001)
        blocks = []
        while len(b := r.read(999)):
            blocks.append(b)
    np.testing.assert_allclose(np.concatenate(blocks), x, atol=1 / 32768)


def _riff(fmt_tag: int, bits: int = 16, data: bytes = b"\0\0" * 10) -> bytes:
    fmt = struct.pack("<HHIIHH", fmt_tag, 1, 8000, 8000 * bits // 8, bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack(
        "<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("content,message", ids=["not-wav", "mu-law", "12-bit", "empty"],
                         argvalues=[
    (b"ID3\x03 not a wav at all", "not a WAV file"),
    (_riff(0x0007, 8), "compressed WAV (mu-law) is not supported"),
    (_riff(0x0001, 12), "12-bit PCM WAV is not supported"),
    (_riff(0x0001, 16, b""), "holds no audio"),
])
def test_unusable_files_get_one_line_messages(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError) as e:
        read_wav(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(AudioFileError, match="no such file"):
        read_wav(tmp_path / "nope.wav")
    with pytest.raises(AudioFileError, match="is a directory"):
        read_wav(tmp_path)
