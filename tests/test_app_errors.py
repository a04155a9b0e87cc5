"""Every failure a user can meet: one line saying what to do, a non-zero exit code, no
traceback (unless --debug), and whatever was recorded is kept.

Device failures that cannot be produced on a test machine (macOS privacy refusal, a busy
or unplugged microphone) are played by a stand-in for the sounddevice module; "no
microphone" is real: no sound server is running for the app.
"""

from __future__ import annotations

import json

import pytest
from app_support import FakeSoundDevice, app_env, demo_bundle, run_app, run_main, speech_wav

from moshivis_mlx.app import audio as audio_mod
from moshivis_mlx.app.demo import SAMPLE_IMAGE, SAMPLE_SPEECH
from moshivis_mlx.errors import (
    EXIT_AUDIO_DEVICE,
    EXIT_AUDIO_FILE,
    EXIT_IMAGE,
    EXIT_USAGE,
    EXIT_WEIGHTS,
)
from moshivis_mlx.wav import read_wav


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    errors = [line for line in lines if line.startswith("moshivis-mlx: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def file_mode(bundle, tmp_path, *extra: str) -> list[str]:
    return ["--weights", str(bundle), "--input-wav", str(SAMPLE_SPEECH), "--output-wav",
            str(tmp_path / "out.wav"), *extra]


# -- weights -------------------------------------------------------------------------------

def test_missing_weights_directory(tmp_path):
    r = run_app("--weights", str(tmp_path / "nope"), "--input-wav", str(SAMPLE_SPEECH),
                "--output-wav", str(tmp_path / "o.wav"))
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_WEIGHTS
    assert "does not exist" in line and "--weights DIR" in line


def test_a_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "b").mkdir()
    r = run_app("--weights", str(tmp_path / "b"), "--no-image", "--input-wav",
                str(SAMPLE_SPEECH), "--output-wav", str(tmp_path / "o.wav"))
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_WEIGHTS and "no config.json" in line and "moshivis-convert" in line


def test_offline_without_a_converted_model(tmp_path):
    env = app_env(HF_HUB_OFFLINE="1", MOSHIVIS_MLX_CACHE=str(tmp_path / "cache"),
                  HF_HOME=str(tmp_path / "hf"))
    r = run_app("--hf-repo", "kyutai/moshika-vis-pytorch-bf16", "--no-image", "--input-wav",
                str(SAMPLE_SPEECH), "--output-wav", str(tmp_path / "o.wav"), env=env)
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_WEIGHTS
    assert "cannot download kyutai/moshika-vis-pytorch-bf16" in line and "offline" in line
    for name in ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors",
                 "tokenizer_spm_32k_3.model", "--weights DIR"):
        assert name in line


# -- images ---------------------------------------------------------------------------------

def _truncated_jpeg(tmp_path):
    data = SAMPLE_IMAGE.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda p: p / "missing.jpg", "no such file"),
    (lambda p: p, "is a directory"),
    (_truncated_jpeg, "cannot decode the image"),
    (_text_file, "not an image"),
], ids=["missing", "directory", "truncated", "not-an-image"])
def test_bad_image(tmp_path, bundle, make, expected):
    image = make(tmp_path)
    r = run_app(*file_mode(bundle, tmp_path, "--image", str(image)))
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_IMAGE
    assert expected in line and str(image) in line and "JPEG or PNG" in line


def test_bad_image_in_live_mode_fails_before_opening_devices(tmp_path, bundle, monkeypatch):
    sd = FakeSoundDevice()
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    code = run_main("--weights", str(bundle), "--image", str(tmp_path / "x.png"), "--no-record")
    assert code == EXIT_IMAGE and not sd.streams


def test_debug_shows_the_traceback(tmp_path, bundle):
    r = run_app(*file_mode(bundle, tmp_path, "--image", str(tmp_path / "missing.png"),
                           "--debug"))
    assert r.returncode != 0 and "Traceback" in r.stderr and "ImageError" in r.stderr


# -- audio files ----------------------------------------------------------------------------

def test_input_that_is_not_a_wav(tmp_path, bundle):
    mp3 = tmp_path / "q.mp3"
    mp3.write_bytes(b"ID3\x04\x00" + bytes(100))
    r = run_app("--weights", str(bundle), "--no-image", "--input-wav", str(mp3),
                "--output-wav", str(tmp_path / "o.wav"))
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_AUDIO_FILE and "not a WAV file" in line and "sox" in line


def test_usage_errors_exit_2(tmp_path):
    r = run_app("--input-wav", str(SAMPLE_SPEECH))
    assert r.returncode == EXIT_USAGE and "--input-wav needs --output-wav" in r.stderr
    r = run_app("-q", "3")
    assert r.returncode == EXIT_USAGE
    assert "choose q8 (8-bit, group 64), q4 (4-bit, group 32) or bf16" in r.stderr


# -- audio devices ----------------------------------------------------------------------------

@pytest.mark.system("portaudio")
def test_no_microphone(tmp_path, bundle):
    """No sound server for the app to reach: PortAudio finds no device at all."""
    env = app_env(PULSE_SERVER=f"unix:{tmp_path}/no-such-socket")
    r = run_app("--weights", str(bundle), "--no-image", "--no-record", env=env, timeout=60)
    line = one_error_line(r.stderr)
    assert r.returncode == EXIT_AUDIO_DEVICE
    assert "no microphone found" in line and "--input-device" in line


def test_unknown_input_device(tmp_path, bundle, monkeypatch, capsys):
    monkeypatch.setattr(audio_mod, "load_backend", lambda: FakeSoundDevice())
    code = run_main("--weights", str(bundle), "--no-image", "--no-record",
                    "--input-device", "usb headset")
    line = one_error_line(capsys.readouterr().err)
    assert code == EXIT_AUDIO_DEVICE
    assert "no input device matching 'usb headset'" in line and "--list-devices" in line


@pytest.mark.parametrize("message,expected", [
    ("Error opening InputStream: Unanticipated host error [PaErrorCode -9999]: "
     "'AUHAL component not permitted' [Core Audio error -66748]",
     "System Settings > Privacy & Security > Microphone"),
    ("Error opening InputStream: Device unavailable [PaErrorCode -9985]",
     "busy or unavailable"),
], ids=["permission-denied", "busy"])
def test_microphone_refused(tmp_path, bundle, monkeypatch, capsys, message, expected):
    monkeypatch.setattr(audio_mod, "load_backend", lambda: FakeSoundDevice(open_error=message))
    code = run_main("--weights", str(bundle), "--no-image", "--record", str(tmp_path / "rec"))
    line = one_error_line(capsys.readouterr().err)
    assert code == EXIT_AUDIO_DEVICE and expected in line
    assert not (tmp_path / "rec").exists()  # nothing was recorded: nothing to keep


@pytest.mark.slow
def test_microphone_unplugged_mid_session_keeps_the_recording(tmp_path, bundle, monkeypatch,
                                                             capsys):
    sd = FakeSoundDevice(input_stops_after=25)  # 2 s of audio, then the device is gone
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    rec = tmp_path / "rec"
    code = run_main("--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--record", str(rec))
    out = capsys.readouterr()
    line = one_error_line(out.err)
    assert code == EXIT_AUDIO_DEVICE
    assert "the microphone stopped" in line and "--input-device" in line
    assert f"session saved to {rec}" in out.out

    audio, rate = read_wav(rec / "conversation.wav")
    assert rate == 24000 and audio.shape[1] == 2
    assert 1.5 * 24000 <= audio.shape[0] <= 2.1 * 24000
    assert audio[:, 0].std() > 0.1  # the microphone's tone, as the model heard it
    transcript = json.loads((rec / "transcript.json").read_text())
    assert transcript["events"][0] == {"t": 0.0, "event": "image", "path": str(SAMPLE_IMAGE)}
    assert transcript["events"][-1]["event"] == "error"
    assert "microphone stopped" in transcript["events"][-1]["message"]
    session = json.loads((rec / "session.json").read_text())
    assert session["frames"] == audio.shape[0] // 1920
    rows = (rec / "latency.csv").read_text().splitlines()
    assert len(rows) == 1 + session["frames"]


def test_list_devices_with_the_stand_in(monkeypatch, capsys):
    monkeypatch.setattr(audio_mod, "load_backend", lambda: FakeSoundDevice(rate=44100))
    assert run_main("--list-devices") == 0
    assert "Fake Microphone  (1 in, 44100 Hz)  <- default input" in capsys.readouterr().out


@pytest.mark.system("espeak-ng", "sox")
def test_file_mode_output_directory_must_exist(tmp_path, bundle):
    q = speech_wav(tmp_path / "q.wav", "Hi.")
    r = run_app("--weights", str(bundle), "--no-image", "--input-wav", str(q), "--output-wav",
                str(tmp_path / "missing" / "o.wav"))
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and "does not exist" in line


def test_recording_directory_that_cannot_be_written(tmp_path, bundle, monkeypatch, capsys):
    monkeypatch.setattr(audio_mod, "load_backend", lambda: FakeSoundDevice())
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = run_main("--weights", str(bundle), "--no-image", "--record", str(blocker / "rec"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "cannot record the session" in line and "--no-record" in line
