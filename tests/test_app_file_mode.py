"""File mode and the offline demo: real speech in (espeak-ng, any format), the tiny model
through the same Stream as live mode, 24 kHz out: exactly as long as the input with
--same-length, else the answer heard to its end (or the cap)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from app_support import app_env, demo_bundle, run_app, speech_wav

from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.wav import WavReader, read_wav


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


@pytest.mark.parametrize("rate,channels,bits", [(22050, 1, 16), (44100, 2, 32)])
@pytest.mark.system("espeak-ng", "sox")
def test_spoken_question_in_any_format(tmp_path, bundle, rate, channels, bits):
    question = speech_wav(tmp_path / "q.wav", "What is in this picture? Tell me about the colours.",
                          rate=rate, channels=channels, bits=bits)
    with WavReader(question) as r:
        assert (r.sample_rate, r.channels) == (rate, channels)
        n_in = r.frames
    out, transcript = tmp_path / "answer.wav", tmp_path / "answer.json"
    start = time.perf_counter()
    r = run_app("--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--input-wav",
                str(question), "--output-wav", str(out), "--transcript", str(transcript),
                "--seed", "3", "--same-length")
    wall_s = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "as long as the question (--same-length)" in r.stdout
    assert "Traceback" not in r.stderr

    answer, out_rate = read_wav(out)
    assert out_rate == 24000 and answer.shape[1] == 1
    assert answer.shape[0] == round(n_in * 24000 / rate)  # as long as the question
    with WavReader(out) as w:
        assert w.bits == 16 and not w.is_float  # 16-bit PCM
    # The model's first frame is silent (the acoustic delay); then the random Mimi speaks.
    assert np.abs(answer[:1920]).max() == 0
    assert np.sqrt(np.mean(answer[1920:] ** 2)) > 0.01

    t = json.loads(transcript.read_text())
    assert t["sample_rate"] == 24000 and t["image"] == str(SAMPLE_IMAGE)
    duration = answer.shape[0] / 24000
    assert t["duration_s"] == pytest.approx(duration, abs=1e-3)
    words = t["words"]
    assert words, "the random model always says something"
    assert all(0 < w["start"] <= w["end"] < duration for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert t["text"] == " ".join(w["word"] for w in words)
    # The demo bundle starts looking at the image at step 2: later words carry a gate.
    gated = [w["gate"] for w in words if w["start"] >= 0.4]
    assert gated and all(isinstance(g, float) and 0.0 <= g <= 1.0 for g in gated)

    # The summary: the answer's length and frames, the time taken, and the steady speed:
    # timed after the first frame (which compiles the step), so no slower than the whole
    # run's average (printed to 0.1 s and 0.1x), time spent within the app's run.
    summary = re.search(r"\(([\d.]+) s at 24000 Hz, (\d+) frames in ([\d.]+) s: ([\d.]+)x real "
                        r"time after the first frame\)", r.stdout)
    assert summary, r.stdout
    seconds, frames, elapsed, speed = (float(g) for g in summary.groups())
    assert seconds == pytest.approx(duration, abs=0.005)
    assert frames == -(-answer.shape[0] // 1920)
    assert 0 < elapsed <= wall_s + 0.05
    assert speed >= seconds / (elapsed + 0.05) - 0.05
    print(f"file mode: {duration:.2f} s of audio at {speed:.1f}x real time")


@pytest.mark.system("espeak-ng", "sox")
@pytest.mark.slow
def test_same_seed_same_answer(tmp_path, bundle):
    question = speech_wav(tmp_path / "q.wav", "Hello there.", rate=16000)
    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}.wav"
        r = run_app("--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--input-wav",
                    str(question), "--output-wav", str(out), "--seed", "7",
                    "--max-answer-seconds", "1")
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.system("espeak-ng", "sox")
def test_without_image(tmp_path, bundle):
    question = speech_wav(tmp_path / "q.wav", "Hello.", rate=24000)
    out, transcript = tmp_path / "a.wav", tmp_path / "a.json"
    r = run_app("--weights", str(bundle), "--no-image", "--input-wav", str(question),
                "--output-wav", str(out), "--transcript", str(transcript), "--seed", "1",
                "--same-length")
    assert r.returncode == 0, r.stderr
    t = json.loads(transcript.read_text())
    assert t["image"] is None and all(w["gate"] is None for w in t["words"])


@pytest.mark.slow
def test_offline_demo(tmp_path):
    """`make demo` runs exactly this: the tiny bundle is generated into an empty cache."""
    cache = tmp_path / "cache"
    r = run_app("--demo", cwd=tmp_path, env=app_env(MOSHIVIS_MLX_CACHE=str(cache)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "random" in r.stdout and "noise" in r.stdout
    assert (cache / "demo-tiny-v1" / "tokenizer.model").exists()
    answer, rate = read_wav(tmp_path / "moshivis-demo" / "answer.wav")
    question, _ = read_wav(SAMPLE_IMAGE.parent / "question.wav")
    # The answer goes on after the question, to the demo's cap (random weights never stop).
    assert rate == 24000 and answer.shape[0] >= question.shape[0] + 4 * 24000
    assert answer.shape[0] < question.shape[0] + 4 * 24000 + 2 * 1920
    assert "at the cap" in r.stdout
    t = json.loads((tmp_path / "moshivis-demo" / "transcript.json").read_text())
    assert t["words"]
    # A second run reuses the cached bundle and, seeded, answers identically.
    r2 = run_app("--demo", cwd=tmp_path, env=app_env(MOSHIVIS_MLX_CACHE=str(cache)))
    assert r2.returncode == 0 and "using the demo model" in r2.stdout
    assert np.array_equal(read_wav(tmp_path / "moshivis-demo" / "answer.wav")[0], answer)


@pytest.mark.slow
def test_the_answer_goes_on_after_the_question(tmp_path, bundle):
    """A spoken question without trailing silence (espeak-ng, 1.4 s): the model goes on
    hearing silence until it has finished or the cap, and the transcript covers it all."""
    question = speech_wav(tmp_path / "q.wav", "What colour is the house?", rate=24000)
    q_samples = read_wav(question)[0].shape[0]
    out, transcript = tmp_path / "a.wav", tmp_path / "a.json"
    r = run_app("--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--input-wav",
                str(question), "--output-wav", str(out), "--transcript", str(transcript),
                "--seed", "2", "--max-answer-seconds", "2.5")
    assert r.returncode == 0, r.stderr
    answer = read_wav(out)[0]
    # The question, then whole frames of answer until 2.5 s have passed (32 x 80 ms).
    assert answer.shape[0] == q_samples + 32 * 1920
    assert np.sqrt(np.mean(answer[q_samples:] ** 2)) > 0.01, "the model went on speaking"
    t = json.loads(transcript.read_text())
    assert t["answer_end"] == "cap" and t["question_s"] == pytest.approx(q_samples / 24000,
                                                                          abs=1e-3)
    assert t["duration_s"] == pytest.approx(answer.shape[0] / 24000, abs=1e-3)
    assert any(w["start"] > q_samples / 24000 for w in t["words"]), "words after the question"
    assert "cut 2.56 s after the question, at the cap (--max-answer-seconds 2.5)" in r.stdout
