"""The camera image source: a small video written here (solid colours, 10 frames a
second) stands in for a webcam; a scripted backend stands in for OpenCV where the
failure to simulate is the system's (no camera, a refused permission, a busy device, a
queue of stale frames)."""

from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from moshivis_mlx.app import camera as cam
from moshivis_mlx.app.camera import Camera, CameraTicker, captured_stderr, parse_device
from moshivis_mlx.errors import EXIT_CAMERA, CameraError

# RGB colours of the test clip, one per frame.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)]
FPS = 10.0


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """Five frames of solid colours, 64x48, MJPEG in AVI, 10 frames a second."""
    cv2 = pytest.importorskip("cv2")
    path = tmp_path_factory.mktemp("camera") / "colours.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened()
    for r, g, b in COLOURS:
        writer.write(np.full((48, 64, 3), (b, g, r), np.uint8))  # OpenCV is BGR
    writer.release()
    return path


def colour_of(image) -> int:
    """Which of COLOURS an image is (MJPEG shifts values by a few units)."""
    assert image.mode == "RGB" and image.size == (64, 48)
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
    distances = [np.abs(mean - np.array(c)).max() for c in COLOURS]
    assert min(distances) < 16, mean
    return int(np.argmin(distances))


# -- a video file as the camera -----------------------------------------------------------

def test_snapshot_is_the_current_frame(clip):
    clock = FakeClock()
    with Camera(str(clip), clock=clock) as camera:
        assert camera.is_file and not camera.ended
        assert colour_of(camera.snapshot()) == 0
        assert colour_of(camera.snapshot()) == 0  # same moment, same frame
        clock.now = 0.1
        assert colour_of(camera.snapshot()) == 1


def test_successive_snapshots_advance_skipping_what_was_missed(clip):
    clock = FakeClock()
    with Camera(str(clip), clock=clock) as camera:
        seen = []
        for t in (0.0, 0.12, 0.35, 0.41):
            clock.now = t
            seen.append(colour_of(camera.snapshot()))
        assert seen == [0, 1, 3, 4]


def test_a_video_that_ends_keeps_its_last_frame(clip):
    clock = FakeClock()
    with Camera(str(clip), clock=clock) as camera:
        clock.now = 30.0
        assert colour_of(camera.snapshot()) == len(COLOURS) - 1
        assert camera.ended
        clock.now = 60.0
        assert colour_of(camera.snapshot()) == len(COLOURS) - 1


def test_close_and_context_manager(clip):
    with Camera(clip) as camera:  # a Path works too
        pass
    with pytest.raises(RuntimeError, match="closed"):
        camera.snapshot()
    camera.close()  # twice is fine


def test_a_clip_of_unknown_rate_advances_a_frame_per_snapshot(tmp_path):
    clip = tmp_path / "stream.ts"
    clip.write_bytes(b"")  # only its existence matters to the scripted backend
    with Camera(clip, backend=FakeCV2(stale=[1, 2, 3], finite=True)) as camera:
        assert [value_of(camera.snapshot()) for _ in range(5)] == [2, 3, 3, 3, 3]
        assert camera.ended


# -- files that cannot be used --------------------------------------------------------------

def one_line_camera_error(excinfo) -> str:
    e = excinfo.value
    assert isinstance(e, CameraError) and e.exit_code == EXIT_CAMERA
    assert "\n" not in str(e)
    return str(e)


def test_missing_file(tmp_path):
    pytest.importorskip("cv2")
    with pytest.raises(CameraError) as e:
        Camera(str(tmp_path / "nope.mp4"))
    assert "video file not found" in one_line_camera_error(e)


def test_file_that_is_not_a_video(tmp_path):
    pytest.importorskip("cv2")
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 20)
    with pytest.raises(CameraError) as e:
        Camera(str(bad))
    assert "not a video" in one_line_camera_error(e)
    with pytest.raises(CameraError) as e:
        Camera(str(tmp_path))
    assert "folder" in one_line_camera_error(e)


# -- cameras, through a scripted backend ----------------------------------------------------

class FakeCapture:
    """A camera as OpenCV shows it: `stderr` is what its native code prints on opening;
    `stale` frames wait in its queue (read at once); after them every grab waits
    `period` seconds for a live frame, numbered from 100."""

    def __init__(self, opened=True, stderr="", stale=(), clock=None, period=1 / 30,
                 readable=True, finite=False):
        if stderr:
            os.write(2, stderr.encode())
        self.opened, self.readable, self.finite = opened, readable, finite
        self.queue = list(stale)
        self.clock, self.period = clock, period
        self.live = 100
        self.current = None
        self.released = False
        self.props = {}

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def get(self, prop):
        return 0.0

    def grab(self):
        if not self.readable:
            return False
        if self.queue:
            self.current = self.queue.pop(0)
        elif self.finite:  # a file that has ended
            return False
        else:
            if self.clock is not None:
                self.clock.now += self.period
            self.current, self.live = self.live, self.live + 1
        return True

    def retrieve(self):
        if self.current is None:
            return False, None
        return True, np.full((48, 64, 3), self.current, np.uint8)

    def read(self):
        return self.retrieve() if self.grab() else (False, None)

    def release(self):
        self.released = True


class FakeCV2:
    CAP_PROP_FPS = 5
    CAP_PROP_FRAME_COUNT = 7
    CAP_PROP_BUFFERSIZE = 38

    def __init__(self, **capture):
        self.capture = capture
        self.opened: list[FakeCapture] = []

    def VideoCapture(self, device):
        c = FakeCapture(**self.capture)
        self.opened.append(c)
        return c


def value_of(image) -> int:
    return int(np.asarray(image)[0, 0, 0])


def test_live_camera_snapshot_drains_stale_frames():
    clock = FakeClock()
    backend = FakeCV2(stale=[1, 2, 3, 4], clock=clock)
    camera = Camera(0, backend=backend, clock=clock)  # opening reads stale frame 1
    assert not camera.is_file and camera.name == "camera 0"
    assert backend.opened[0].props[FakeCV2.CAP_PROP_BUFFERSIZE] == 1
    assert value_of(camera.snapshot()) == 100  # 2, 3, 4 were discarded
    assert value_of(camera.snapshot()) == 101  # then each snapshot is a new live frame
    camera.close()
    assert backend.opened[0].released


def test_camera_that_starts_slowly_is_waited_for(monkeypatch):
    monkeypatch.setattr(cam, "FIRST_FRAME_WAIT_S", 0.0)

    class SlowStart(FakeCapture):
        failures = 3

        def read(self):
            if SlowStart.failures:
                SlowStart.failures -= 1
                return False, None
            return super().read()

    clock = FakeClock()
    backend = FakeCV2()
    backend.VideoCapture = lambda device: SlowStart(clock=clock)
    camera = Camera(0, backend=backend, clock=clock)  # reads live frame 100 at the 4th try
    assert value_of(camera.snapshot()) == 101


def test_camera_that_stops_giving_pictures():
    backend = FakeCV2()
    camera = Camera(0, backend=backend)
    backend.opened[0].readable = False  # unplugged
    with pytest.raises(CameraError) as e:
        camera.snapshot()
    assert "stopped giving pictures" in one_line_camera_error(e)


def test_permission_refused_on_macos(monkeypatch):
    """What OpenCV's AVFoundation backend prints when the terminal may not use the
    camera; the capture is then closed."""
    monkeypatch.setattr(sys, "platform", "darwin")
    backend = FakeCV2(opened=False, stderr=(
        "OpenCV: not authorized to capture video (status 0), requesting...\n"
        "OpenCV: camera failed to properly initialize!\n"))
    with pytest.raises(CameraError) as e:
        Camera(0, backend=backend)
    line = one_line_camera_error(e)
    assert "not allowed" in line
    assert "System Settings > Privacy & Security > Camera" in line
    assert backend.opened[0].released


def test_permission_denied_earlier_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    backend = FakeCV2(opened=False, stderr="OpenCV: camera access has been denied. Either "
                      "run 'tccutil reset Camera' command in same terminal ...\n")
    with pytest.raises(CameraError) as e:
        Camera(None, backend=backend)
    assert "Privacy & Security > Camera" in one_line_camera_error(e)


def test_no_camera_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    backend = FakeCV2(opened=False, stderr="OpenCV: out device of bound (0--1): 0\n")
    with pytest.raises(CameraError) as e:
        Camera(0, backend=backend)
    assert "no camera found" in one_line_camera_error(e)


def test_no_camera_on_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cam, "camera_devices", lambda: [])
    with pytest.raises(CameraError) as e:
        Camera(2, backend=FakeCV2(opened=False))
    assert "no camera found" in one_line_camera_error(e)
    monkeypatch.setattr(cam, "camera_devices", lambda: ["/dev/video0"])
    with pytest.raises(CameraError) as e:
        Camera("2", backend=FakeCV2(opened=False))
    assert "no camera number 2" in one_line_camera_error(e)


def test_camera_that_cannot_be_opened(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cam, "camera_devices", lambda: ["/dev/video0"])
    with pytest.raises(CameraError) as e:
        Camera(0, backend=FakeCV2(opened=False))
    line = one_line_camera_error(e)
    assert "camera 0 cannot be opened" in line and "--camera N" in line


def test_camera_that_opens_but_gives_no_picture(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(cam, "FIRST_FRAME_WAIT_S", 0.0)
    backend = FakeCV2(readable=False)
    with pytest.raises(CameraError) as e:
        Camera(0, backend=backend)
    line = one_line_camera_error(e)
    assert "gives no picture" in line and "Privacy & Security" in line
    assert backend.opened[0].released


def test_missing_extra(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2" or name.startswith("cv2."):
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cv2", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(CameraError) as e:
        Camera(0)
    assert "pip install 'moshivis-mlx[camera]'" in one_line_camera_error(e)


# -- the periodic refresh -----------------------------------------------------------------

def test_ticker_refreshes_at_the_right_times():
    clock = FakeClock(100.0)
    camera = Camera(0, backend=FakeCV2(clock=None), clock=clock)
    ticker = CameraTicker(camera, every_s=5, clock=clock)
    fired = []
    for t in np.arange(100.0, 120.25, 0.5):
        clock.now = float(t)
        if ticker.poll() is not None:
            fired.append(float(t))
    assert fired == [105.0, 110.0, 115.0, 120.0]
    assert ticker.seconds_left() == pytest.approx(5.0)


def test_ticker_key_snapshot_restarts_the_period_and_late_polls_do_not_burst():
    clock = FakeClock()
    camera = Camera(0, backend=FakeCV2(), clock=clock)
    ticker = CameraTicker(camera, every_s=10, clock=clock)
    clock.now = 7.0
    assert ticker.snapshot() is not None  # the `c` key
    clock.now = 10.0
    assert ticker.poll() is None and ticker.seconds_left() == pytest.approx(7.0)
    clock.now = 17.0
    assert ticker.due() and ticker.poll() is not None
    clock.now = 60.0  # the UI was busy for a long while: one refresh, not four
    assert ticker.poll() is not None
    clock.now = 60.5
    assert ticker.poll() is None


def test_ticker_needs_a_positive_period():
    with pytest.raises(ValueError, match="positive"):
        CameraTicker(Camera(0, backend=FakeCV2()), every_s=0)


# -- small pieces ---------------------------------------------------------------------------

def test_parse_device():
    assert parse_device(None) == 0 and parse_device("") == 0 and parse_device(" 1 ") == 1
    assert parse_device(3) == 3
    assert parse_device("/dev/video2") == "/dev/video2"
    assert parse_device("clip.mp4") == "clip.mp4"


def test_device_path_is_a_camera_not_a_file():
    camera = Camera("/dev/null", backend=FakeCV2())  # a character device
    assert not camera.is_file and camera.name == "camera /dev/null"


def test_native_stderr_is_captured():
    with captured_stderr() as messages:
        os.write(2, b"OpenCV: hello from C\n")
    assert messages() == "OpenCV: hello from C\n"


def test_grey_frames_become_rgb():
    image = cam.to_image(np.full((4, 6), 7, np.uint8))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (7, 7, 7)
    image = cam.to_image(np.zeros((4, 6, 3), np.uint8) + np.array([1, 2, 3], np.uint8))
    assert image.getpixel((0, 0)) == (3, 2, 1)  # BGR -> RGB
