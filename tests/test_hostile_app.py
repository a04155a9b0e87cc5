"""moshivis-mlx as a hostile user drives it: outputs that are inputs, unwritable places,
pipes for files, sessions written over, absurd option values, WAV headers that lie,
images that are not images or far too big. Every one is refused in one line before any
work starts (or handled in bounded memory); no input is ever overwritten."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from app_support import REPO, FakeSoundDevice, demo_bundle, run_app, run_main

from moshivis_mlx.app import audio as audio_mod
from moshivis_mlx.app.demo import SAMPLE_IMAGE, SAMPLE_SPEECH
from moshivis_mlx.errors import (
    EXIT_AUDIO_DEVICE,
    EXIT_AUDIO_FILE,
    EXIT_ERROR,
    EXIT_IMAGE,
    EXIT_USAGE,
)
from moshivis_mlx.wav import WavReader, WavWriter, read_wav, write_wav


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


def refused(capsys, code: int, expected_code: int, *pieces: str) -> str:
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("moshivis-mlx: error: ")]
    assert code == expected_code, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "internal error" not in lines[0]
    assert "language model" not in captured.out, "refused only after loading"
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


@pytest.fixture
def question(tmp_path) -> Path:
    q = tmp_path / "q.wav"
    shutil.copy(SAMPLE_SPEECH, q)
    return q


def file_mode(bundle, question, out, *extra) -> int:
    return run_main("--weights", str(bundle), "--no-image", "--input-wav", str(question),
                    "--output-wav", str(out), *extra)


# -- outputs that are inputs ---------------------------------------------------------------------

def test_output_wav_is_the_input(bundle, question, capsys):
    before = question.read_bytes()
    code = file_mode(bundle, question, question)
    refused(capsys, code, EXIT_USAGE, f"--output-wav {question} is --input-wav")
    assert question.read_bytes() == before


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dotdot"])
def test_output_wav_reaches_the_input_another_way(bundle, question, tmp_path, capsys, link):
    before = question.read_bytes()
    if link == "symlink":
        out = tmp_path / "out.wav"
        out.symlink_to(question)
    elif link == "hardlink":
        out = tmp_path / "out.wav"
        os.link(question, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "q.wav"
    code = file_mode(bundle, question, out)
    refused(capsys, code, EXIT_USAGE, "is --input-wav")
    assert question.read_bytes() == before


def test_transcript_is_the_input_or_the_output(bundle, question, tmp_path, capsys):
    before = question.read_bytes()
    code = file_mode(bundle, question, tmp_path / "o.wav", "--transcript", str(question))
    refused(capsys, code, EXIT_USAGE, "--transcript", "is --input-wav")
    code = file_mode(bundle, question, tmp_path / "o.wav", "--transcript",
                     str(tmp_path / "o.wav"))
    refused(capsys, code, EXIT_USAGE, "--output-wav and --transcript are the same file")
    log_is_input = tmp_path / "q.json"  # its log would be q.jsonl
    shutil.copy(question, tmp_path / "q.jsonl")
    code = file_mode(bundle, tmp_path / "q.jsonl", tmp_path / "o.wav", "--transcript",
                     str(log_is_input))
    refused(capsys, code, EXIT_USAGE, "the transcript's log q.jsonl")
    assert question.read_bytes() == before


def test_output_inside_the_bundle_or_onto_the_image(bundle, question, tmp_path, capsys):
    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    before = (own / "model.safetensors").read_bytes()
    for out in (own / "model.safetensors", own / "answer.wav"):
        code = file_mode(own, question, out)
        refused(capsys, code, EXIT_USAGE, "is inside the bundle")
    assert (own / "model.safetensors").read_bytes() == before and not (own / "answer.wav").exists()
    image = tmp_path / "photo.jpg"
    shutil.copy(SAMPLE_IMAGE, image)
    code = run_main("--weights", str(own), "--image", str(image), "--input-wav", str(question),
                    "--output-wav", str(image))
    refused(capsys, code, EXIT_USAGE, "is --image")
    assert image.read_bytes() == SAMPLE_IMAGE.read_bytes()


# -- places that cannot be written, before anything loads -----------------------------------------

def test_output_that_is_a_directory(bundle, question, tmp_path, capsys):
    code = file_mode(bundle, question, tmp_path)
    refused(capsys, code, EXIT_ERROR, f"cannot write the output {tmp_path}: it is a directory")


def test_output_on_a_read_only_disk(bundle, question, tmp_path, capsys, monkeypatch):
    from moshivis_mlx import paths

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(paths.tempfile, "mkstemp", read_only)
    code = file_mode(bundle, question, tmp_path / "o.wav")
    refused(capsys, code, EXIT_ERROR, "cannot write the output", "Read-only file system",
            "writable disk")


def test_record_on_a_read_only_disk_fails_before_the_devices(bundle, tmp_path, capsys,
                                                             monkeypatch):
    from moshivis_mlx import paths

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    sd = FakeSoundDevice()
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    monkeypatch.setattr(paths.tempfile, "mkstemp", read_only)
    code = run_main("--weights", str(bundle), "--no-image", "--record", str(tmp_path / "rec"))
    refused(capsys, code, EXIT_ERROR, "cannot record the session in", "Read-only file system",
            "--no-record")
    assert not sd.streams and not (tmp_path / "rec").exists()


def test_a_session_is_never_written_over(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(audio_mod, "load_backend", lambda: FakeSoundDevice())
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "conversation.wav").write_bytes(b"an earlier session")
    code = run_main("--weights", str(bundle), "--no-image", "--record", str(rec))
    refused(capsys, code, EXIT_USAGE, f"{rec} already holds a session (conversation.wav)")
    assert (rec / "conversation.wav").read_bytes() == b"an earlier session"
    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    code = run_main("--weights", str(own), "--no-image", "--record", str(own))
    refused(capsys, code, EXIT_USAGE, "is inside the bundle")


def test_two_sessions_started_in_the_same_second_get_two_directories(tmp_path):
    from moshivis_mlx.app.recorder import SessionRecorder, default_session_dir
    from moshivis_mlx.errors import UsageError
    from moshivis_mlx.stream import RELEASED

    a = default_session_dir(tmp_path, create=True)
    b = default_session_dir(tmp_path, create=True)
    assert a != b and a.is_dir() and b.is_dir()
    first = SessionRecorder(a, RELEASED)
    with pytest.raises(UsageError, match="already holds a session"):
        SessionRecorder(a, RELEASED)  # the same --record DIR, at the same time
    first.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_pipes_are_not_files(bundle, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = file_mode(bundle, fifo, tmp_path / "o.wav")
    refused(capsys, code, EXIT_AUDIO_FILE, f"{fifo}: not a regular file")
    code = run_main("--weights", str(bundle), "--image", str(fifo), "--input-wav",
                    str(SAMPLE_SPEECH), "--output-wav", str(tmp_path / "o.wav"))
    refused(capsys, code, EXIT_IMAGE, f"{fifo}: not a regular file")


# -- option values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["--text-temperature", "nan"], "--text-temperature must be in [0, 100], got nan"),
    (["--audio-temperature", "inf"], "--audio-temperature must be in [0, 100], got inf"),
    (["--text-temperature", "-1"], "--text-temperature must be in"),
    (["--seed", "-1"], "--seed must be in"),
    (["--top-p", "nan"], "--top-p must be in"),
    (["--top-k", "99999999999"], "--top-k must be in"),
    (["--max-answer-seconds", "inf"], "--max-answer-seconds must be in (0, 3600] seconds, got inf"),
    (["--answer-silence", "nan"], "--answer-silence must be in"),
])
def test_option_values(args, expected):
    r = run_app(*args, "--input-wav", "q.wav", "--output-wav", "o.wav", timeout=60)
    assert r.returncode == EXIT_USAGE and expected in r.stderr, r.stderr


def test_no_audio_devices_at_all(monkeypatch, capsys):
    sd = FakeSoundDevice()
    sd._devices = lambda: []
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    code = run_main("--list-devices")
    line = refused(capsys, code, EXIT_AUDIO_DEVICE, "no audio devices found")
    assert "PulseAudio or PipeWire" in line


# -- WAV headers that lie --------------------------------------------------------------------------

def wav_bytes(rate: int, channels: int = 1, bits: int = 16, data: bytes = bytes(3840),
              fmt_size: int = 16, extra_chunks: bytes = b"") -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    fmt += bytes(max(0, min(fmt_size, 64) - 16))
    body = (b"WAVE" + extra_chunks + b"fmt " + struct.pack("<I", fmt_size) + fmt + b"data"
            + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("rate", [2**31 - 1, 1_000_003, 999])
def test_absurd_sample_rates(bundle, tmp_path, capsys, rate):
    q = tmp_path / "q.wav"
    q.write_bytes(wav_bytes(rate))
    code = file_mode(bundle, q, tmp_path / "o.wav")
    refused(capsys, code, EXIT_AUDIO_FILE, f"a sample rate of {rate} Hz is not audio", "sox")


def test_an_odd_rate_costs_memory_bounded_by_the_output(tmp_path):
    """767,999 Hz (no common factor with 24 kHz): 0.1 s of it resampled in a few MB (the
    exact filter bank would be 24000 phases x 1090 taps, 100 MB; 545 GiB at 2^31 - 1 Hz)."""
    from moshivis_mlx.app.files import InputFrames
    from moshivis_mlx.stream import RELEASED

    q = tmp_path / "odd.wav"
    write_wav(q, 0.1 * np.sin(np.arange(76800) * 0.01), 767_999)
    tracemalloc.start()
    with WavReader(q) as r:
        frames = list(InputFrames(r, RELEASED))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(frames) == 2 and peak < 40e6, peak


def test_a_huge_channel_count_reads_in_bounded_blocks(tmp_path):
    q = tmp_path / "many.wav"
    frames = 64
    q.write_bytes(wav_bytes(24000, channels=4096, data=bytes(4096 * 2 * frames)))
    with WavReader(q) as r:
        assert r.max_read * r.channels * 2 <= 4 << 20
        block = r.read(1 << 20)
        assert block.shape == (min(frames, r.max_read), 4096)


def test_chunk_floods_and_giant_fmt_chunks(tmp_path):
    from moshivis_mlx.errors import AudioFileError

    flood = tmp_path / "flood.wav"
    flood.write_bytes(wav_bytes(24000, extra_chunks=b"LIST\x00\x00\x00\x00" * 5000))
    with pytest.raises(AudioFileError, match="more than 4096 chunks"):
        WavReader(flood)
    giant = tmp_path / "giant.wav"
    giant.write_bytes(wav_bytes(24000, fmt_size=0x7FFFFFF0))
    with pytest.raises(AudioFileError):
        WavReader(giant)  # claims 2 GB of format: read no more than 1 KB of it


def test_recordings_past_4_gib_become_rf64(tmp_path, monkeypatch):
    """A RIFF header counts at most 4 GiB (12 hours of stereo): past it the file turns into
    RF64 in place. Shown with the limit lowered to 100 KB."""
    monkeypatch.setattr(WavWriter, "MAX_RIFF", 100_000)
    path = tmp_path / "long.wav"
    x = (0.5 * np.sin(np.arange(48000) * 0.05)).astype(np.float32)
    with WavWriter(path, 24000, channels=2, sync_every=1000) as w:
        w.write(np.stack([x[:20000], -x[:20000]], axis=1))  # 80 KB: still RIFF
        assert path.read_bytes()[:4] == b"RIFF"
        w.write(np.stack([x[20000:], -x[20000:]], axis=1))  # 192 KB in all
        w.sync()
        assert path.read_bytes()[:4] == b"RF64"
    audio, rate = read_wav(path)
    assert rate == 24000 and audio.shape == (48000, 2)
    np.testing.assert_allclose(audio[:, 0], x, atol=1 / 32767)
    head = path.read_bytes()[:80]
    riff, data, samples = struct.unpack("<QQQ", head[20:44])
    assert (head[12:16], riff, data, samples) == (b"ds64", len(path.read_bytes()) - 8,
                                                  48000 * 4, 48000)


@pytest.mark.system("sox")
def test_rf64_and_riff_recordings_read_in_sox(tmp_path, monkeypatch):
    for limit in (0xFFFFFFFF, 10_000):
        monkeypatch.setattr(WavWriter, "MAX_RIFF", limit)
        path = tmp_path / f"r{limit}.wav"
        write_wav(path, 0.3 * np.ones((24000, 2), np.float32), 24000)
        p = subprocess.run(["sox", "--i", "-s", str(path)], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == "24000", p.stderr


# -- images ----------------------------------------------------------------------------------------

MAGIC_FILES = {
    "doc.jpg": (b"%PDF-1.7\n" + bytes(200), "a PDF document"),
    "photo.avif": (b"\x00\x00\x00\x1cftypavif" + bytes(200), "an AVIF image"),
    "clip.jpg": (b"\x00\x00\x00\x18ftypisom" + bytes(200), "an MP4 video"),
    "art.png": (b"<?xml version='1.0'?><svg xmlns='x'></svg>", "an SVG drawing"),
    "pic.jxl": (b"\xff\x0a" + bytes(200), "a JPEG XL image"),
    "pics.jpg": (b"PK\x03\x04" + bytes(200), "a ZIP archive"),
    "page.png": (b"<!DOCTYPE html><html></html>", "an HTML page"),
}


@pytest.mark.parametrize("name", sorted(MAGIC_FILES))
def test_files_that_are_not_images_are_named(bundle, tmp_path, capsys, name):
    data, kind = MAGIC_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    code = run_main("--weights", str(bundle), "--image", str(path), "--input-wav",
                    str(SAMPLE_SPEECH), "--output-wav", str(tmp_path / "o.wav"))
    refused(capsys, code, EXIT_IMAGE, f"{path}: {kind}", "JPEG or PNG")


@pytest.mark.slow
def test_an_iphone_photo(bundle, tmp_path):
    """A HEIC photo through the app (a fresh process: nothing registered beforehand)."""
    import pillow_heif
    from PIL import Image

    heic = tmp_path / "IMG_0001.HEIC"
    pillow_heif.from_pillow(Image.open(SAMPLE_IMAGE)).save(heic)
    r = run_app("--weights", str(bundle), "--image", str(heic), "--input-wav",
                str(SAMPLE_SPEECH), "--output-wav", str(tmp_path / "o.wav"), "--same-length")
    assert r.returncode == 0, r.stderr
    from moshivis_mlx.image import load_image

    img = load_image(heic)
    assert img.mode == "RGB" and img.size == Image.open(SAMPLE_IMAGE).size
    diff = np.abs(np.asarray(img, np.float32) - np.asarray(Image.open(SAMPLE_IMAGE), np.float32))
    assert diff.mean() < 12  # the same picture, through a lossy codec


def test_heic_without_its_plugin_says_what_to_install(tmp_path):
    from PIL import Image
    from pillow_heif import register_heif_opener

    register_heif_opener()
    heic = tmp_path / "IMG_0002.heic"
    Image.open(SAMPLE_IMAGE).save(heic, format="HEIF")
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from moshivis_mlx.image import load_image\n"
            f"load_image({str(heic)!r})")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert "a HEIC photo, and HEIC support (pillow-heif) is not installed" in p.stderr


def test_a_large_rotated_photo_is_reduced_and_upright(tmp_path):
    from PIL import Image

    from moshivis_mlx.image import MAX_SIDE, load_image

    img = Image.new("RGB", (6000, 3000), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 3000, 3000))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown turned 90 degrees clockwise
    img.save(tmp_path / "big.jpg", exif=exif, quality=90)
    out = load_image(tmp_path / "big.jpg")
    assert max(out.size) < 2 * MAX_SIDE and out.size[1] > out.size[0]  # upright: tall
    top, bottom = np.asarray(out)[10, out.size[0] // 2], np.asarray(out)[-10, out.size[0] // 2]
    assert top[2] > 150 and bottom[0] > 150  # blue on top, red below


PEAK = """import sys
from moshivis_mlx.image import load_image
img = load_image(sys.argv[1])
kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(img.size, img.mode, kb)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory from /proc")
def test_a_100_megapixel_16_bit_png_costs_its_raster_once(tmp_path):
    """10000 x 10000 grey at 16 bits: 200 MB of raster. Converted at full size it took
    2.7 GB; reduced first, a little over twice the raster (the PNG decoder's buffers)."""
    from PIL import Image

    a = (np.arange(10_000 * 10_000, dtype=np.uint32) % 65536).astype(np.uint16)
    Image.fromarray(a.reshape(10_000, 10_000)).save(tmp_path / "big16.png", compress_level=1)
    del a
    p = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big16.png")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    peak_mb = int(p.stdout.split()[-1]) / 1024
    assert "RGB" in p.stdout and peak_mb < 700, p.stdout


# -- what a new user reads -------------------------------------------------------------------------

def test_exit_summary_shows_headroom_as_the_status_line_does():
    from moshivis_mlx.app.ui import LiveStats
    from moshivis_mlx.session import Stats

    stats = LiveStats()
    for i in range(50):
        stats.add(Stats(i, i * 0.08, 74.0, 10.0, 0.1))
    assert "headroom 6/80 ms" in stats.summary()
    assert stats.numbers() == {"p50_ms": 74.0, "p95_ms": 74.0, "budget_ms": 80.0,
                               "headroom_ms": 6.0}


def test_session_json_is_there_from_the_start_and_lists_every_image(tmp_path):
    from moshivis_mlx.app.recorder import SessionRecorder
    from moshivis_mlx.stream import RELEASED

    rec = SessionRecorder(tmp_path / "s", RELEASED, {"image": "a.jpg"})
    first = json.loads((tmp_path / "s" / "session.json").read_text())
    assert first["complete"] is False and first["duration_s"] == 0
    rec.add_event("image", path="a.jpg")
    for _ in range(25):
        rec.add_audio(np.zeros(1920, np.float32), np.zeros(1920, np.float32))
    rec.add_event("image", path="b.png")
    rec.close({"latency": {"p50_ms": 20.0}})
    session = json.loads((tmp_path / "s" / "session.json").read_text())
    assert session["complete"] is True
    assert session["images"] == [{"t": 0.0, "path": "a.jpg"}, {"t": 2.0, "path": "b.png"}]
    assert session["latency"] == {"p50_ms": 20.0}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "conversation.wav", "latency.csv", "session.json", "transcript.json"]


def test_the_docs_say_where_make_install_puts_the_commands():
    for doc in ("README.md", "docs/APP.md"):
        text = (REPO / doc).read_text()
        assert "source .venv/bin/activate" in text and ".venv/bin/moshivis-mlx" in text, doc


# -- moshivis-bench ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["--codec-frames", "-1"], "--codec-frames must be in [0, 1000000]"),
    (["--image-encodes", "-2"], "--image-encodes in [0, 10000]"),
    (["--steps", "1000000000000"], "--steps must be in [1, 1000000]"),
    (["--json", "/nonexistent-dir/r.json"], "cannot write --json /nonexistent-dir/r.json"),
])
def test_bench_refuses_before_timing(tmp_path, args, expected):
    p = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.bench", "--config", "tiny",
                        "--steps", "3", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and expected in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "internal error" not in p.stderr
    assert "p50" not in p.stdout  # nothing was timed


def test_bench_json_is_not_the_bundle(bundle, tmp_path):
    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    p = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.bench", "--weights", str(own),
                        "--steps", "3", "--json", str(own / "config.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "is inside --weights" in p.stderr, p.stderr
    assert json.loads((own / "config.json").read_text())["lm"]


def test_offline_first_run_fails_in_seconds(tmp_path):
    """No HF_HUB_OFFLINE, but no Hub either: one line with the manual steps in seconds
    (it took 95 s of retry warnings)."""
    import time

    from app_support import app_env

    env = app_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
                  MOSHIVIS_MLX_CACHE=str(tmp_path / "cache"))
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    r = run_app("--image", str(SAMPLE_IMAGE), "--input-wav", str(SAMPLE_SPEECH), "--output-wav",
                str(tmp_path / "o.wav"), env=env, timeout=120)
    assert r.returncode == 4 and time.monotonic() - t0 < 20, r.stderr
    assert "Retrying" not in r.stderr and r.stderr.count("moshivis-mlx: error:") == 1
    for name in ("model.safetensors", "tokenizer_spm_32k_3.model", "--hf-repo F"):
        assert name in r.stderr


def test_a_failure_mid_run_keeps_both_files_complete(bundle, question, tmp_path, capsys,
                                                    monkeypatch):
    """The disk fills up halfway (here: the tenth frame fails): one line, exit 1, and the
    answer and transcript so far are complete files, no log left behind."""
    from moshivis_mlx import session as session_mod

    original = session_mod.Session.submit

    def submit(self, frame, text=None):
        if self.frames == 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, frame, text)

    monkeypatch.setattr(session_mod.Session, "submit", submit)
    out, transcript = tmp_path / "o.wav", tmp_path / "o.json"
    code = file_mode(bundle, question, out, "--transcript", str(transcript))
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and err.count("moshivis-mlx: error:") == 1, err
    assert "No space left on device" in err and "internal" not in err
    assert len(read_wav(out)[0]) > 0
    assert json.loads(transcript.read_text())["answer_end"] == "error"
    assert not (tmp_path / "o.jsonl").exists()
