"""The answering seam on a scripted stand-in for the stream, through the app's own Session:
which words belong to the opening, the question and the answer (the model's text comes one
step late), when an answer is over, and how a text question is forced into the text
stream."""

from __future__ import annotations

import numpy as np
import pytest
from session_support import ScriptedStream

from moshivis_mlx.eval.answer import Answerer, AnswerSettings
from moshivis_mlx.session import Session


def answerer_for(script: dict[int, int]) -> tuple[Answerer, ScriptedStream]:
    stream = ScriptedStream(script)
    return Answerer(Session(stream), SETTINGS), stream


# 1 s opening = 12.5 -> 12 steps; a 0.24 s question = 3 frames (steps 12-14); answer from 15.
SETTINGS = AnswerSettings(opening_s=1.0, silence_s=0.4, max_answer_s=2.0)
QUESTION = np.zeros(int(0.24 * 24000), dtype=np.float32)


def test_phases_and_silence():
    answerer, _ = answerer_for({0: 10, 13: 12, 16: 11, 17: 12, 18: 13, 19: 14})
    a = answerer.answer(QUESTION, "audio")
    assert a.opening == "hello" and a.during_question == "red"
    assert a.text == "a red houses" and a.stop == "silence"
    # The last word made at step 19 comes out with frame 20; then 5 quiet frames (0.4 s):
    # 21-25, so 26 frames in all. The answer's words come out from frame 16 (the text is a
    # step late): 10 frames of answer.
    assert a.frames == 26 and a.question_frames == 3
    assert a.answer_s == pytest.approx(10 * 0.08)


def test_cap_when_it_never_stops_or_never_speaks():
    a = answerer_for({s: 11 for s in range(200)})[0].answer(QUESTION, "audio")
    assert a.stop == "cap" and a.answer_s == pytest.approx(2.0)
    a = answerer_for({})[0].answer(QUESTION, "audio")
    assert a.stop == "cap" and a.text == "" and a.answer_s == pytest.approx(2.0)


def test_text_question_is_forced_into_the_text_stream():
    answerer, stream = answerer_for({14: 11, 15: 13})
    a = answerer.answer("What colour?", "text")
    assert stream.forced == [(12, 20), (13, 21)]  # right after the opening, one token a step
    assert a.during_question == "what colour" and a.question_frames == 2
    assert a.text == "a house" and a.stop == "silence"


def test_each_question_starts_afresh():
    answerer, _ = answerer_for({13: 12, 16: 11})
    first = answerer.answer(QUESTION, "audio")
    second = answerer.answer(QUESTION, "audio")
    assert (first.text, first.frames) == (second.text, second.frames) == ("a", first.frames)
