"""The model thread: runs the session, fed with microphone frames and commands.

Everything that touches MLX runs here, from loading the weights to the last step: MLX
streams belong to the thread that creates them, so arrays are never handed between
threads. The thread owns no device: it takes frames from a source (live mode: the audio
layer's bounded queue, which drops stale frames when the model falls behind), applies
the commands the main thread queued, between two frames (so a new image or a restart
never races with a step), and hands every event to a sink (live mode: the speaker, the
recording and the display).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from ..errors import MoshivisError
from ..session import Event
from .opening import Opened

FrameSource = Callable[[float], np.ndarray | None]
"""source(timeout) -> the next frame of the user's audio, or None if none came in time."""
EventSink = Callable[[list[Event]], None]


class ModelWorker(threading.Thread):
    """Opens the session (`prepare`, on this thread: loading, warm-up), then feeds it the
    source's frames until `stop()`, after `begin(sink)`."""

    def __init__(self, prepare: Callable[[], Opened], source: FrameSource):
        super().__init__(name="moshivis-model", daemon=True)
        self.prepare = prepare
        self.source = source
        self.opened: Opened | None = None
        self.error: BaseException | None = None
        """What ended the thread's work, if it failed."""
        self.commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self.ready = threading.Event()
        self.finished = threading.Event()
        self._sink: EventSink | None = None
        self._begin = threading.Event()
        self._stop_event = threading.Event()

    # -- called from the main thread --------------------------------------------------------

    def wait_ready(self) -> Opened:
        """Blocks until the session is loaded and warmed up; raises what made that fail."""
        while not self.ready.wait(0.1):
            if self.finished.is_set():
                raise self.error or MoshivisError("the model thread stopped while loading")
        return self.opened

    def begin(self, sink: EventSink) -> None:
        """Start the conversation; `sink` receives every event, on this thread."""
        self._sink = sink
        self._begin.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the conversation; returns once the thread has stopped working."""
        self._stop_event.set()
        self.finished.wait(timeout)

    def load_image(self, path: str) -> None:
        self.commands.put(("image", (path, None)))

    def show_picture(self, name: str, picture: object) -> None:
        """A picture already decoded (a camera snapshot) becomes the image."""
        self.commands.put(("image", (name, picture)))

    def restart(self) -> None:
        self.commands.put(("restart", None))

    def mute(self, muted: bool) -> None:
        self.commands.put(("mute", muted))

    @property
    def running(self) -> bool:
        """False once the thread's work is over (see `run` for why it never ends)."""
        return not self.finished.is_set()

    # -- this thread -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()
        # MLX (0.32) can abort the whole process at exit when a thread that used it has
        # ended before (a race in its per-thread state). So this thread never ends: it
        # parks here, as a daemon, until the process exits.
        threading.Event().wait()

    def _work(self) -> None:
        self.opened = self.prepare()
        session = self.opened.session
        self.ready.set()
        while not self._begin.wait(0.05):
            if self._stop_event.is_set():
                return
        while not self._stop_event.is_set():
            self._run_commands()
            frame = self.source(0.1)
            if frame is not None:
                self._sink(session.feed(frame))

    def _run_commands(self) -> None:
        session = self.opened.session
        while True:
            try:
                name, arg = self.commands.get_nowait()
            except queue.Empty:
                return
            if name == "restart":
                self._sink(session.restart())
            elif name == "image":
                self._sink(session.set_image(*arg))
            elif name == "mute":
                self._sink(session.mute(arg))
