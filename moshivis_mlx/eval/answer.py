"""The one place that drives the model: a question in, the model's answer text out.

    answerer = Answerer(stream, AnswerSettings())
    answerer.set_image(tokens)                      # once per image: its keys and values
    answer = answerer.answer(question, "audio")     # .text, .stop, .frames, .seconds

A question is asked in a fresh conversation (the stream is reset; the image is kept):

1. the opening: `opening_s` of silence, in which Moshi, trained to open conversations,
   says its greeting and the image starts to count (the bundle's xa_start);
2. the question, either
   * audio: the spoken question, resampled to 24 kHz, one 80 ms frame at a time, or
   * text: the question's text tokens teacher-forced into the model's text stream, one
     per frame, the audio streams silent (the user's and the model's), as MoshiVis'
     speechless training samples carry a user's words;
3. silence, until the model has answered: it has spoken, then produced only text
   padding for `silence_s` ("silence"), or `max_answer_s` has passed ("cap").

The answer is what the model's text stream says in 3. The frames go through the app's own
`Session` (Mimi encoder, the step, Mimi decoder: one graph a frame, one frame submitted
ahead) and its `AnswerWatch` decides when the answer is over, so a benchmark measures the
product, not a side path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..session import ANSWER_SILENCE_S, MAX_ANSWER_S, AnswerWatch, Piece, Session
from ..text import WORD_START

MODES = ("audio", "text")


@dataclass(frozen=True)
class AnswerSettings:
    opening_s: float = 2.0
    """Silence before the question: the model's greeting, not scored."""
    silence_s: float = ANSWER_SILENCE_S
    """Text padding after it spoke that ends the answer."""
    max_answer_s: float = MAX_ANSWER_S
    """The longest answer listened to, counted from the end of the question."""

    def to_dict(self) -> dict[str, float]:
        return {"opening_s": self.opening_s, "silence_s": self.silence_s,
                "max_answer_s": self.max_answer_s}


@dataclass
class Answer:
    text: str
    stop: str
    """'silence' (the model finished) or 'cap' (max_answer_s reached)."""
    opening: str
    """What the model said during the opening."""
    during_question: str
    """What it said while the question was being asked."""
    frames: int
    """Model steps in all (opening, question, answer)."""
    question_frames: int
    answer_s: float
    """Seconds of conversation from the end of the question to the stop."""
    seconds: float
    """Wall-clock time of the whole conversation."""


def pieces_text(pieces: list[str]) -> str:
    """SentencePiece pieces ("▁" opens a word) -> text."""
    return "".join(pieces).replace(WORD_START, " ").strip()


class Answerer:
    """Asks one question at a time of a `Session` (its stream's tokenizer included)."""

    def __init__(self, session: Session, settings: AnswerSettings | None = None):
        if session.stream.tokenizer is None:
            raise ValueError("the stream needs its text tokenizer")
        self.session = session
        self.stream = session.stream
        self.settings = settings or AnswerSettings()
        self.frame_size = session.geometry.frame_size
        self.frame_s = session.geometry.frame_seconds
        self.sample_rate = session.geometry.sample_rate
        self.silence = np.zeros(self.frame_size, dtype=np.float32)

    def set_image(self, tokens) -> None:
        """The image's keys and values, computed once for all its questions."""
        self.stream.set_image(tokens)

    def question_tokens(self, text: str) -> list[int]:
        return list(self.stream.tokenizer.sp.encode(text))

    def answer(self, question: str | np.ndarray, mode: str,
               on_frame: Callable[[int, int], None] | None = None) -> Answer:
        """`question`: the text (mode "text") or 24 kHz float32 mono samples ("audio").
        `on_frame(fed, planned)` hears each frame: the frames fed so far, and how many the
        opening and the question take (the answer's are not known in advance)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        s = self.settings
        t0 = time.perf_counter()
        self.session.restart()
        base = self.session.frames
        n_open = round(s.opening_s / self.frame_s)
        if mode == "audio":
            pcm = np.asarray(question, dtype=np.float32).reshape(-1)
            n = max(1, math.ceil(len(pcm) / self.frame_size))
            padded = np.zeros(n * self.frame_size, dtype=np.float32)
            padded[: len(pcm)] = pcm
            asked = [(padded[i * self.frame_size:(i + 1) * self.frame_size], None)
                     for i in range(n)]
        else:
            tokens = self.question_tokens(str(question)) or [
                self.stream.gen.lm.cfg.text_padding_id]
            asked = [(self.silence, t) for t in tokens]
        q_start, q_end = n_open, n_open + len(asked)
        delay = self.stream.gen.max_delay
        frames = [(self.silence, None, "opening")] * n_open
        frames += [(pcm, text, "question") for pcm, text in asked]
        # The text comes `delay` frames late: these frames still bring the question's.
        frames += [(self.silence, None, "question")] * delay
        # The answer is scored as text: its end is the text's (the voice is not listened to).
        watch = AnswerWatch(self.frame_s, s.silence_s, s.max_answer_s, silence_rms=None,
                            after_speech=True)
        said: dict[str, list[str]] = {"opening": [], "question": [], "answer": []}
        fed = 0
        for _, events in self.session.converse(frames, watch):
            fed += 1
            if on_frame is not None:
                on_frame(fed, len(frames))
            for ev in events:
                if isinstance(ev, Piece):
                    made_at = ev.step - base - delay  # the step that produced the token
                    phase = ("opening" if made_at < q_start else
                             "question" if made_at < q_end else "answer")
                    said[phase].append(ev.text)
        return Answer(text=pieces_text(said["answer"]),
                      stop="silence" if watch.outcome == "finished" else "cap",
                      opening=pieces_text(said["opening"]),
                      during_question=pieces_text(said["question"]), frames=fed,
                      question_frames=len(asked), answer_s=round(watch.elapsed, 3),
                      seconds=time.perf_counter() - t0)
