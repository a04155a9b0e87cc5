"""The server with clients we did not write: Kyutai's own command-line client (the `moshi`
package, through a private PulseAudio server: espeak-ng's question goes into its
microphone, its speaker is recorded) and fujielab-moshi-client (its library API, fed the
question's samples). Each must get audio that decodes, and text.

Neither client sends an image: Kyutai's sends its audio at once, fujielab's waits for the
handshake (the server, serving a vision model, waits a second for an image and then sends
it: Moshi's order). MoshiVis' order (image first) is tested with our client in
test_serve.py, and our page's in its browser test."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from app_support import APP, PulseServer, speech_wav, stop_process_group
from serve_support import ServerProcess, speech_frames

pytestmark = [pytest.mark.slow]

QUESTION = "Hello! What do you see in this picture? Is there a house?"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    return speech_wav(folder / "question.wav", QUESTION, rate=24000)


def _non_silent(audio: np.ndarray, seconds: float) -> None:
    assert len(audio) >= seconds * 24000, f"only {len(audio) / 24000:.2f} s of audio came back"
    assert np.all(np.isfinite(audio))
    assert float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) > 1e-3, "silent"


@pytest.mark.system("espeak-ng", "sox", "libopus")
def test_fujielab_moshi_client(server, speech):
    from fujielab.moshi.moshi_client_lib import MoshiClient

    client = MoshiClient()
    client.connect(server.ws_url())
    audio, text = [], []
    try:
        question = speech_frames(speech)
        feed = np.concatenate([question, np.zeros(3 * 24000, np.float32)])
        t0 = time.monotonic()
        for i in range(0, len(feed) - 1920 + 1, 1920):
            client.add_audio_input(feed[i:i + 1920])
            while (a := client.get_audio_output(timeout=0)) is not None:
                audio.append(a)
            while (t := client.get_text_output(timeout=0)) is not None:
                text.append(t)
            time.sleep(max(0.0, t0 + (i + 1920) / 24000 - time.monotonic()))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            while (a := client.get_audio_output(timeout=0.1)) is not None:
                audio.append(a)
            while (t := client.get_text_output(timeout=0)) is not None:
                text.append(t)
    finally:
        client.disconnect()
    _non_silent(np.concatenate(audio) if audio else np.zeros(0), 0.7 * len(feed) / 24000)
    assert "".join(text).strip(), "no text came back"
    assert server.alive()


@pytest.mark.system("espeak-ng", "sox", "pulseaudio", "portaudio")
def test_kyutai_moshi_client_through_a_sound_server(server, speech, tmp_path):
    """`python -m moshi.client`, Kyutai's command-line client, as a user runs it: its
    microphone and speaker are a private PulseAudio server's null sinks."""
    pulse = PulseServer().start()
    # ALSA's default device through PulseAudio (the client opens the default devices): a
    # private daemon's clients have its folder as their home, else a home of the test's
    home = pulse.env.get("HOME") or str(tmp_path)
    Path(home, ".asoundrc").write_text("pcm.!default { type pulse }\n"
                                       "ctl.!default { type pulse }\n")
    captured = tmp_path / "speaker.raw"
    recorder = pulse.record_speaker(captured)
    talker = pulse.talk(speech)
    env = pulse.client_env(**({} if "HOME" in pulse.env else {"HOME": home}))
    client = subprocess.Popen([APP[0], "-m", "moshi.client", "--host", "127.0.0.1",
                               "--port", str(server.port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(12)
        assert client.poll() is None, client.communicate()[1][-2000:]
    finally:
        stop_process_group(talker)
        stop_process_group(client)
        out, err = client.communicate()
        recorder.terminate()
        recorder.wait(timeout=10)
        pulse.stop()
    assert "connected!" in err, err[-2000:]
    assert "Lost connection" not in err, err[-2000:]
    assert out.strip(), f"no text printed; stderr: {err[-2000:]}"
    played = np.frombuffer(captured.read_bytes(), dtype="<i2").astype(np.float32) / 32768
    _non_silent(played, 5.0)
    assert server.alive()
