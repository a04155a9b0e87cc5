"""The model's words as they are spoken, each with its time and cross-attention gate.

Pieces arrive one per frame; a piece starting with "▁" opens a new word, others extend
the current one. A word's gate is the mean gate of its pieces: how much the model was
looking at the image while saying it (the colouring of the MoshiVis paper's Figure 7).

Memory stays flat however long the conversation: only the last `keep` words are held,
finished words go to a `TranscriptWriter` (streamed JSON) and the plain text is kept
as one compact string.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..text import WORD_START, starts_word


@dataclass
class Word:
    text: str
    start: float
    """Seconds into the conversation when its first piece was produced."""
    end: float
    step: int
    gates: list[float] = field(default_factory=list)

    @property
    def gate(self) -> float | None:
        return sum(self.gates) / len(self.gates) if self.gates else None

    def to_json(self) -> dict[str, Any]:
        gate = self.gate
        return {"word": self.text, "start": round(self.start, 3), "end": round(self.end, 3),
                "step": self.step, "gate": None if gate is None else round(gate, 5)}


class Transcript:
    """Assembles pieces into words.

    keep: how many recent words `words` holds (None: all).
    on_word: called with each word once it is complete (the next word started, or
    `finish()`), e.g. `TranscriptWriter.write_word`.
    keep_text: whether `text` has everything said (else only the current word).
    """

    def __init__(self, keep: int | None = None, on_word: Callable[[Word], None] | None = None,
                 keep_text: bool = True):
        self.words: deque[Word] = deque(maxlen=keep)
        self.keep_text = keep_text
        self.events: list[dict[str, Any]] = []
        self.on_word = on_word
        self.count = 0
        self._text = io.StringIO()
        self._open: Word | None = None  # the word that the next piece may extend

    def _close_word(self) -> None:
        w, self._open = self._open, None
        if w is None:
            return
        if self.keep_text:
            if self._text.tell():
                self._text.write(" ")
            self._text.write(w.text)
        if self.on_word is not None:
            self.on_word(w)

    def add(self, piece: str | None, t: float, gate: float | None, step: int) -> Word | None:
        """Adds a frame's piece (None: padding). Returns the word it went into."""
        if not piece:
            return None
        text = piece.replace(WORD_START, "")
        if self._open is None or starts_word(piece):
            self._close_word()
            word = Word(text=text, start=t, end=t, step=step)
            self.words.append(word)
            self.count += 1
            self._open = word
        else:
            word = self._open
            word.text += text
            word.end = t
        if gate is not None:
            word.gates.append(gate)
        return word

    def finish(self) -> None:
        """The last word is complete (end of the conversation, a restart, a new image)."""
        self._close_word()

    def add_event(self, t: float, kind: str, **info: Any) -> None:
        self.finish()
        self.events.append({"t": round(t, 3), "event": kind, **info})

    def clear(self) -> None:
        """Forgets the held words (the display after a restart); nothing else changes."""
        self.finish()
        self.words.clear()

    @property
    def text(self) -> str:
        text = self._text.getvalue()
        if self._open is not None:
            text = f"{text} {self._open.text}" if text else self._open.text
        return text


class TranscriptWriter:
    """transcript.json written as the words come:

        {"sample_rate": 24000, ..., "words": [{"word", "start", "end", "step", "gate"}, ...],
         "events": [...], "text": "..."}
    """

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path = Path(path)
        self._f = open(self.path, "w")
        fields = [f" {json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in header.items()]
        self._f.write("{\n" + "".join(f + ",\n" for f in fields) + ' "words": [')
        self._first = True

    def write_word(self, word: Word) -> None:
        self._f.write(("\n  " if self._first else ",\n  ") + json.dumps(word.to_json()))
        self._first = False

    def close(self, transcript: Transcript, extra: dict[str, Any] | None = None) -> None:
        if self._f.closed:
            return
        transcript.finish()
        tail = {"events": transcript.events, **(extra or {}), "text": transcript.text}
        # `tail` as JSON without its opening brace continues the object.
        self._f.write("\n ],\n" + json.dumps(tail, indent=1, default=str)[2:] + "\n")
        self._f.close()
