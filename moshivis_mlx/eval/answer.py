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

The answer is what the model's text stream says in 3. The model's voice is not decoded:
the benchmarks score text. The app's shared "feed silence until the model has finished"
will replace the loop of step 3 here; nothing else in the runner drives the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..stream import Stream
from ..text import WORD_START

MODES = ("audio", "text")


@dataclass(frozen=True)
class AnswerSettings:
    opening_s: float = 2.0
    """Silence before the question: the model's greeting, not scored."""
    silence_s: float = 2.0
    """Text padding after it spoke that ends the answer."""
    max_answer_s: float = 30.0
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
    """Asks one question at a time of a `Stream` (its encoder, generator, tokenizer)."""

    def __init__(self, stream: Stream, settings: AnswerSettings | None = None):
        if stream.tokenizer is None:
            raise ValueError("the stream needs its text tokenizer")
        self.stream = stream
        self.gen = stream.gen
        self.settings = settings or AnswerSettings()
        self.frame_size = stream.geometry.frame_size
        self.frame_s = stream.geometry.frame_seconds
        self.sample_rate = stream.geometry.sample_rate
        self.silence = np.zeros(self.frame_size, dtype=np.float32)
        self._silent_codes: np.ndarray | None = None

    def set_image(self, tokens) -> None:
        self.stream.set_image(tokens)

    def silent_codes(self) -> np.ndarray:
        """The model's codes for silence (its audio while its text is forced): what Mimi
        makes of silence once its state has settled."""
        if self._silent_codes is None:
            enc = self.stream.mimi.streaming_encoder(self.gen.lm.cfg.dep_q)
            codes = None
            for _ in range(4):
                codes = np.asarray(enc.step(self.silence)).reshape(-1)
            self._silent_codes = codes.astype(np.int64)
        return self._silent_codes

    def question_tokens(self, text: str) -> list[int]:
        return list(self.stream.tokenizer.sp.encode(text))

    def answer(self, question: str | np.ndarray, mode: str) -> Answer:
        """`question`: the text (mode "text") or 24 kHz float32 mono samples ("audio")."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        s = self.settings
        t0 = time.perf_counter()
        self.stream.reset()
        opening = round(s.opening_s / self.frame_s)
        if mode == "audio":
            pcm = np.asarray(question, dtype=np.float32).reshape(-1)
            n = max(1, math.ceil(len(pcm) / self.frame_size))
            padded = np.zeros(n * self.frame_size, dtype=np.float32)
            padded[: len(pcm)] = pcm
            frames = [(padded[i * self.frame_size:(i + 1) * self.frame_size], None)
                      for i in range(n)]
        else:
            tokens = self.question_tokens(str(question)) or [self.gen.lm.cfg.text_padding_id]
            frames = [(self.silence, t) for t in tokens]
        q_start, q_end = opening, opening + len(frames)
        silence_frames = max(1, round(s.silence_s / self.frame_s))
        cap_frames = max(1, round(s.max_answer_s / self.frame_s))

        said: dict[str, list[str]] = {"opening": [], "question": [], "answer": []}
        spoke, quiet, step, stop = False, 0, 0, "cap"
        delay = self.gen.max_delay
        while True:
            if step < q_start or step >= q_end:
                pcm, forced = self.silence, None
            else:
                pcm, forced = frames[step - q_start]
            out = self._step(pcm, forced)
            step += 1
            if out is None:
                continue
            made_at = step - 1 - delay  # the step that produced this text token
            piece = self.stream.tokenizer.piece(out.text_token)
            phase = ("opening" if made_at < q_start else
                     "question" if made_at < q_end else "answer")
            if piece:
                said[phase].append(piece)
            if phase != "answer":
                continue
            if piece:
                spoke, quiet = True, 0
            else:
                quiet += 1
            if spoke and quiet >= silence_frames:
                stop = "silence"
                break
            if made_at - q_end + 1 >= cap_frames:
                break
        answer_frames = made_at - q_end + 1
        return Answer(text=pieces_text(said["answer"]), stop=stop,
                      opening=pieces_text(said["opening"]),
                      during_question=pieces_text(said["question"]), frames=step,
                      question_frames=len(frames), answer_s=round(answer_frames * self.frame_s, 3),
                      seconds=time.perf_counter() - t0)

    def _step(self, pcm: np.ndarray, forced_text: int | None):
        """One frame through the stream's encoder and generator (text forced or not)."""
        codes = np.asarray(self.stream.encoder.step(pcm)).reshape(-1)
        if forced_text is None:
            return self.gen.step(codes)
        return self.gen.step(codes, force_text=forced_text, force_audio=self.silent_codes())
