"""The model thread: microphone frames in, model frames out, events to the display.

Everything that touches MLX runs here, from loading the weights to the last step: MLX
streams belong to the thread that creates them, so arrays are never handed between
threads. The main thread only draws and reads keys, the audio callbacks only copy. Keys
become commands on a queue that is read between two frames, so a new image or a restart
never races with a step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stream import FRAME_SECONDS, StepResult, Stream
from .audio import AudioIO
from .recorder import SessionRecorder

MAX_EVENTS = 2000


@dataclass
class StepEvent:
    result: StepResult
    t: float
    """Seconds of conversation (frames since the start x 80 ms)."""
    level: float
    """Microphone RMS of the frame (before muting), 0..1."""
    backlog: int
    dropped: int
    underruns: int


@dataclass
class MessageEvent:
    text: str
    level: str = "info"  # info | warning | error


@dataclass
class ImageEvent:
    path: str | None
    """The image now in use (None: no image)."""
    image: Any = None
    """The decoded picture (PIL), for the thumbnail."""


@dataclass
class RestartEvent:
    pass


@dataclass
class FatalEvent:
    error: BaseException


@dataclass
class ReadyEvent:
    """The models are loaded and warmed up; the thread waits for `begin()`."""


class ModelWorker(threading.Thread):
    """Prepares the models, then runs them on the microphone's frames until `stop()`.

    prepare() -> (stream, encode_image) runs first, on this thread (loading, warm-up);
    then a `ReadyEvent` is emitted and the thread waits for `begin()`.
    encode_image(path) -> (tokens, picture) is called for the `i` key (None: no image
    encoder); it raises for a bad image, which is reported and changes nothing.
    """

    def __init__(self, prepare: Callable[[], tuple[Stream, Callable[[str], Any] | None]],
                 audio: AudioIO):
        super().__init__(name="moshivis-model", daemon=True)
        self.prepare = prepare
        self.stream: Stream | None = None
        self.encode_image: Callable[[str], Any] | None = None
        self.audio = audio
        self.recorder: SessionRecorder | None = None
        self.events: queue.Queue[Any] = queue.Queue(maxsize=MAX_EVENTS)
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.muted = False
        self.frames = 0
        self.lost_events = 0
        self._stop_event = threading.Event()
        self._begin = threading.Event()
        self.finished = threading.Event()
        self._silence: np.ndarray | None = None

    # -- called from the main thread --------------------------------------------------------

    def begin(self, recorder: SessionRecorder | None) -> None:
        """Start the conversation (the audio streams must be running)."""
        self.recorder = recorder
        self._begin.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the conversation; returns once the thread has stopped working."""
        self._stop_event.set()
        self.finished.wait(timeout)

    def load_image(self, path: str) -> None:
        self.commands.put(("image", path))

    def restart(self) -> None:
        self.commands.put(("restart",))

    # -- this thread -----------------------------------------------------------------------

    def _emit(self, event: Any) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:  # the display is not keeping up; the recording has everything
            self.lost_events += 1

    def _record_event(self, kind: str, **info: Any) -> None:
        if self.recorder is not None:
            self.recorder.add_event(kind, **info)

    def _run_command(self, cmd: tuple) -> None:
        if cmd[0] == "restart":
            self.stream.reset()
            self._record_event("restart")
            self._emit(RestartEvent())
        elif cmd[0] == "image":
            path = cmd[1]
            if self.encode_image is None:
                self._emit(MessageEvent("this model runs without images (--no-image)", "warning"))
                return
            try:
                tokens, picture = self.encode_image(path)
            except Exception as e:  # a bad file must not end the conversation
                self._emit(MessageEvent(str(e), "error"))
                return
            self.stream.set_image(tokens)
            self._record_event("image", path=str(path))
            self._emit(ImageEvent(str(path), picture))

    @property
    def running(self) -> bool:
        """False once the thread's work is over (see `run` for why it never ends)."""
        return not self.finished.is_set()

    def run(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self._emit_fatal(e)
        finally:
            self.finished.set()
        # MLX (0.32) can abort the whole process at exit when a thread that used it has
        # ended before (a race in its per-thread state). So this thread never ends: it
        # parks here, as a daemon, until the process exits.
        threading.Event().wait()

    def _work(self) -> None:
        self.stream, self.encode_image = self.prepare()
        self._emit(ReadyEvent())
        while not self._begin.wait(0.05):
            if self._stop_event.is_set():
                return
        while not self._stop_event.is_set():
            while True:
                try:
                    self._run_command(self.commands.get_nowait())
                except queue.Empty:
                    break
            frame = self.audio.read_frame(timeout=0.1)
            if frame is None:
                self.audio.check()
                continue
            self._step(frame)
            if self.frames % 13 == 0:
                self.audio.check()

    def _emit_fatal(self, e: BaseException) -> None:
        # The display must learn about this even if its queue is full.
        while True:
            try:
                self.events.put_nowait(FatalEvent(e))
                return
            except queue.Full:
                try:
                    self.events.get_nowait()
                except queue.Empty:
                    pass

    def _step(self, frame: np.ndarray) -> None:
        level = float(np.sqrt(np.mean(frame * frame)))
        if self.muted:
            if self._silence is None or len(self._silence) != len(frame):
                self._silence = np.zeros_like(frame)
            frame = self._silence
        result = self.stream.step(frame)
        self.audio.write_frame(result.pcm)
        backlog = self.audio.backlog
        if self.recorder is not None:
            self.recorder.add_step(frame, result, backlog)
        t = self.frames * FRAME_SECONDS
        self.frames += 1
        self._emit(StepEvent(result, t, level, backlog, self.audio.dropped, self.audio.underruns))

