"""The assistant's words -> Moshi's text stream, one token per 80 ms frame.

Kyutai's convention (moshi-finetune's `Interleaver`): every frame holds the padding token
unless a word's tokens are being placed. A word's tokens start at the frame of its start
time, one per frame; the frame just before a word's first token, if it held padding,
becomes the end-of-padding token. A word that starts while the tokens of the previous one
are still being placed replaces them (what is left of the previous word is dropped), as
moshi-finetune does by default.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from .manifest import Word


def text_stream(words: Sequence[Word], frames: int, frame_rate: float,
                encode: Callable[[str], list[int]], padding: int, end_of_padding: int
                ) -> np.ndarray:
    """[frames] int32: the text tokens of each frame. `words` sorted by start time."""
    tokens = np.full(frames, padding, dtype=np.int32)
    tokenized = [(encode(w), start) for w, start, _ in words]
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
