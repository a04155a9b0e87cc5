"""The model's words as they are spoken, each with its time and cross-attention gate.

Pieces arrive one per frame; a piece starting with "▁" opens a new word, others extend
the current one. A word's gate is the mean gate of its pieces: how much the model was
looking at the image while saying it (the colouring of the MoshiVis paper's Figure 7).

Memory stays flat however long the conversation: only the last `keep` words are held,
finished words go to a `TranscriptWriter` (a JSON Lines log on disk as they come, the
JSON document at the end) and the plain text is kept as one compact string.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_writer
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
    on_event: called with each event as it is added.
    """

    def __init__(self, keep: int | None = None, on_word: Callable[[Word], None] | None = None,
                 keep_text: bool = True,
                 on_event: Callable[[dict[str, Any]], None] | None = None):
        self.words: deque[Word] = deque(maxlen=keep)
        self.keep_text = keep_text
        self.events: list[dict[str, Any]] = []
        self.on_word = on_word
        self.on_event = on_event
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
        event = {"t": round(t, 3), "event": kind, **info}
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    @property
    def current(self) -> Word | None:
        """The word being spoken (the next piece may still extend it)."""
        return self._open

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


def log_path(path: Path) -> Path:
    """Where a transcript's log goes while it is written: T.json -> T.jsonl."""
    return path.with_suffix(".jsonl") if path.suffix == ".json" else \
        path.with_name(path.name + ".jsonl")


class TranscriptWriter:
    """transcript.json, made so that no stop loses more than the last second of it.

    While the conversation goes on, everything goes to a log next to it (`log_path`:
    transcript.jsonl), one JSON object a line, on disk as it comes:

        {"type": "header", "sample_rate": 24000, ...}
        {"type": "word", "word", "start", "end", "step", "gate"}     each finished word
        {"type": "event", "t", "event", ...}                         image, restart, error
        {"type": "pending", "word", ...}    the word being spoken, at most a second old
        {"type": "end", "duration_s", ...}                           a clean end

    A hard stop (SIGKILL, a crash, power) leaves that log. `close` writes the whole
    document (atomically, streamed from the log: memory stays flat)

        {"sample_rate": 24000, ..., "words": [...], "events": [...], "text": "..."}

    and removes the log.
    """

    PENDING_EVERY = 1.0

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path = Path(path)
        self.log = log_path(self.path)
        self._f = open(self.log, "w", encoding="utf-8")
        self._line({"type": "header", **header})
        self._pending_at = time.monotonic()
        self._pending: tuple | None = None

    def _line(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, default=str) + "\n")
        self._f.flush()  # in the OS's hands: survives the process

    def write_word(self, word: Word) -> None:
        self._line({"type": "word", **word.to_json()})

    def write_event(self, event: dict[str, Any]) -> None:
        self._line({"type": "event", **event})

    def tick(self, transcript: Transcript) -> None:
        """Called as the conversation goes: once a second, the word being spoken is logged
        (so a hard stop loses at most the last second of it)."""
        now = time.monotonic()
        if now - self._pending_at < self.PENDING_EVERY or self._f.closed:
            return
        self._pending_at = now
        word = transcript.current
        state = None if word is None else (word.text, word.end, len(word.gates))
        if word is not None and state != self._pending:
            self._line({"type": "pending", **word.to_json()})
        self._pending = state

    def close(self, transcript: Transcript, extra: dict[str, Any] | None = None) -> None:
        if self._f.closed:
            return
        transcript.finish()
        # A full disk may refuse the log's last lines: the document is still made from
        # what the log holds (it needs no more room than the log frees).
        try:
            self._line({"type": "end", **(extra or {})})
        except OSError:
            pass
        try:
            self._f.close()
        except OSError:
            pass
        self._write_document(transcript, extra or {})
        os.unlink(self.log)

    def _write_document(self, transcript: Transcript, extra: dict[str, Any]) -> None:
        """transcript.json: the log's header fields and words, then the events, `extra`
        and the text."""
        with open(self.log, encoding="utf-8") as log, atomic_writer(self.path) as out:
            out.write("{\n")
            first = True
            for line in log:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:  # the last line, cut by a full disk
                    continue
                kind = item.pop("type")
                if kind == "header":
                    out.write("".join(f" {json.dumps(k)}: {json.dumps(v, default=str)},\n"
                                      for k, v in item.items()) + ' "words": [')
                elif kind == "word":
                    out.write(("\n  " if first else ",\n  ") + json.dumps(item))
                    first = False
            tail = {"events": transcript.events, **extra, "text": transcript.text}
            # `tail` as JSON without its opening brace continues the object.
            out.write("\n ],\n" + json.dumps(tail, indent=1, default=str)[2:] + "\n")
