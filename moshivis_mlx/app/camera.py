"""A webcam (or a video file) as the image source: `--camera [DEVICE]`.

A snapshot becomes the picture the model talks about: the `c` key takes one, and
`--camera-every SECONDS` refreshes it periodically (`CameraTicker`). OpenCV reads the
camera; it is an optional extra (`pip install 'moshivis-mlx[camera]'`, about 70 MB), so
the app imports it only when a camera is asked for, and says how to install it if not.

DEVICE is a camera number (0, the default, is the system's first camera), a device path
(/dev/video2 on Linux), or a video file. A snapshot is always the newest picture: a
camera queues frames while nobody reads them, so the queue is drained first (frames that
come back at once were waiting; one that takes a while is live). A video file stands in
for a camera filming since it was opened: it plays in real time and a snapshot shows the
frame of the moment, skipping those in between. When the file ends, snapshots keep
returning its last frame (`ended` turns true): a conversation about a clip outlives it.

OpenCV reports most failures only as a closed capture plus a message on stderr (on macOS,
a refused camera permission is "not authorized to capture video"), so stderr is captured
while opening and read to tell the user what to do. Open the camera on the main thread:
on macOS, the permission request needs it.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CameraError

INSTALL_FIX = "install the camera extra: pip install 'moshivis-mlx[camera]'"
PERMISSION_FIX = ("allow camera access for your terminal app in System Settings > Privacy & "
                  "Security > Camera, then restart the terminal")
OTHER_DEVICE_FIX = "pick another camera with --camera N, or give a video file"
PERMISSION_WORDS = ("not authorized", "access has been denied", "restricted",
                    "can not spin main run loop")
OUT_OF_RANGE = "out device of bound"
"""macOS (AVFoundation) for a camera number beyond those connected."""

MAX_DRAIN = 10
"""Frames at most read and discarded to reach the live one."""
LIVE_GRAB_S = 0.010
"""A frame that takes at least this long to arrive was not queued: it is live."""
FIRST_FRAME_TRIES = 20
FIRST_FRAME_WAIT_S = 0.1
"""A camera that gives no picture for 2 s after opening is refused (macOS cameras often
fail the first reads while they start)."""

Clock = Callable[[], float]


def load_cv2() -> Any:
    """The OpenCV module, quiet; a one-line error saying how to install it if missing."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # no warnings over the terminal UI
    try:
        import cv2
    except ImportError as e:
        raise CameraError(f"--camera needs OpenCV, which cannot be imported ({e})",
                          INSTALL_FIX) from None
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # builds without the logging module: the variable above did it
        pass
    return cv2


def parse_device(spec: str | int | os.PathLike | None) -> int | str:
    """--camera's value: a camera number, else a path (device or video file)."""
    if isinstance(spec, int):
        return spec
    text = "" if spec is None else os.fspath(spec)
    if text.strip() == "":
        return 0
    return int(text) if text.strip().isdigit() else text


@contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Redirects the process's stderr (file descriptor 2, where OpenCV's native code
    writes) into a temporary file; yields a function returning what was written."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to capture
        yield lambda: ""
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        text = ""
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")


def is_device_path(path: Path) -> bool:
    try:
        return stat.S_ISCHR(path.stat().st_mode)
    except OSError:
        return False


def camera_devices() -> list[str]:
    """Video devices Linux shows (/dev/video*); other systems list none here."""
    return sorted(glob.glob("/dev/video*")) if sys.platform.startswith("linux") else []


class Camera:
    """A camera or video file; `snapshot()` is its newest picture as an RGB image."""

    def __init__(self, device: str | int | os.PathLike | None = None, backend: Any = None,
                 clock: Clock = time.monotonic):
        self.device = parse_device(device)
        self._cv2 = backend if backend is not None else load_cv2()
        self._clock = clock
        self.is_file = isinstance(self.device, str) and not is_device_path(Path(self.device))
        self.name = (f"video file {self.device}" if self.is_file
                     else f"camera {self.device}")
        self.ended = False
        self._cap = self._open()
        self._opened_at = clock()
        self._fps = self._property("CAP_PROP_FPS")
        self._frame_count = int(self._property("CAP_PROP_FRAME_COUNT"))
        self._position = 0  # index of the frame in self._frame (files)
        self._frame = self._first_frame()

    # -- opening ------------------------------------------------------------------------

    def _open(self) -> Any:
        if self.is_file:
            path = Path(self.device)
            if not path.exists():
                raise CameraError(f"video file not found: {path}",
                                  "check the path given to --camera")
            if path.is_dir():
                raise CameraError(f"{path} is a folder, not a video file",
                                  "give a video file or a camera number to --camera")
        with captured_stderr() as messages:
            cap = self._cv2.VideoCapture(self.device)
            opened = cap.isOpened()
        if not opened:
            cap.release()
            raise self._open_error(messages())
        if not self.is_file:
            cap.set(self._cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer stale frames where supported
        return cap

    def _open_error(self, messages: str) -> CameraError:
        said = messages.lower()
        if any(w in said for w in PERMISSION_WORDS):
            return CameraError(f"{self.name}: camera access is not allowed for this terminal",
                               PERMISSION_FIX)
        if self.is_file:
            return CameraError(f"{self.name}: not a video OpenCV can read",
                               "convert it (e.g. ffmpeg -i IN out.mp4) or give another file")
        if isinstance(self.device, int) and self._index_missing(said):
            none_at_all = sys.platform.startswith("linux") and not camera_devices()
            if self.device == 0 or none_at_all:
                return CameraError("no camera found",
                                   "connect one, or give a video file to --camera")
            return CameraError(f"no camera number {self.device}", OTHER_DEVICE_FIX)
        return CameraError(f"{self.name} cannot be opened (in use by another app, or no "
                           f"permission)", "close other apps using it; " + OTHER_DEVICE_FIX)

    def _index_missing(self, said: str) -> bool:
        """Whether camera number `device` does not exist (rather than failing to open)."""
        if sys.platform.startswith("linux"):
            return f"/dev/video{self.device}" not in camera_devices()
        return OUT_OF_RANGE in said

    def _property(self, name: str) -> float:
        """A file's frame rate or length, 0 where unknown (and for cameras)."""
        if not self.is_file:
            return 0.0
        value = float(self._cap.get(getattr(self._cv2, name)) or 0.0)
        return value if np.isfinite(value) and value > 0 else 0.0

    def _first_frame(self) -> np.ndarray:
        """The first picture; a camera may need a moment after opening to give one."""
        tries = 1 if self.is_file else FIRST_FRAME_TRIES
        for n in range(tries):
            ok, frame = self._cap.read()
            if ok and frame is not None:
                return frame
            if n + 1 < tries:
                time.sleep(FIRST_FRAME_WAIT_S)
        self._cap.release()
        if self.is_file:
            raise CameraError(f"{self.name}: no picture in it (not a video OpenCV can read)",
                              "convert it (e.g. ffmpeg -i IN out.mp4) or give another file")
        fix = PERMISSION_FIX if sys.platform == "darwin" else OTHER_DEVICE_FIX
        raise CameraError(f"{self.name} opened but gives no picture", fix)

    # -- reading ------------------------------------------------------------------------

    def snapshot(self) -> Image.Image:
        """The newest picture, RGB."""
        if self._cap is None:
            raise RuntimeError(f"{self.name} is closed")
        frame = self._newest_file_frame() if self.is_file else self._newest_live_frame()
        if frame is not None:
            self._frame = frame
        return to_image(self._frame)

    def _newest_live_frame(self) -> np.ndarray:
        """Reads frames until one has to be waited for: that one is live."""
        for n in range(MAX_DRAIN):
            start = self._clock()
            if not self._cap.grab():
                if n == 0:
                    raise CameraError(f"{self.name} stopped giving pictures",
                                      "check that it is still connected; " + OTHER_DEVICE_FIX)
                break
            if self._clock() - start >= LIVE_GRAB_S:
                break
        ok, frame = self._cap.retrieve()
        if not ok or frame is None:
            raise CameraError(f"{self.name} stopped giving pictures",
                              "check that it is still connected; " + OTHER_DEVICE_FIX)
        return frame

    def _newest_file_frame(self) -> np.ndarray | None:
        """The frame of this moment of the clip (the next one if its rate is unknown);
        past the end, the last one."""
        if self._fps > 0:
            want = int((self._clock() - self._opened_at) * self._fps)
        else:
            want = self._position + 1
        if self._frame_count > 0 and want >= self._frame_count:
            self.ended = True
            want = self._frame_count - 1
        if want <= self._position:
            return None
        while self._position < want - 1:  # skip without decoding
            if not self._cap.grab():
                self.ended = True
                return None
            self._position += 1
        ok, frame = self._cap.read()
        if not ok or frame is None:  # shorter than it said
            self.ended = True
            return None
        self._position += 1
        return frame

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> Camera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_image(frame: np.ndarray) -> Image.Image:
    """An OpenCV frame (BGR, or grey) as an RGB PIL image."""
    if frame.ndim == 2:
        return Image.fromarray(frame).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(frame[:, :, 2::-1]), "RGB")


class CameraTicker:
    """When to refresh the picture for --camera-every: `poll()` takes a snapshot once
    `every_s` has passed since the last one (the `c` key's included), else returns None.
    The clock is injected so the schedule is testable without sleeping."""

    def __init__(self, camera: Camera, every_s: float, clock: Clock = time.monotonic):
        if every_s <= 0:
            raise ValueError(f"--camera-every must be positive, got {every_s}")
        self.camera, self.every_s, self._clock = camera, float(every_s), clock
        self._next = clock() + self.every_s

    def seconds_left(self) -> float:
        """Until the next refresh is due (0 when due): how long the UI may wait."""
        return max(0.0, self._next - self._clock())

    def due(self) -> bool:
        return self._clock() >= self._next

    def snapshot(self) -> Image.Image:
        """A picture now (the `c` key); the period restarts from here."""
        image = self.camera.snapshot()
        self._next = self._clock() + self.every_s
        return image

    def poll(self) -> Image.Image | None:
        """A fresh picture if one is due. A late poll does not cause a burst: the next
        refresh is a full period after this one."""
        return self.snapshot() if self.due() else None
