"""The data path (stream.py) on the real tiny models, and the pieces the displays and the
recording are built from: words, gates, the thumbnail, keys, plain lines."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from app_support import demo_bundle
from rich.console import Console

from moshivis_mlx import Generator, Sampler, load_lm, load_mimi
from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.app.transcript import Transcript, TranscriptWriter
from moshivis_mlx.app.ui import GateScale, PlainUI, TerminalUI, clean_path, thumbnail
from moshivis_mlx.bundle import load_vision
from moshivis_mlx.image import load_image
from moshivis_mlx.session import ImageChanged, Piece, Stats
from moshivis_mlx.stream import RELEASED, Stream
from moshivis_mlx.text import TextTokenizer, find_tokenizer

FRAME_SIZE = RELEASED.frame_size


@pytest.fixture(scope="module")
def parts():
    bundle = demo_bundle()
    lm = load_lm(bundle)
    return (lm, load_mimi(bundle), load_vision(bundle),
            TextTokenizer(find_tokenizer(bundle), lm.cfg.text_padding_ids))


def make_stream(parts, seed=0, xa_start=2):
    lm, mimi, _, tok = parts
    gen = Generator(lm, Sampler(0.7, top_k=25, seed=seed), Sampler(0.8, top_k=250, seed=seed + 1),
                    xa_start=xa_start)
    return Stream(mimi, gen, tok)


def speech_like(n_frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / 24000
    return (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def test_frame_in_frame_out(parts):
    stream = make_stream(parts)
    stream.set_image(parts[2].encode_image(SAMPLE_IMAGE))
    audio = speech_like(12)
    results, wall_ms = [], []
    for i in range(12):
        t0 = time.perf_counter()
        results.append(stream.step(audio[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]))
        wall_ms.append(1e3 * (time.perf_counter() - t0))
    assert [r.step for r in results] == list(range(12))
    for r, wall in zip(results, wall_ms):
        assert r.pcm.shape == (FRAME_SIZE,) and r.pcm.dtype == np.float32
        # One graph a frame: its latency is spent inside the call, the host's share in it;
        # no stage is timed on its own (the serial path does that).
        assert 0 < r.host_ms <= r.latency_ms <= wall and r.encode_ms is None
    # The acoustic delay: nothing at step 0; then the model speaks and writes.
    assert results[0].text_token is None and results[0].piece is None
    assert not results[0].pcm.any()
    assert all(r.text_token is not None for r in results[1:])
    assert np.sqrt(np.mean(np.concatenate([r.pcm for r in results[1:]]) ** 2)) > 0.01
    # A frame's piece is its text token's: None for padding and control tokens (not words;
    # rare from this random model), and mostly words.
    tok = parts[3]
    assert [r.piece for r in results[1:]] == [tok.piece(r.text_token) for r in results[1:]]
    assert sum(isinstance(r.piece, str) and r.piece != "" for r in results[1:]) >= 8
    # Gates appear once the model attends to the image (xa_start = 2).
    assert all(r.gate is None for r in results[:2])
    assert all(isinstance(r.gate, float) and 0 < r.gate < 1 for r in results[4:])


def test_frames_must_be_1920_samples(parts):
    with pytest.raises(ValueError, match="1920"):
        make_stream(parts).step(np.zeros(1000, dtype=np.float32))


def test_restart_and_image_switch(parts):
    vision = parts[2]
    audio = speech_like(10, seed=1)
    frames = [audio[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(10)]

    a = make_stream(parts, seed=5)
    a.set_image(vision.encode_image(SAMPLE_IMAGE))
    first = [a.step(f) for f in frames]
    a.reset()  # `r`: a new conversation, same image, same seeded samplers
    again = [a.step(f) for f in frames]
    assert [r.text_token for r in again] == [r.text_token for r in first]
    np.testing.assert_allclose(again[5].pcm, first[5].pcm, atol=1e-5)
    assert again[0].step == 10  # the stream's frame count goes on

    # `i`: another image mid-conversation changes what follows, not what was said.
    b = make_stream(parts, seed=5)
    b.set_image(vision.encode_image(SAMPLE_IMAGE))
    out = [b.step(f) for f in frames[:5]]
    b.set_image(vision.encode_image(load_image(SAMPLE_IMAGE).rotate(90)))
    out += [b.step(f) for f in frames[5:]]
    assert [r.text_token for r in out[:5]] == [r.text_token for r in first[:5]]
    assert [r.gate for r in out[6:]] != [r.gate for r in first[6:]]


def test_tokenizer_matches_the_model(parts):
    lm, _, _, tok = parts
    assert tok.vocab_size == lm.cfg.text_card
    assert tok.piece(3) is None and tok.piece(0) is None  # padding, end of padding
    assert tok.piece(lm.cfg.text_card + 5) is None
    assert all(isinstance(tok.piece(i), str) for i in range(4, lm.cfg.text_card))


def test_words_times_and_gates(tmp_path):
    path = tmp_path / "t.json"
    writer = TranscriptWriter(path, {"sample_rate": 24000})
    t = Transcript(keep=2, on_word=writer.write_word)
    for i, piece in enumerate(["\u2581Hel", "lo", None, "\u2581the", "re", None, "\u2581cat"]):
        t.add(piece, i * 0.08, 0.1 * i, i)
    t.add_event(0.6, "image", path="b.png")
    t.add("s", 0.64, None, 8)  # after an event a piece starts a new word
    assert [w.text for w in t.words] == ["cat", "s"]  # only the last `keep` are held
    assert t.text == "Hello there cat s"
    writer.close(t, {"duration_s": 0.72})
    data = json.loads(path.read_text())
    assert [w["word"] for w in data["words"]] == ["Hello", "there", "cat", "s"]
    assert data["words"][0] == {"word": "Hello", "start": 0.0, "end": 0.08, "step": 0,
                                "gate": 0.05}
    assert data["words"][3]["gate"] is None
    assert data["events"] == [{"t": 0.6, "event": "image", "path": "b.png"}]
    assert data["text"] == "Hello there cat s" and data["duration_s"] == 0.72


def test_gate_scale_uses_the_range_seen():
    s = GateScale()
    assert s.bounds() == (0.0, 1.0)
    for g in (0.02, 0.05, 0.2):
        s.add(g)
    assert s.bounds() == (0.02, 0.2)
    assert s.style(0.02) != s.style(0.2)
    assert "gate 0.02" in s.legend().plain and "0.20" in s.legend().plain


def test_thumbnail_keeps_the_aspect_ratio():
    img = load_image(SAMPLE_IMAGE)  # 160 x 120
    text = thumbnail(img, max_cols=32, max_rows=16)
    lines = text.plain.split("\n")
    assert len(lines) == 12 and all(len(line) == 32 for line in lines)
    tall = thumbnail(img.rotate(90, expand=True), max_cols=32, max_rows=16)
    assert len(tall.plain.split("\n")) == 16


def _step(t, piece, gate=None, level=0.1):
    """A session step's events for the displays: its text piece (if any), then its stats."""
    step = round(t / 0.08)
    text = [Piece(step, t, piece, gate)] if piece else []
    return text + [Stats(step, t, latency_ms=17.0, host_ms=2.0, level=level)]


def test_terminal_ui_keys_and_prompt():
    ui = TerminalUI("a.jpg", load_image(SAMPLE_IMAGE), "rec", "mic: x")
    assert ui.key("q") == ("quit", "")
    assert ui.key("r") == ("restart", "")
    assert ui.key(" ") == ("mute", "")
    assert ui.key("i") is None and ui.prompt == ""
    for k in "'~/my photo.png'":
        assert ui.key(k) is None  # typing goes to the prompt, not to the keys
    assert ui.key("\x7f") is None and ui.key("'") is None
    action = ui.key("\n")
    assert action[0] == "image" and action[1].endswith("/my photo.png")
    assert not action[1].startswith("~") and ui.prompt is None
    ui.key("i")
    assert ui.key("\x1b") is None and ui.prompt is None  # Esc cancels
    assert clean_path("photo\\ 1.jpg") == "photo 1.jpg"

    for i, p in enumerate(["\u2581hello", "\u2581wor", "ld"]):
        for ev in _step(0.08 * (i + 1), p, gate=0.02 + 0.01 * i):
            ui.handle(ev)
    ui.handle(ImageChanged("b.png", load_image(SAMPLE_IMAGE).rotate(90)))
    console = Console(width=100, height=30, record=True, color_system=None)
    console.print(ui.render())
    screen = console.export_text()
    assert "a.jpg" not in screen and "b.png 160x120" in screen
    assert "hello world" in screen and "p50" in screen and "image: b.png" in screen


def test_plain_lines():
    out = io.StringIO()
    ui = PlainUI(out=out, status_every=1.0)
    t = 0.0
    for p in ["\u2581Hello", "\u2581there", ","] + [None] * 14 + ["\u2581bye"]:
        for ev in _step(t, p):
            ui.handle(ev)
        t += 0.08
    ui.close()
    lines = out.getvalue().splitlines()
    text = [line for line in lines if "status:" not in line]
    assert text == ["[    0.00s] Hello there,", "[    1.36s] bye"]  # a 1 s pause ends a line
    assert any("status: step p50 17 ms" in line for line in lines)


def test_macos_silent_microphone_hint(monkeypatch):
    from moshivis_mlx.app import ui as ui_mod

    monkeypatch.setattr(ui_mod.sys, "platform", "darwin")
    out = io.StringIO()
    plain = PlainUI(out=out)
    for i in range(40):
        for ev in _step(0.08 * i, None, level=0.0):
            plain.handle(ev)
    assert out.getvalue().count("Privacy & Security > Microphone") == 1


def test_the_camera_key_and_the_echo_canceller_on_the_status_line():
    from moshivis_mlx.app.echo import EchoStats
    from moshivis_mlx.app.ui import echo_label

    ui = TerminalUI("camera", load_image(SAMPLE_IMAGE), None, camera=True)
    assert ui.key("c") == ("camera", "")
    plain = TerminalUI("a.jpg", load_image(SAMPLE_IMAGE), None)
    assert plain.key("c") is None and "no camera" in plain.message.plain
    assert echo_label(None) == ""
    assert echo_label(EchoStats(False, None, False, 0.0, 0)) == "echo cancel off"
    assert echo_label(EchoStats(True, None, False, 120.0, 3)) == "echo cancel on"
    assert echo_label(EchoStats(True, 31.6, True, 120.0, 30)) == "echo -32 dB"
    ui.stats.echo = EchoStats(True, 31.6, True, 120.0, 30)
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(ui._footer())
    text = console.export_text()
    assert "echo -32 dB" in text and "c snapshot" in text
    assert ui.stats.summary().endswith("echo -32 dB")
