"""What survives which stop: SIGTERM, SIGHUP, a second Ctrl-C and SIGKILL, in file mode and
in live mode (stand-in devices). Recordings lose at most the last second; a caught signal
saves everything and exits 128 + the signal."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from app_support import demo_bundle, jsonl, start_app, wait_until

from moshivis_mlx.wav import read_wav, write_wav

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


@pytest.fixture(scope="module")
def long_question(tmp_path_factory) -> Path:
    """A minute of noise: file mode takes long enough to be stopped halfway."""
    path = tmp_path_factory.mktemp("q") / "long.wav"
    write_wav(path, 0.1 * np.random.default_rng(0).standard_normal(60 * 24000), 24000)
    return path


def _words_logged(log: Path, n: int = 3):
    def check() -> bool:
        try:
            return sum(1 for o in jsonl(log) if o["type"] == "word") >= n
        except (FileNotFoundError, json.JSONDecodeError):
            return False  # not there yet, or a line half written this instant
    return check


def _file_mode(bundle, question, tmp_path):
    out, transcript = tmp_path / "answer.wav", tmp_path / "answer.json"
    p = start_app("--weights", str(bundle), "--no-image", "--input-wav", str(question),
                  "--output-wav", str(out), "--transcript", str(transcript), "--same-length")
    wait_until(_words_logged(tmp_path / "answer.jsonl"), 120, "the first words", p)
    time.sleep(1.0)
    return p, out, transcript


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                      (signal.SIGINT, 130)])
def test_file_mode_stopped_by_a_signal_saves_everything(bundle, long_question, tmp_path, sig,
                                                        code):
    p, out, transcript = _file_mode(bundle, long_question, tmp_path)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "moshivis-mlx: error: interrupted" in err and "Traceback" not in err
    audio, rate = read_wav(out)
    t = json.loads(transcript.read_text())  # complete JSON, not 0 bytes
    assert t["answer_end"] == "interrupted" and t["words"]
    assert t["duration_s"] == pytest.approx(len(audio) / rate, abs=1e-3) and len(audio) > 0
    assert not (tmp_path / "answer.jsonl").exists()


def test_file_mode_killed_keeps_all_but_the_last_second(bundle, long_question, tmp_path):
    p, out, transcript = _file_mode(bundle, long_question, tmp_path)
    p.kill()
    p.wait(timeout=30)
    audio, rate = read_wav(out)  # a valid WAV holding what was made, up to the last sync
    assert len(audio) >= rate
    lines = jsonl(tmp_path / "answer.jsonl")  # every line parses
    assert lines[0]["type"] == "header" and lines[0]["sample_rate"] == 24000
    words = [o for o in lines if o["type"] == "word"]
    assert len(words) >= 3
    # What was spoken up to a second before the WAV's end is in the log.
    logged_until = max(o["end"] for o in lines if o["type"] in ("word", "pending"))
    assert logged_until >= len(audio) / rate - 1.5 - 0.5
    assert not transcript.exists()


# -- live mode --------------------------------------------------------------------------------

def _live(bundle, rec: Path, extra: str = ""):
    p = start_app("--weights", str(bundle), "--no-image", "--record", str(rec),
                  fake_devices=True, extra=extra)
    wait_until(_words_logged(rec / "transcript.jsonl"), 120, "the first words", p)
    time.sleep(2.0)
    return p


def test_live_session_killed_keeps_everything_but_the_last_second(bundle, tmp_path):
    rec = tmp_path / "rec"
    p = _live(bundle, rec)
    p.kill()
    p.wait(timeout=30)
    audio, rate = read_wav(rec / "conversation.wav")
    seconds = len(audio) / rate
    session = json.loads((rec / "session.json").read_text())  # there, and valid
    assert session["complete"] is False and session["duration_s"] >= seconds - 1.1
    lines = jsonl(rec / "transcript.jsonl")
    assert lines[0]["type"] == "header" and any(o["type"] == "word" for o in lines)
    rows = (rec / "latency.csv").read_text().splitlines()
    assert len(rows) - 1 >= (seconds - 1.1) / 0.08
    assert not (rec / "transcript.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_live_session_ended_by_a_signal_is_saved(bundle, tmp_path, sig):
    """In live mode a signal is a way to quit, as q and Ctrl-C are: saved, exit 0."""
    rec = tmp_path / "rec"
    p = _live(bundle, rec)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"session saved to {rec}" in out
    session = json.loads((rec / "session.json").read_text())
    assert session["complete"] is True and session["frames"] > 0
    assert json.loads((rec / "transcript.json").read_text())["words"]
    assert not (rec / "transcript.jsonl").exists()


SLOW_SAVE = """from moshivis_mlx.app import recorder
import time
original = recorder.SessionRecorder.close
def slow_close(self, summary=None):
    print("saving", flush=True)
    time.sleep(1.5)
    return original(self, summary)
recorder.SessionRecorder.close = slow_close
"""


def test_a_second_ctrl_c_while_saving_waits_for_the_save(bundle, tmp_path):
    rec = tmp_path / "rec"
    p = _live(bundle, rec, extra=SLOW_SAVE)
    p.send_signal(signal.SIGINT)
    time.sleep(0.7)  # saving now
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "saving" in out and f"session saved to {rec}" in out
    session = json.loads((rec / "session.json").read_text())
    assert session["complete"] is True
    assert json.loads((rec / "transcript.json").read_text())["words"]


# -- the first run's conversion into the cache ----------------------------------------------------

SLOW_WRITE = """from moshivis_mlx.weights_convert import safetensors_io
import time
original = safetensors_io.SafetensorsWriter.write
def slow(self, name, array):
    time.sleep(0.3)
    return original(self, name, array)
safetensors_io.SafetensorsWriter.write = slow
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    """A folder holding a (tiny) Kyutai repository's files: what --hf-repo converts."""
    from safetensors.numpy import save_file
    from synthetic import TINY_LM_CONFIG, TINY_TOKENIZER, tiny_mimi_tensors, tiny_moshi_pt_tensors

    d = tmp_path / "repo"
    d.mkdir()
    save_file(tiny_moshi_pt_tensors(), str(d / "model.safetensors"))
    mimi, mimi_cfg = tiny_mimi_tensors()
    save_file(mimi, str(d / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    (d / "mimi_config.json").write_text(json.dumps(mimi_cfg))
    (d / "tokenizer_spm_32k_3.model").write_bytes(TINY_TOKENIZER)
    (d / "config.json").write_text(json.dumps({**TINY_LM_CONFIG,
                                               "mimi_config_name": "mimi_config.json"}))
    return d


def _first_run(repo: Path, tmp_path: Path, cache: Path, extra: str = ""):
    from moshivis_mlx.app.demo import SAMPLE_SPEECH

    return start_app("--hf-repo", str(repo), "--no-image", "--input-wav", str(SAMPLE_SPEECH),
                     "--output-wav", str(tmp_path / "o.wav"), extra=extra,
                     MOSHIVIS_MLX_CACHE=str(cache))


@pytest.mark.parametrize("sig,code", [(signal.SIGHUP, 129), (signal.SIGTERM, 143)])
def test_closing_the_terminal_during_the_first_conversion_leaves_nothing(repo, tmp_path, sig,
                                                                         code):
    cache = tmp_path / "cache"
    p = _first_run(repo, tmp_path, cache, SLOW_WRITE)
    wait_until(lambda: any(cache.glob(".*.partial/*.safetensors")), 120, "the conversion", p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert list(cache.iterdir()) == [], list(cache.iterdir())


def test_a_killed_first_conversion_is_cleaned_up_by_the_next_run(repo, tmp_path):
    cache = tmp_path / "cache"
    p = _first_run(repo, tmp_path, cache, SLOW_WRITE)
    wait_until(lambda: any(cache.glob(".*.partial/*.safetensors")), 120, "the conversion", p)
    p.kill()
    p.wait(timeout=30)
    assert any(cache.glob(".*.partial"))
    p = _first_run(repo, tmp_path, cache)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    names = [x.name for x in cache.iterdir()]
    assert len(names) == 1 and not names[0].startswith("."), names
