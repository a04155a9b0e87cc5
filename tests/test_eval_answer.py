"""The answering seam on a scripted stand-in for the stream: which words belong to the
opening, the question and the answer (the model's text comes one step late), when an
answer is over, and how a text question is forced into the text stream."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from moshivis_mlx.eval.answer import Answerer, AnswerSettings
from moshivis_mlx.stream import FrameGeometry

PAD = 3
WORDS = {10: "▁hello", 11: "▁a", 12: "▁red", 13: "▁house", 14: "s", 20: "▁what", 21: "▁colour"}


class ScriptedGen:
    """Says `script[s]` at step s (padding elsewhere), one step late like Moshi's text."""

    max_delay = 1

    def __init__(self, script: dict[int, int]):
        self.script = script
        self.lm = SimpleNamespace(cfg=SimpleNamespace(dep_q=8, text_padding_id=PAD))
        self.forced: list[tuple[int, int]] = []
        self.reset()

    def reset(self) -> None:
        self.step_index, self.made = 0, []

    def step(self, codes, force_text=None, force_audio=None):
        s = self.step_index
        token = force_text if force_text is not None else self.script.get(s, PAD)
        if force_text is not None:
            self.forced.append((s, force_text))
            assert np.asarray(force_audio).shape == (8,)
        self.made.append(token)
        self.step_index += 1
        if s == 0:
            return None
        return SimpleNamespace(text_token=self.made[s - 1])


def stream_for(script: dict[int, int]):
    gen = ScriptedGen(script)
    tokenizer = SimpleNamespace(piece=WORDS.get,
                                sp=SimpleNamespace(encode=lambda text: [20, 21]))
    encoder = SimpleNamespace(step=lambda pcm: np.zeros(8, dtype=np.int64), reset=lambda: None)
    mimi = SimpleNamespace(streaming_encoder=lambda k: SimpleNamespace(
        step=lambda pcm: np.full(k, 5)))
    stream = SimpleNamespace(geometry=FrameGeometry(24000, 1920), gen=gen, tokenizer=tokenizer,
                             encoder=encoder, mimi=mimi, reset=gen.reset,
                             set_image=lambda tokens: None)
    return stream, gen


# 1 s opening = 12.5 -> 12 steps; a 0.24 s question = 3 frames (steps 12-14); answer from 15.
SETTINGS = AnswerSettings(opening_s=1.0, silence_s=0.4, max_answer_s=2.0)
QUESTION = np.zeros(int(0.24 * 24000), dtype=np.float32)


def test_phases_and_silence():
    stream, gen = stream_for({0: 10, 13: 12, 16: 11, 17: 12, 18: 13, 19: 14})
    a = Answerer(stream, SETTINGS).answer(QUESTION, "audio")
    assert a.opening == "hello" and a.during_question == "red"
    assert a.text == "a red houses" and a.stop == "silence"
    # The last word at step 19, then 5 steps (0.4 s) of padding: steps 20-24, collected
    # one step late.
    assert a.frames == 26 and a.question_frames == 3
    assert a.answer_s == pytest.approx(10 * 0.08)


def test_cap_when_it_never_stops_or_never_speaks():
    talkative = {s: 11 for s in range(200)}
    a = Answerer(stream_for(talkative)[0], SETTINGS).answer(QUESTION, "audio")
    assert a.stop == "cap" and a.answer_s == pytest.approx(2.0)
    a = Answerer(stream_for({})[0], SETTINGS).answer(QUESTION, "audio")
    assert a.stop == "cap" and a.text == "" and a.answer_s == pytest.approx(2.0)


def test_text_question_is_forced_into_the_text_stream():
    stream, gen = stream_for({14: 11, 15: 13})
    a = Answerer(stream, SETTINGS).answer("What colour?", "text")
    assert gen.forced == [(12, 20), (13, 21)]  # right after the opening, one token a step
    assert a.during_question == "what colour" and a.question_frames == 2
    assert a.text == "a house" and a.stop == "silence"


def test_each_question_starts_afresh():
    stream, gen = stream_for({13: 12, 16: 11})
    answerer = Answerer(stream, SETTINGS)
    first = answerer.answer(QUESTION, "audio")
    second = answerer.answer(QUESTION, "audio")
    assert (first.text, first.frames) == (second.text, second.frames) == ("a", first.frames)
