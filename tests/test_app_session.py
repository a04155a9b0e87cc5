"""The conversation session on the real tiny models: frames and commands in, events out,
opened by the same sequence as live mode, file mode and the demo, from typed options."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from app_support import demo_bundle, second_image
from rich.console import Console

from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.app.opening import open_session, opening_steps
from moshivis_mlx.app.options import ModelOptions
from moshivis_mlx.loader import BundleOptions
from moshivis_mlx.progress import Steps
from moshivis_mlx.sampling import GenerationConfig
from moshivis_mlx.session import (
    AudioFrame,
    ImageChanged,
    Message,
    Piece,
    Restarted,
    Stats,
    load_picture,
)
from moshivis_mlx.stream import CODEC_DEVICES, RELEASED, StepResult

FRAMES = 10


def speech_like(n_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * RELEASED.frame_size) / RELEASED.sample_rate
    audio = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
             + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    return np.split(audio, n_frames)


def open_(image: bool = True, vision: bool = True, seed: int = 4, **options):
    out = io.StringIO()
    console = Console(file=out, width=100)
    opts = ModelOptions(BundleOptions(weights=demo_bundle()), seed=seed, **options)
    with Steps(console, opening_steps(vision, image)) as steps:
        opened = open_session(opts, steps, vision, str(SAMPLE_IMAGE) if image else None,
                              load_picture(SAMPLE_IMAGE) if image else None)
    return opened, out.getvalue()


def tokens(events) -> list[tuple[int, str]]:
    """(step, text) of the pieces among `events`."""
    return [(e.step, e.text) for e in events if isinstance(e, Piece)]


@pytest.fixture(scope="module")
def opened():
    return open_()


def test_opening_sequence(opened):
    opened, printed = opened
    assert opened.bundle == demo_bundle()
    assert opened.session.geometry == RELEASED and opened.session.vision is not None
    gen = opened.session.stream.gen
    assert gen.xa_start == 2 and gen.text_sampler.seed == 4  # the bundle's, the options'
    assert gen.audio_sampler.seed == 5
    for step in ("language model", "Mimi codec", "image encoder", "tokenizer",
                 "image sample.jpg"):
        assert f"{step} ..." in printed  # plain lines off a terminal


def test_the_codec_on_the_cpu_says_the_same():
    """--codec-device cpu: Mimi on a CPU stream of its own, the conversation unchanged
    (here the model's device is the CPU too, so every sample must be the same)."""
    beside = open_(codec_device="cpu")[0].session
    assert beside.stream.codec_device == mx.cpu
    assert beside.stream.codec_stream != beside.stream.generation_stream
    usual = open_()[0].session
    assert usual.stream.codec_device is None
    for frame in speech_like(6):
        a, b = usual.feed(frame), beside.feed(frame)
        assert np.array_equal(a[0].pcm, b[0].pcm) and tokens(a) == tokens(b)


def test_weights_close_to_what_the_gpu_keeps_are_noted(monkeypatch):
    """A GPU that can keep less than the weights resident: the wired limit is raised to
    what it can, and the opening says the steps may be slow."""
    from moshivis_mlx import memory

    limits: list[int] = []
    monkeypatch.setattr(memory.mx, "device_info",
                        lambda: {"max_recommended_working_set_size": 1000})
    monkeypatch.setattr(memory.mx, "set_wired_limit", lambda n: limits.append(n) or 0)
    printed = open_()[1]
    assert limits == [1000]
    assert "note: the weights take" in printed and "-q q4" in printed


def test_events_of_each_frame():
    session = open_()[0].session
    frames = speech_like(FRAMES)
    steps = [session.feed(f) for f in frames]
    for i, (frame, events) in enumerate(zip(frames, steps)):
        audio, stats = events[0], events[-1]
        assert isinstance(audio, AudioFrame) and isinstance(stats, Stats)
        assert len(events) in (2, 3) and all(isinstance(e, Piece) for e in events[1:-1])
        assert audio.step == stats.step == i
        assert stats.t == pytest.approx(i * RELEASED.frame_seconds)
        assert audio.pcm.shape == (RELEASED.frame_size,) and audio.pcm.dtype == np.float32
        np.testing.assert_array_equal(audio.heard, frame)
        assert 0 < stats.host_ms <= stats.latency_ms
        assert stats.level == pytest.approx(float(np.sqrt(np.mean(frame**2))))
        # One result type per level: the session's events are not the stream's results.
        assert not any(isinstance(getattr(e, f, None), StepResult) for e in events
                       for f in vars(e))
    assert not steps[0][0].pcm.any()  # the acoustic delay
    pieces = [e for events in steps for e in events if isinstance(e, Piece)]
    assert pieces and all(e.text for e in pieces)
    # The demo bundle looks at the image from step 2: later pieces carry a gate.
    assert all(isinstance(e.gate, float) and 0 < e.gate < 1 for e in pieces if e.step >= 4)


def test_mute_restart_and_images(tmp_path):
    frames = speech_like(FRAMES, seed=1)
    session = open_()[0].session
    first = [e for f in frames for e in session.feed(f)]

    # Restart: the same seeded conversation again; the step count goes on.
    assert session.restart() == [Restarted()]
    again = [e for f in frames for e in session.feed(f)]
    assert [(s - FRAMES, p) for s, p in tokens(again)] == tokens(first)
    assert again[0].step == FRAMES

    # A file that is not a usable image is a message and changes nothing.
    session.restart()
    events = session.set_image(str(tmp_path / "missing.jpg"))
    assert len(events) == 1 and isinstance(events[0], Message)
    assert events[0].level == "error" and "missing.jpg" in events[0].text
    bad = [e for f in frames for e in session.feed(f)]
    assert [p for _, p in tokens(bad)] == [p for _, p in tokens(first)]

    # Another image: the conversation goes on with it.
    other = second_image(tmp_path / "second.png")
    events = session.set_image(str(other))
    assert len(events) == 1 and isinstance(events[0], ImageChanged)
    assert events[0].path == str(other) and events[0].picture.size == (160, 120)

    # Muted: the model hears silence, the level is still the microphone's.
    assert session.mute(True) == []
    loud = np.full(RELEASED.frame_size, 0.5, dtype=np.float32)
    audio, *_, stats = session.feed(loud)
    assert not audio.heard.any() and stats.level == pytest.approx(0.5)
    session.mute(False)
    audio, *_ = session.feed(loud)
    np.testing.assert_array_equal(audio.heard, loud)


def test_warm_up_leaves_a_fresh_conversation():
    frames = speech_like(6, seed=2)
    cold = open_(seed=9)[0].session
    warm = open_(seed=9)[0].session
    warm.warm_up()
    assert warm.frames == 0
    cold_events = [e for f in frames for e in cold.feed(f)]
    warm_events = [e for f in frames for e in warm.feed(f)]
    assert tokens(warm_events) == tokens(cold_events)
    voice = [[e.pcm for e in events if isinstance(e, AudioFrame)]
             for events in (cold_events, warm_events)]
    np.testing.assert_allclose(voice[1][-1], voice[0][-1], atol=1e-5)


def test_without_an_image_encoder():
    session = open_(image=False, vision=False)[0].session
    events = session.set_image(str(SAMPLE_IMAGE))
    assert len(events) == 1 and isinstance(events[0], Message)
    assert events[0].level == "warning" and "--no-image" in events[0].text
    assert all(e.gate is None for f in speech_like(4) for e in session.feed(f)
               if isinstance(e, Piece))


def test_the_command_line_becomes_typed_options():
    from moshivis_mlx.cli.app import build_parser, options_from

    args = build_parser().parse_args([
        "--weights", "~/b", "--input-device", "3", "--output-device", "usb", "--no-record",
        "--top-k", "5", "--text-temperature", "0.5", "--seed", "1"])
    opts = options_from(args)
    assert opts.model.bundle.weights == Path("~/b") and opts.model.seed == 1
    assert opts.input_device == 3 and opts.output_device == "usb"
    assert not opts.record and opts.record_dir is None and opts.input_wav is None
    g = opts.model.generation(GenerationConfig(xa_start=2))
    assert g.text_top_k == g.audio_top_k == 5 and g.text_temperature == 0.5
    assert g.audio_temperature == 0.8 and g.xa_start == 2  # the bundle's where not given
    assert opts.model.codec_device == "default"
    cpu = options_from(build_parser().parse_args(["--codec-device", "cpu"]))
    assert cpu.model.codec_device == "cpu"
    assert build_parser()._option_string_actions["--codec-device"].choices == CODEC_DEVICES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--codec-device", "gpu"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.image = "x.jpg"  # modes derive their options with dataclasses.replace


def test_file_mode_hears_the_answer_to_its_end(tmp_path):
    """After the question the model hears silence until it has been silent for the given
    time; the output ends there, and a cap cuts an answer that never ends."""
    from session_support import ScriptedStream

    from moshivis_mlx.app.files import process
    from moshivis_mlx.app.transcript import Transcript
    from moshivis_mlx.session import AnswerWatch, Session
    from moshivis_mlx.wav import WavWriter, read_wav

    class Question:
        frames = 5

        def __iter__(self):
            for _ in range(self.frames):
                yield np.zeros(1920, np.float32), 1920

    # The model speaks at steps 0-11 (its words come out at 1-12), then falls silent: 25
    # quiet frames (2 s) later the answer is over. A model that never stops meets the cap.
    for script, cap, outcome, frames, words in (
            ({s: 11 for s in range(12)}, 30.0, "finished", 38, 12),
            ({s: 11 for s in range(999)}, 1.6, "cap", 25, 24)):
        stream = ScriptedStream(script)
        watch = AnswerWatch(0.08, quiet_s=2.0, max_s=cap)
        path = tmp_path / f"{outcome}.wav"
        transcript = Transcript()
        with WavWriter(path, 24000, 1) as out:
            done = process(Session(stream), Question(), out, transcript,
                           Console(file=io.StringIO()), watch)
        assert watch.outcome == outcome
        assert done == frames and read_wav(path)[0].shape[0] == frames * 1920
        assert transcript.count == words
        # One frame was submitted ahead and dropped once the answer had ended.
        assert stream.submitted == frames + 1


def test_answer_watch_counts_quiet_frames_only_in_a_row():
    from moshivis_mlx.session import AnswerWatch, AudioFrame, Piece

    watch = AnswerWatch(0.08, quiet_s=0.24, max_s=10)
    quiet = [AudioFrame(0, 0.0, np.zeros(1920, np.float32), None)]
    word = quiet + [Piece(0, 0.0, "\u2581a", None)]
    assert [watch.update(e) for e in (quiet, quiet, word, quiet, quiet)] == [None] * 5
    assert watch.update(quiet) == "finished" and watch.elapsed == pytest.approx(0.48)
