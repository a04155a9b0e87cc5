"""The model thread of the server: one thread owns the model and steps the conversation.

MLX streams belong to the thread that creates them and the model is not thread-safe, so
everything that touches MLX (loading, warm-up, every step, image encoding) runs on this one
thread, never on the event loop (a step would stall every socket). The event loop hands a
`Conversation` frames and commands; the thread takes them between two steps, runs the
`Session`, turns its events into protocol messages (Opus encoding included) and hands them
back to the loop. Frames wait in a bounded deque: when the model falls behind, the oldest
are dropped, as live mode does.

One conversation at a time: `attach` starts it (a fresh `Session` on the loaded model, the
client's sampling, no image but the server's default), `detach` ends it and leaves nothing
of it behind (the stream is reset, the image, samplers and encoder dropped).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoshivisError, one_line
from ..image import load_image
from ..sampling import Sampler
from ..session import AudioFrame, Event, ImageChanged, Message, Piece, Restarted, Session, Stats
from . import protocol
from .protocol import ClientOptions

MAX_PENDING_FRAMES = 25
"""Frames (80 ms each) waiting for the model: 2 s; older ones are dropped."""
MAX_PENDING_COMMANDS = 16
STATS_EVERY = 12
"""Frames between two stats messages (`stats=1`): about a second."""


@dataclass
class ServedModel:
    """The opened model, made on the model thread."""

    session: Session
    """The session built around the loaded stream; each conversation gets a fresh one."""
    name: str
    """The bundle's name, for the metadata message."""
    default_tokens: Any = None
    """The server's --image as image tokens (every conversation starts with it)."""
    default_image: str | None = None


class Conversation:
    """One connection's side of the model thread: what the loop hands in, bounded.

    `send(messages)` is called on the model thread with the messages one step made (the
    loop's side schedules them onto the socket)."""

    def __init__(self, options: ClientOptions, send: Callable[[list[bytes]], None]):
        self.options = options
        self.send = send
        self.frames: collections.deque[np.ndarray] = collections.deque(
            maxlen=MAX_PENDING_FRAMES)
        self.commands: collections.deque[tuple[str, Any, Callable[[], None] | None]] = \
            collections.deque()
        self.dropped = 0
        """Frames dropped because the model was behind."""
        self.colored = bool(options.colored)
        self.ended = False
        self._lock = threading.Lock()

    def push_frame(self, frame: np.ndarray) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1
        self.frames.append(frame)

    def push_command(self, name: str, arg: Any = None,
                     done: Callable[[], None] | None = None) -> bool:
        """Queues a command; False if too many wait (the client floods). At most one image
        waits: a newer one takes the place of the one not yet used (16 MB each)."""
        with self._lock:
            if name == "image":
                for i, (other, _, other_done) in enumerate(self.commands):
                    if other == "image":
                        self.commands[i] = (name, arg, done)
                        if other_done is not None:
                            other_done()
                        return True
            if len(self.commands) >= MAX_PENDING_COMMANDS:
                return False
            self.commands.append((name, arg, done))
            return True

    def next_command(self) -> tuple[str, Any, Callable[[], None] | None] | None:
        with self._lock:
            return self.commands.popleft() if self.commands else None


class ModelHost(threading.Thread):
    """Loads the model with `prepare` (on this thread), then serves conversations."""

    def __init__(self, prepare: Callable[[], ServedModel], record: Path | None = None):
        """`record`: each conversation is saved in a new folder under it (as --record)."""
        super().__init__(name="moshivis-serve-model", daemon=True)
        self.prepare = prepare
        self.record = record
        self._recorder: Any = None
        self.loaded: ServedModel | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.jobs: queue.Queue[tuple[str, Conversation, Callable[[], None] | None]] = \
            queue.Queue()
        self.wake = threading.Event()
        self._current: Conversation | None = None
        self._session: Session | None = None
        self._writer: Any = None
        self._defaults: tuple[Sampler, Sampler, int] | None = None

    # -- called from the event loop ------------------------------------------------------------

    def wait_ready(self) -> ServedModel:
        while not self.ready.wait(0.1):
            if self.finished.is_set():
                raise self.error or MoshivisError("the model thread stopped while loading")
        return self.loaded

    @property
    def vision(self) -> bool:
        return self.loaded is not None and self.loaded.session.vision is not None

    def attach(self, conv: Conversation, done: Callable[[], None]) -> None:
        self.jobs.put(("attach", conv, done))
        self.wake.set()

    def detach(self, conv: Conversation) -> None:
        conv.ended = True
        self.jobs.put(("detach", conv, None))
        self.wake.set()

    # -- this thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.loaded = self.prepare()
            gen = self.loaded.session.stream.gen
            self._defaults = (gen.text_sampler, gen.audio_sampler, gen.xa_start)
            self.ready.set()
            while True:
                self._serve_once()
        except BaseException as e:  # a failed load; the loop reports it
            self.error = e
        finally:
            self.finished.set()
        # MLX can abort the process at exit when a thread that used it has ended before:
        # this thread parks until the process exits (as the app's model thread does).
        threading.Event().wait()

    def _serve_once(self) -> None:
        self.wake.wait(0.5)
        self.wake.clear()
        while True:
            try:
                name, conv, done = self.jobs.get_nowait()
            except queue.Empty:
                break
            if name == "attach":
                self._attach(conv)
            elif conv is self._current:
                self._detach()
            if done is not None:
                done()
        conv = self._current
        if conv is None or conv.ended:
            return
        try:
            while not conv.ended and (command := conv.next_command()) is not None:
                name, arg, done = command
                self._command(conv, name, arg)
                if done is not None:
                    done()
            while conv.frames and not conv.ended and not conv.commands:
                frame = conv.frames.popleft()
                conv.send(self._messages(conv, self._session.feed(frame)))
                if self.jobs.qsize():
                    break
        except Exception as e:  # a bug must end this conversation, not the server
            conv.ended = True
            conv.send([protocol.error(f"internal error: {one_line(e, 300)}")])
            self._detach()
        if conv.frames or conv.commands:
            self.wake.set()

    def _attach(self, conv: Conversation) -> None:
        if self._current is not None:
            self._detach()
        loaded = self.loaded
        base = loaded.session
        session = Session(base.stream, base.vision)
        stream, gen = session.stream, session.stream.gen
        stream.reset()
        stream.set_image(loaded.default_tokens)
        text, audio, xa_start = self._defaults
        o = conv.options
        gen.text_sampler = Sampler(
            text.temperature if o.text_temperature is None else o.text_temperature,
            text.top_k if o.text_topk is None else o.text_topk, text.top_p,
            text.seed if o.text_seed is None else o.text_seed)
        gen.audio_sampler = Sampler(
            audio.temperature if o.audio_temperature is None else o.audio_temperature,
            audio.top_k if o.audio_topk is None else o.audio_topk, audio.top_p,
            audio.seed if o.audio_seed is None else o.audio_seed)
        gen.xa_start = xa_start if o.xa_start is None else o.xa_start
        gen.limit_compiled(KEEP_COMPILED)
        self._current, self._session = conv, session
        self._writer = None if o.pcm else _opus_writer(session.geometry.sample_rate)
        self._recorder = self._record(conv, session) if self.record is not None else None

    def _record(self, conv: Conversation, session: Session) -> Any:
        """The conversation's recorder (the app's), in a new folder; None if it cannot be
        made (the conversation goes on, told so)."""
        from ..app.recorder import SessionRecorder, default_session_dir

        gen = session.stream.gen
        try:
            recorder = SessionRecorder(default_session_dir(self.record, create=True),
                                       session.geometry, {
                "served": True, "bundle": self.loaded.name,
                "client": {k: v for k, v in vars(conv.options).items() if v is not None},
                "sampling": {"text": repr(gen.text_sampler), "audio": repr(gen.audio_sampler),
                             "xa_start": gen.xa_start}})
        except (OSError, MoshivisError) as e:
            conv.send([protocol.metadata({"type": "message", "level": "warning",
                                          "text": f"not recorded: {one_line(e, 200)}"})])
            return None
        if self.loaded.default_image:
            recorder.add_event("image", path=self.loaded.default_image)
        return recorder

    def _close_recording(self, conv: Conversation | None) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            try:
                recorder.close({"dropped_frames": conv.dropped if conv else 0})
            except OSError:
                pass

    def _detach(self) -> None:
        """Nothing of the conversation stays: state, image, samplers, encoder (only its
        recording, when the server records)."""
        self._close_recording(self._current)
        session = self._session
        if session is not None:
            stream = session.stream
            stream.reset()
            stream.set_image(None)
            gen = stream.gen
            gen.text_sampler, gen.audio_sampler, gen.xa_start = self._defaults
        self._current = self._session = self._writer = None

    def _command(self, conv: Conversation, name: str, arg: Any) -> None:
        session = self._session
        if name == "image":
            data, label = arg
            try:
                picture = load_image(data, label)
            except MoshivisError as e:
                events: list[Event] = [Message(str(e), "error")]
            else:
                events = session.set_image(label, picture)
        elif name == "restart":
            events = session.restart()
        elif name == "mute":
            events = session.mute(arg)
        else:
            raise ValueError(f"unknown command {name}")
        conv.send(self._messages(conv, events))

    def _messages(self, conv: Conversation, events: list[Event]) -> list[bytes]:
        """A step's (or a command's) events as protocol messages."""
        out: list[bytes] = []
        if self._recorder is not None:
            try:
                for ev in events:
                    self._recorder.add(ev, backlog=len(conv.frames))
            except OSError as e:  # a full disk ends the recording, not the conversation
                self._close_recording(conv)
                out.append(protocol.metadata({"type": "message", "level": "warning",
                                              "text": f"recording stopped: {one_line(e, 200)}"}))
        for ev in events:
            if isinstance(ev, AudioFrame):
                if self._writer is None:
                    out.append(protocol.pcm(ev.pcm))
                else:
                    ogg = self._writer.append_pcm(ev.pcm)
                    if ogg:
                        out.append(protocol.audio(ogg))
            elif isinstance(ev, Piece):
                out.append(protocol.colored_text(ev.text, ev.gate) if conv.colored
                           else protocol.text(ev.text))
            elif isinstance(ev, Stats):
                if conv.options.stats and ev.step % STATS_EVERY == 0:
                    out.append(protocol.metadata({
                        "type": "stats", "step": ev.step, "latency_ms": round(ev.latency_ms, 1),
                        "dropped": conv.dropped, "time": round(time.time(), 3)}))
            elif isinstance(ev, ImageChanged):
                out.append(protocol.metadata({"type": "image", "name": ev.path}))
            elif isinstance(ev, Restarted):
                out.append(protocol.metadata({"type": "restarted"}))
            elif isinstance(ev, Message):
                out.append(protocol.metadata({"type": "message", "level": ev.level,
                                              "text": ev.text}))
        return out


KEEP_COMPILED = 16
"""Compiled step variants kept (each client's sampling settings compile their own): a
client varying its settings on every connection cannot grow memory without bound."""


def _opus_writer(sample_rate: int) -> Any:
    import sphn

    return sphn.OpusStreamWriter(sample_rate)
