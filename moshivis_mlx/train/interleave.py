"""The assistant's words -> Moshi's text stream, one token per 80 ms frame, window by window.

Kyutai's convention (moshi-finetune's `Interleaver` and `InterleavedTokenizer`), which
training samples must follow to be the samples moshi-finetune trains on:

* windows: a dialogue is cut into windows of the sample length, starting at 0 s, one
  every window length while the start is before the dialogue's end (the last one may be
  short); each window is built on its own from the word timestamps.
* words: those starting inside the window (at or after its start, before its end) are
  kept, with their times taken from the window's start; a word begun before the window
  is dropped whole (its tail is not carried in), one running past the end is cut there.
* tokens: a word is stripped, split at newlines, each part encoded and the parts joined
  with the tokenizer's newline piece; an empty word has no tokens.
* placement: every frame holds the padding token unless a word's tokens are being
  placed. A word's tokens start at the frame of its start time, one per frame; the frame
  just before a word's first token, if it held padding, becomes end-of-padding. A word
  that starts while the previous one's tokens are still being placed replaces them (what
  is left is dropped), an empty word too (it places nothing, so it only cuts the
  previous word short).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from .manifest import Word

Encode = Callable[[str], list[int]]


def newline_token(encode: Encode) -> int | None:
    """The piece that stands for a newline inside a word: the last one of encoding "\\n"
    (None if the tokenizer drops newlines altogether)."""
    pieces = list(encode("\n"))
    return pieces[-1] if pieces else None


def word_tokens(word: str, encode: Encode, newline: int | None) -> list[int]:
    """A word's tokens: stripped, each line encoded on its own, lines joined by `newline`
    (so "a\\nb" is not encoded as "a b"); an empty word has none."""
    out: list[int] = []
    for k, line in enumerate(word.strip().split("\n")):
        if k and newline is not None:
            out.append(newline)
        out += list(encode(line)) if line else []
    return out


def window_starts(duration: float, window: float) -> list[float]:
    """The start (s) of each window of a dialogue of `duration` s: 0, window, 2 window...
    while before the end. Summed in double precision and stored in single precision, as
    the windows moshi-finetune reads (sphn's segments) are, so a word's frame is the same."""
    starts: list[float] = []
    start = 0.0
    while start < duration:
        starts.append(float(np.float32(start)))
        start += window
    return starts


def window_words(words: Sequence[Word], start: float, window: float) -> list[Word]:
    """The words starting in [start, start + window), timed from `start`. `words` sorted by
    start time; a word begun before `start` is not kept, even if it is still being spoken."""
    end = start + window
    return [(w, s - start, e - start) for w, s, e in words if start <= s < end]


def text_frames(audio_frames: int, window_frames: int, frame_rate: float) -> int:
    """How many frames of a window get text. moshi-finetune sizes the text of a window by
    `ceil(duration * frame_rate)` with its audio's frame count in place of the duration,
    so the text of a short last window runs on (padding) past its audio, up to the window's
    length; the frames after it are not given."""
    return min(window_frames, math.ceil(audio_frames * frame_rate))


def text_stream(words: Sequence[Word], frames: int, frame_rate: float,
                encode: Encode, padding: int, end_of_padding: int) -> np.ndarray:
    """[frames] int32: the text tokens of each frame. `words` sorted by start time, timed
    from the stream's start; `encode` gives a word's tokens (see `word_tokens`)."""
    tokens = np.full(frames, padding, dtype=np.int32)
    tokenized = [(list(encode(w)), start) for w, start, _ in words]
    pending: deque[int] = deque()
    i = 0
    for t in range(frames):
        while i < len(tokenized) and tokenized[i][1] * frame_rate < t + 1:
            pending = deque(tokenized[i][0])
            i += 1
        if pending:
            if t > 0 and tokens[t - 1] == padding:
                tokens[t - 1] = end_of_padding
            tokens[t] = pending.popleft()
    return tokens
