"""Live mode for real: the app talks through PortAudio to a private PulseAudio server.

Speech (espeak-ng) is played into a null sink whose monitor is the app's microphone; the
app plays into another null sink whose monitor is recorded with parec. The terminal UI is
driven under tmux and its screen read back with capture-pane.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from app_support import (
    APP,
    REPO,
    PulseServer,
    demo_bundle,
    second_image,
    speech_wav,
    stop_process_group,
)

from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.wav import read_wav

# The app through PortAudio and PulseAudio, spoken to by espeak-ng (resampled by sox).
pytestmark = [pytest.mark.slow, pytest.mark.system("espeak-ng", "sox", "pulseaudio", "portaudio")]

LIVE_SECONDS = 11.5


@pytest.fixture(scope="module")
def pulse():
    server = PulseServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    return speech_wav(folder / "talk.wav", "Hello! What do you see in this picture? "
                      "Is there a house?", rate=24000)


def wait_for_line(p: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Reads the app's stdout until a line contains `text`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            if p.poll() is not None:
                break
            continue
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared; output so far:\n{''.join(lines)}")


def best_correlation(played: np.ndarray, model: np.ndarray, start_s: float = 2.0,
                     seconds: float = 2.0) -> float:
    """Highest normalised correlation between a stretch of what the model said and any
    stretch as long of what came out of the speaker (1.0: the same waveform, at some
    delay)."""
    seg = model[int(start_s * 24000):int((start_s + seconds) * 24000)].astype(np.float64)
    seg = seg - seg.mean()
    n, m = len(played), len(seg)
    size = 1 << (n + m).bit_length()
    corr = np.fft.irfft(np.fft.rfft(played, size) * np.conj(np.fft.rfft(seg, size)), size)[:n - m]
    energy = np.convolve(played.astype(np.float64) ** 2, np.ones(m), "valid")[:n - m]
    mean = np.convolve(played.astype(np.float64), np.ones(m), "valid")[:n - m] / m
    norm = np.sqrt(np.maximum(energy - m * mean**2, 1e-12)) * np.linalg.norm(seg)
    return float(np.max(corr / norm))


def test_live_conversation_through_a_real_sound_server(tmp_path, pulse, bundle, speech):
    rec = tmp_path / "session"
    captured = tmp_path / "speaker.raw"
    recorder = pulse.record_speaker(captured)
    talker = pulse.talk(speech)
    app = subprocess.Popen(
        [*APP, "--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--record", str(rec),
         "--input-device", "pulse", "--output-device", "pulse", "--seed", "0"],
        cwd=REPO, env=pulse.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for_line(app, "listening", timeout=120)
        listening = time.monotonic()
        time.sleep(LIVE_SECONDS)
        app.send_signal(signal.SIGINT)  # Ctrl-C: quit, saving the session
        out, err = app.communicate(timeout=60)
        ran_s = time.monotonic() - listening  # the microphone was open at most this long
    finally:
        if app.poll() is None:
            app.kill()
        stop_process_group(talker)
        recorder.terminate()
        recorder.wait(timeout=10)
    assert app.returncode == 0, err
    assert "Traceback" not in err
    assert f"session saved to {rec}" in out

    # The session: both sides of the conversation, at least 10 s of it.
    conv, rate = read_wav(rec / "conversation.wav")
    assert rate == 24000 and conv.shape[1] == 2
    seconds = conv.shape[0] / 24000
    session = json.loads((rec / "session.json").read_text())
    # At least 10 s of conversation: frames dropped when the machine was busy count too
    # (they are never recorded: the model did not hear them).
    assert seconds + 0.08 * session["dropped_frames"] >= 10.0, session
    assert seconds >= 5.0
    user, model = conv[:, 0], conv[:, 1]
    assert np.sqrt(np.mean(user**2)) > 0.02, "the speech played into the microphone arrived"
    assert np.sqrt(np.mean(model[24000:] ** 2)) > 0.02, "the model spoke"

    # What the speaker played is the model's voice (same waveform, some latency later).
    played = np.fromfile(captured, dtype="<i2").astype(np.float32) / 32768
    assert len(played) > 8 * 24000
    assert np.sqrt(np.mean(played**2)) > 0.02, "the speaker stayed silent"
    # Half-second stretches: an underrun on a busy machine puts a gap into what is played,
    # and a stretch across it matches less well; one whole stretch matching is the proof.
    similarity = max(best_correlation(played, model, start, 0.5) for start in (2, 3, 4, 5))
    assert similarity > 0.9

    transcript = json.loads((rec / "transcript.json").read_text())
    words = transcript["words"]
    assert len(words) > 10
    assert all(0 <= w["start"] <= w["end"] <= seconds for w in words)
    assert any(isinstance(w["gate"], float) for w in words)
    assert transcript["events"][0]["event"] == "image"

    assert session["frames"] == conv.shape[0] // 1920 and session["complete"] is True
    # The echo canceller is on by default; its delay is at least the output prebuffer.
    assert session["echo_cancel"]["enabled"] is True
    assert session["echo_cancel"]["delay_ms"] >= 80
    assert session["codec_device"] == "default" and session["kv_bits"] is None
    # The latency summary in numbers (ms), the headroom as the status line shows it.
    lat = session["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["budget_ms"] == 80.0
    assert lat["headroom_ms"] == pytest.approx(lat["budget_ms"] - lat["p95_ms"], abs=0.01)
    if lat["p95_ms"] <= lat["budget_ms"]:
        assert f"headroom {lat['budget_ms'] - lat['p95_ms']:.0f}/80 ms" in out
    else:  # a busy machine: the line says so, with the same figures
        assert f"behind real time ({lat['p95_ms']:.0f} > 80 ms)" in out
    # The counters are the audio layer's: the exit summary shows the very ones session.json
    # keeps, and with the recorded frames they account for the time the microphone ran
    # (every 80 ms it gave was recorded, dropped, or still queued at the end: the lower
    # bound is the check above).
    shown = re.search(r"dropped (\d+), underruns (\d+)", out)
    assert shown, out
    assert (session["dropped_frames"], session["underruns"]) == (int(shown[1]), int(shown[2]))
    for key in ("dropped_frames", "underruns", "input_overflows", "output_dropped"):
        assert type(session[key]) is int, (key, session)
    assert 0.08 * (session["frames"] + session["dropped_frames"]) <= ran_s + 0.5, (ran_s, session)
    rows = (rec / "latency.csv").read_text().splitlines()
    assert len(rows) == 1 + session["frames"]
    column = rows[0].split(",").index("total_ms")
    total_ms = np.array([float(r.split(",")[column]) for r in rows[1:]])
    assert np.median(total_ms) < 80, "the tiny model keeps real time"
    print(f"live: {seconds:.1f} s, speaker/model correlation {similarity:.3f}, "
          f"step p50 {np.median(total_ms):.1f} ms, "
          f"dropped {session['dropped_frames']}, underruns {session['underruns']}")


# -- the terminal UI under tmux ---------------------------------------------------------------

class Tmux:
    def __init__(self, name: str, socket: Path):
        self.name, self.socket = name, str(socket)

    def run(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True,
                           timeout=10)
        return r.stdout

    def screen(self, colours: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-e"] if colours else []), "-t", self.name)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.name, *keys)

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")


@pytest.mark.system("tmux")
def test_terminal_ui_under_tmux(tmp_path, pulse, bundle, speech):
    assert shutil.which("tmux")
    rec = tmp_path / "session"
    other = second_image(tmp_path / "second.png")
    done = tmp_path / "exit-code"
    env = " ".join(f"{k}='{v}'" for k, v in pulse.client_env(TERM="xterm-256color").items()
                   if k in ("PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE", "HOME",
                            "XDG_RUNTIME_DIR", "PYTHONPATH", "PATH", "TERM"))
    app = " ".join([*APP, "--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--record",
                    str(rec), "--input-device", "pulse", "--output-device", "pulse"])
    command = (f"cd {REPO} && env -u COLUMNS -u LINES {env} {app} 2> {tmp_path / 'stderr'}; "
               f"echo $? > {done}; sleep 60")
    tmux = Tmux("moshivis-ui", tmp_path / "tmux.sock")
    tmux.run("new-session", "-d", "-s", tmux.name, "-x", "120", "-y", "34", command)
    talker = pulse.talk(speech)
    try:
        screen = tmux.wait_for(lambda s: "transcript" in s and "headroom" in s, 120, "the UI")
        assert "sample.jpg 160x120" in screen  # the image panel, titled with name and size
        assert screen.count("\u2580") >= 32 * 12  # the thumbnail: 32 x 12 half blocks
        assert "\x1b[48;5;" in tmux.screen(colours=True)  # ... in colour
        assert "recording to" in screen and "dropped" in screen and "underruns" in screen
        assert "p50" in screen and "p95" in screen and "gate " in screen
        # The transcript fills in, word by word.
        tmux.wait_for(lambda s: "(listening" not in s, 30, "words")

        tmux.keys(" ")
        tmux.wait_for(lambda s: "mic MUTED" in s, 10, "muting")
        tmux.keys(" ")
        tmux.wait_for(lambda s: "mic MUTED" not in s, 10, "unmuting")

        tmux.keys("i")
        tmux.wait_for(lambda s: "image path:" in s, 10, "the image prompt")
        tmux.keys("-l", str(other))
        tmux.keys("Enter")
        screen = tmux.wait_for(lambda s: "second.png 160x120" in s, 30, "the second image")
        assert f"image: {other}" in screen

        tmux.keys("r")
        tmux.wait_for(lambda s: "conversation restarted" in s, 10, "the restart")

        tmux.keys("q")
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists(), tmux.screen()
        assert done.read_text().strip() == "0", (tmp_path / "stderr").read_text()
    finally:
        stop_process_group(talker)
        tmux.run("kill-server")

    assert "Traceback" not in (tmp_path / "stderr").read_text()
    events = json.loads((rec / "transcript.json").read_text())["events"]
    assert [e["event"] for e in events] == ["image", "image", "restart"]
    assert events[1]["path"] == str(other)
    conv, rate = read_wav(rec / "conversation.wav")
    session = json.loads((rec / "session.json").read_text())
    assert rate == 24000 and conv.shape[0] == session["frames"] * 1920 >= 24000, session


def test_live_with_a_camera_that_refreshes_the_image(tmp_path, pulse, bundle, speech):
    """--camera with a video file (how a webcam is stood in for): the first snapshot is the
    image, --camera-every brings new ones while the conversation goes on, and the video's
    end keeps its last frame (no error)."""
    import cv2

    video = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(20):  # 2 s of video: it ends while the session goes on
        writer.write(np.full((48, 64, 3), (40 * (i % 5), 200, 90), np.uint8))
    writer.release()
    rec = tmp_path / "session"
    talker = pulse.talk(speech)
    app = subprocess.Popen(
        [*APP, "--weights", str(bundle), "--camera", str(video), "--camera-every", "0.8",
         "--record", str(rec), "--input-device", "pulse", "--output-device", "pulse",
         "--seed", "0"],
        cwd=REPO, env=pulse.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for_line(app, "listening", timeout=120)
        time.sleep(4.5)
        app.send_signal(signal.SIGINT)
        out, err = app.communicate(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
        stop_process_group(talker)
    assert app.returncode == 0, err
    session = json.loads((rec / "session.json").read_text())
    assert session["image"] == "camera"
    images = [e["path"] for e in json.loads((rec / "transcript.json").read_text())["events"]
              if e["event"] == "image"]
    # The first snapshot, then one every 0.8 s of the 4.5 s (the last ones from the ended
    # video's last frame).
    assert images[0] == "camera" and len(images) >= 4, images
    assert images[1:] == [f"camera #{i}" for i in range(1, len(images))]


def test_a_missing_camera_is_one_line_before_any_model_loads(tmp_path, pulse, bundle):
    r = subprocess.run([*APP, "--weights", str(bundle), "--camera", str(tmp_path / "no.avi"),
                        "--input-device", "pulse", "--output-device", "pulse", "--no-record"],
                       cwd=REPO, env=pulse.client_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 7 and r.stderr.count("\n") == 1, r.stderr
    assert "no.avi" in r.stderr and "language model" not in r.stdout
