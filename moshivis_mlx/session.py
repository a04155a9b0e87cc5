"""A conversation around one `Stream`, whatever carries its audio.

Commands go in as method calls; each returns the events it caused, in order:

    feed(frame)      -> AudioFrame   the model's frame, and the user's as the model heard it
                        Piece        the text piece of this frame with its gate (if any)
                        Stats        what the frame cost, the step, the time, the mic level
    set_image(path)  -> ImageChanged, or a Message saying why the image was not used
                        (or set_image(name, picture): a picture already decoded)
    restart()        -> Restarted
    mute(muted)      -> (nothing)

The terminal UI, plain mode, file mode and the session recorder all consume these
events; nothing here knows about devices, threads or the terminal, so a web or API client
could drive a session the same way. All calls must come from the thread that created the
stream (MLX streams belong to their thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError
from .image import ImageEncoder
from .stream import Stream

WARMUP_STEPS = 4


@dataclass
class AudioFrame:
    step: int
    t: float
    pcm: np.ndarray
    """One frame of the model's voice (float32; silence until it has spoken)."""
    heard: np.ndarray
    """The user's frame as the model heard it (silence while muted)."""


@dataclass
class Piece:
    step: int
    t: float
    text: str
    """A piece of the model's text ("▁" starts a word)."""
    gate: float | None
    """How much the model was looking at the image (None: no image yet)."""


@dataclass
class Stats:
    step: int
    """Frames fed to the session before this one (a restart does not reset it)."""
    t: float
    """Seconds into the conversation when the frame began."""
    latency_ms: float
    """What the whole frame cost: from the frame given to the model's frame back."""
    host_ms: float
    """Of which the host spent building the frame's graph."""
    level: float
    """The microphone's RMS over the frame (before muting), 0..1."""


@dataclass
class ImageChanged:
    path: str
    """The image now in use."""
    picture: Any = None
    """The decoded picture (PIL), for a thumbnail."""


@dataclass
class Restarted:
    pass


@dataclass
class Message:
    text: str
    level: str = "info"  # info | warning | error


Event = AudioFrame | Piece | Stats | ImageChanged | Restarted | Message


ANSWER_SILENCE_S = 2.0
"""An answer has ended after this long of silence (file mode, the evaluation)."""
MAX_ANSWER_S = 30.0
"""The longest an answer may go on after the question."""
ANSWER_LIMIT_S = 3600.0
"""The bound of both settings above, wherever they are given (a spoken caption takes 4 to
8 s)."""


class AnswerWatch:
    """Has the model finished answering? Fed each frame's events once the user has
    stopped talking: done when the text stream has been padding and the voice near
    silent for `quiet_s`, or when `max_s` have passed (the cap)."""

    def __init__(self, frame_seconds: float, quiet_s: float = ANSWER_SILENCE_S,
                 max_s: float = MAX_ANSWER_S,
                 silence_rms: float | None = 0.01, after_speech: bool = False):
        """`silence_rms`: the voice's level below which it counts as silent (None: only
        the text counts, as when the answer is scored as text). `after_speech`: the quiet
        counts only once the model has said a word (a benchmark waits for its answer;
        file mode does not)."""
        self.frame_seconds = frame_seconds
        self.after_speech = after_speech
        self.spoke = False
        self.quiet_s = quiet_s
        self.max_s = max_s
        self.silence_rms = silence_rms
        self.elapsed = 0.0
        self.quiet = 0.0
        self.outcome: str | None = None
        """None while the answer goes on; then "finished" or "cap"."""

    def update(self, events: list[Event]) -> str | None:
        """One frame's events; returns the outcome once there is one."""
        spoke = any(isinstance(ev, Piece) for ev in events)
        for ev in events:
            if isinstance(ev, AudioFrame) and self.silence_rms is not None:
                spoke |= float(np.sqrt(np.mean(ev.pcm * ev.pcm))) >= self.silence_rms
        self.elapsed += self.frame_seconds
        self.spoke |= any(isinstance(ev, Piece) for ev in events)
        waiting = self.after_speech and not self.spoke
        self.quiet = 0.0 if spoke or waiting else self.quiet + self.frame_seconds
        if self.quiet >= self.quiet_s - 1e-9:
            self.outcome = "finished"
        elif self.elapsed >= self.max_s - 1e-9:
            self.outcome = "cap"
        return self.outcome


def load_picture(path: str | Path):
    """An image file -> a decoded RGB picture (PIL); ImageError with a one-line
    message for anything that is not a usable image."""
    from .image import load_image

    try:
        return load_image(path)
    except ImageError as e:
        raise ImageError(str(e), "give a JPEG or PNG photo") from None


class Session:
    """One conversation: the user's frames in, the model's voice and words out.

    session = Session(stream, vision)
    for event in session.feed(frame):   # one frame of the stream's geometry
        ...
    """

    def __init__(self, stream: Stream, vision: ImageEncoder | None = None):
        self.stream = stream
        self.geometry = stream.geometry
        self.vision = vision
        """The image encoder (None: images are off)."""
        self.frames = 0
        self.muted = False
        self._silence = np.zeros(self.geometry.frame_size, dtype=np.float32)
        self._silent_codes: np.ndarray | None = None

    def feed(self, frame: np.ndarray) -> list[Event]:
        """One frame of the user's audio -> the model's frame, its text, the step's stats."""
        return self.submit(frame)()

    def submit(self, frame: np.ndarray, text: int | None = None) -> Callable[[], list[Event]]:
        """`feed` in two halves: the frame goes to the device now, its events come when the
        returned function is called. A caller holding the next frame (file mode) submits
        it before collecting this one, so the host's work overlaps the device's.

        `text`: a token typed into the model's text stream for this step, its voice then
        silent (how a question is given as text: the user's words in the text stream, as
        MoshiVis' speechless training samples carry them)."""
        frame = np.asarray(frame, dtype=np.float32).reshape(-1)
        level = float(np.sqrt(np.mean(frame * frame)))
        heard = self._silence if self.muted else frame
        silent = self.silent_codes() if text is not None else None
        pending = self.stream.submit(heard, text, silent)
        step, t = self.frames, self.frames * self.geometry.frame_seconds
        self.frames += 1

        def events() -> list[Event]:
            result = pending.result()
            out: list[Event] = [AudioFrame(step, t, result.pcm, heard)]
            if result.piece:
                out.append(Piece(step, t, result.piece, result.gate))
            out.append(Stats(step, t, result.latency_ms, result.host_ms, level))
            return out

        return events

    def converse(self, frames: Iterable[tuple[np.ndarray, int | None, Any]],
                 watch: AnswerWatch | None = None) -> Iterator[tuple[Any, list[Event]]]:
        """Each (frame, text, tag) in turn, then silence for as long as `watch` says the
        answer goes on; yields (tag, that frame's events), the tag None for the silence.
        One frame is submitted ahead of being collected: the host builds the next while
        the device computes this one (one frame past the end is computed and dropped)."""
        def inputs() -> Iterator[tuple[np.ndarray, int | None, Any, bool]]:
            for frame, text, tag in frames:
                yield frame, text, tag, False
            while watch is not None and watch.outcome is None:
                yield self._silence, None, None, True

        pending = None
        for frame, text, tag, tail in inputs():
            submitted = (self.submit(frame, text), tag, tail)
            if pending is not None:
                yield self._collect(pending, watch)
            pending = submitted
            if tail and watch.outcome is not None:
                return
        if pending is not None and (watch is None or watch.outcome is None):
            yield self._collect(pending, watch)

    @staticmethod
    def _collect(pending: tuple, watch: AnswerWatch | None) -> tuple[Any, list[Event]]:
        events_of, tag, tail = pending
        events = events_of()
        if tail:
            watch.update(events)
        return tag, events

    def silent_codes(self) -> np.ndarray:
        """The model's codes for silence (its voice while its text is typed in): what
        Mimi makes of silence once its state has settled; computed once."""
        if self._silent_codes is None:
            enc = self.stream.mimi.streaming_encoder(self.stream.gen.lm.cfg.dep_q)
            for _ in range(4):
                codes = np.asarray(enc.step(self._silence)).reshape(-1)
            self._silent_codes = codes.astype(np.int64)
        return self._silent_codes

    def set_image(self, path: str, picture: Any = None) -> list[Event]:
        """Look at another picture from now on; the conversation goes on (only the image
        keys and values are recomputed). `picture`: an image already decoded (a camera
        snapshot), `path` then only names it. A file that cannot be used is reported and
        changes nothing."""
        if self.vision is None:
            return [Message("this model runs without images (--no-image)", "warning")]
        try:
            picture = load_picture(path) if picture is None else picture
            tokens = self.vision.encode_image(picture)
        except Exception as e:  # a bad file must not end the conversation
            return [Message(str(e), "error")]
        self.stream.set_image(tokens)
        return [ImageChanged(str(path), picture)]

    def restart(self) -> list[Event]:
        """A new conversation about the same image."""
        self.stream.reset()
        return [Restarted()]

    def mute(self, muted: bool) -> list[Event]:
        """While muted the model hears silence."""
        self.muted = muted
        return []

    def warm_up(self, steps: int = WARMUP_STEPS) -> None:
        """A few steps on silence, and the step with an image compiled (it first runs at
        `xa_start`, and an image may come later), so the first real frame does not pay for
        compilation and allocation; then a fresh conversation."""
        for _ in range(steps):
            self.stream.step(self._silence)
        tokens = self.vision.config.num_tokens if self.vision is not None else None
        self.stream.gen.warm_up(image_tokens=tokens)
        self.stream.reset()
