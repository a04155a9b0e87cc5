"""Live mode: microphone -> model -> speaker, with the terminal UI.

    PortAudio's input callback    copies each 80 ms block onto a bounded queue (audio.py)
    the model thread              frame -> echo canceller -> Session.feed: Mimi encode ->
                                  LM step -> Mimi decode (worker.py), then the events: the
                                  model's frame to the echo canceller's reference and the
                                  speaker FIFO, everything to the recording, the rest to
                                  the display queue (`_sink` below)
    PortAudio's output callback   plays what the FIFO holds (audio.py)
    the main thread               opens, starts, checks and closes the devices (and the
                                  camera: its snapshots become commands); draws the
                                  display, turns keys into commands; on exit, saves

The session is saved whatever ends it: `q`, Ctrl-C, SIGTERM, SIGHUP (errors.guard makes
them unwind like Ctrl-C), a device that vanishes or any error in the model thread (which
is then reported after saving); a second Ctrl-C while saving waits for the save.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from ..errors import AudioDeviceError, CameraError, MoshivisError
from ..progress import Steps
from ..session import AudioFrame, Event, load_picture
from ..signals import shielded
from ..stream import RELEASED
from .audio import AudioIO
from .camera import Camera, CameraTicker
from .camera import parse_device as parse_camera
from .echo import echo_canceller
from .opening import Opened, open_session, opening_steps, resolve_bundle
from .options import AppOptions
from .preflight import check_live
from .recorder import DEFAULT_ROOT, SessionRecorder, default_session_dir
from .ui import KeyReader, PlainUI, TerminalUI, print_line
from .worker import EventSink, ModelWorker

FPS = 12
MAX_EVENTS = 2000
"""Events waiting for the display beyond which new ones are dropped (the recording has
them all)."""


def _prepare(opts: AppOptions, steps: Steps, want_vision: bool, image_name: str | None,
             picture: Any, bundle: Path) -> Opened:
    """Loading and warm-up; runs on the model thread (see worker.py)."""
    opened = open_session(opts.model, steps, want_vision, image_name, picture, bundle)
    with steps.step("warm-up"):
        opened.session.warm_up()
    return opened


def _sink(audio: AudioIO, recorder: SessionRecorder | None,
          display: queue.Queue[Event]) -> EventSink:
    """Where the session's events go; called on the model thread after each step and
    command. The speaker first: it is the one waiting."""

    def sink(events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, AudioFrame):
                audio.write_frame(ev.pcm)
            if recorder is not None:
                recorder.add(ev, backlog=audio.backlog)
            if not isinstance(ev, AudioFrame):
                try:
                    display.put_nowait(ev)
                except queue.Full:  # the display is behind; the recording has everything
                    pass

    return sink


def _recorder(opts: AppOptions, opened: Opened, audio: AudioIO,
              image_name: str | None) -> SessionRecorder:
    session = opened.session
    gen = session.stream.gen
    record_dir = opts.record_dir
    try:
        record_dir = record_dir or default_session_dir(create=True)
        recorder = SessionRecorder(record_dir, session.geometry, {
            "bundle": str(opened.bundle),
            "image": image_name,
            "devices": audio.description,
            "sampling": {"text": repr(gen.text_sampler), "audio": repr(gen.audio_sampler),
                         "xa_start": gen.xa_start},
            "codec_device": opts.model.codec_device, "kv_bits": opts.model.kv_bits,
        })
    except OSError as e:
        where = record_dir or DEFAULT_ROOT
        raise MoshivisError(f"cannot record the session in {where} ({e.strerror or e})",
                            "pick another directory with --record DIR, or use --no-record"
                            ) from None
    if image_name:
        recorder.add_event("image", path=image_name)
    return recorder


CAMERA_NAME = "camera"


def _open_camera(opts: AppOptions) -> tuple[Camera | None, CameraTicker | None, Any]:
    """The camera (with --camera), its periodic refresh, and its first snapshot."""
    if opts.camera is None:
        return None, None, None
    camera = Camera(parse_camera(opts.camera or None))
    try:
        picture = camera.snapshot()
        ticker = CameraTicker(camera, opts.camera_every) if opts.camera_every else None
    except BaseException:
        camera.close()
        raise
    return camera, ticker, picture


def run_live(opts: AppOptions, console: Console) -> int:
    interactive = console.is_terminal and sys.stdin.isatty()
    want_vision = not opts.no_image
    check_live(opts)  # the recording's directory, before anything loads
    picture = load_picture(opts.image) if opts.image else None
    image_name = opts.image
    n_steps = 2 + (opts.camera is not None)
    first_image = picture is not None or opts.camera is not None
    # What is open is closed once, in reverse order, however the run ends: the model
    # thread stops before the audio devices and the camera close.
    opened_things = ExitStack()
    stop_timeout = [0.5]  # a failed or interrupted load: do not wait for it
    try:
        with Steps(console, n_steps + opening_steps(want_vision, first_image)) as steps:
            # The devices first: a missing microphone or camera (or macOS asking for
            # permission) should not wait until a 7B model has loaded.
            with steps.step("audio devices"):
                echo = echo_canceller(opts.echo_cancel, RELEASED.sample_rate,
                                      RELEASED.frame_size)
                audio = AudioIO(opts.input_device, opts.output_device, echo=echo)
                audio.open()
                opened_things.callback(audio.close)
            camera = ticker = None
            if opts.camera is not None:
                with steps.step("camera"):
                    camera, ticker, picture = _open_camera(opts)
                    opened_things.callback(camera.close)
                image_name = CAMERA_NAME
            # A download and conversion run here, where a signal can clean them up.
            bundle = resolve_bundle(opts.model, steps)
            worker = ModelWorker(lambda: _prepare(opts, steps, want_vision, image_name,
                                                  picture, bundle), audio.read_frame)
            worker.start()
            opened_things.callback(lambda: worker.stop(timeout=stop_timeout[0]))
            opened = worker.wait_ready()
        stop_timeout[0] = 10.0
        session = opened.session
        model, devices = session.geometry, audio.geometry
        if model != devices:  # the devices were opened for the released Mimi
            raise MoshivisError(f"the model's codec takes {model.frame_size}-sample frames at "
                                f"{model.sample_rate} Hz, not {devices.frame_size} at "
                                f"{devices.sample_rate} Hz: live mode cannot use it",
                                "use file mode (--input-wav)")
        recorder = _recorder(opts, opened, audio, image_name) if opts.record else None
    except BaseException:
        with shielded():
            opened_things.close()
        raise
    display: queue.Queue[Event] = queue.Queue(maxsize=MAX_EVENTS)
    snapshots = _Snapshots(worker, camera, ticker)

    fatal: BaseException | None = None
    ui: Any = None
    try:
        audio.start()
        worker.begin(_sink(audio, recorder, display))
        if interactive:
            ui = TerminalUI(os.path.basename(image_name) if image_name else None, picture,
                            str(recorder.dir) if recorder else None, audio.description,
                            image_enabled=want_vision, geometry=session.geometry,
                            camera=camera is not None)
            fatal = _terminal_loop(ui, worker, audio, display, console, snapshots, opts.debug)
        else:
            ui = PlainUI(geometry=session.geometry)
            opened_things.callback(ui.close)
            ui.print(f"listening ({audio.description}); Ctrl-C to stop")
            fatal = _plain_loop(ui, worker, audio, display, snapshots)
    except KeyboardInterrupt:
        pass
    except MoshivisError as e:
        fatal = e
    finally:
        with shielded():  # a second Ctrl-C waits: the session is saved first
            opened_things.close()
            summary = {"dropped_frames": audio.dropped, "underruns": audio.underruns,
                       "input_overflows": audio.input_overflows,
                       "output_dropped": audio.fifo.dropped,
                       "echo_cancel": _echo_summary(audio.echo.stats)}
            if ui is not None:
                ui.stats.counters(audio.dropped, audio.underruns)
                summary["latency"] = ui.stats.numbers()
            if recorder is not None:
                try:
                    if fatal is not None:
                        recorder.add_event("error", message=str(fatal))
                except MoshivisError:
                    pass  # the disk is full: the error is said on the terminal
                try:
                    saved = recorder.close(summary)
                except MoshivisError as e:
                    fatal = fatal or e
                    print_line(console, recorder.partly_saved())
                else:
                    print_line(console, f"session saved to {saved}/ ({recorder.seconds:.1f} "
                                        f"s: conversation.wav, transcript.json, latency.csv)")
            if ui is not None:
                print_line(console, ui.stats.summary())
    if fatal is not None:
        raise fatal
    return 0


def _echo_summary(stats: Any) -> dict[str, Any]:
    return {"enabled": stats.enabled, "erle_db": None if stats.erle_db is None
            else round(stats.erle_db, 1), "delay_ms": round(stats.delay_ms, 1)}


class _Snapshots:
    """Camera snapshots (the `c` key, and every --camera-every seconds) handed to the
    model thread as the new image; the conversation goes on."""

    def __init__(self, worker: ModelWorker, camera: Camera | None,
                 ticker: CameraTicker | None):
        self.worker, self.camera, self.ticker = worker, camera, ticker
        self.count = 0

    def _send(self, picture: Any) -> None:
        self.count += 1
        self.worker.show_picture(f"{CAMERA_NAME} #{self.count}", picture)

    def poll(self) -> None:
        picture = self.ticker.poll() if self.ticker is not None else None
        if picture is not None:
            self._send(picture)

    def take(self) -> None:
        if self.camera is not None:
            self._send(self.ticker.snapshot() if self.ticker else self.camera.snapshot())


def _update(ui: TerminalUI | PlainUI, worker: ModelWorker, audio: AudioIO,
            display: queue.Queue[Event], snapshots: _Snapshots,
            limit: int = 500) -> BaseException | None:
    """Shows the session's news and the audio counters, takes the camera's periodic
    snapshot; returns what ends the session, if anything: a device (or the camera) that
    failed, or the model thread's error."""
    for _ in range(limit):
        try:
            ui.handle(display.get_nowait())
        except queue.Empty:
            break
    ui.stats.counters(audio.dropped, audio.underruns, audio.backlog)
    ui.stats.echo = audio.echo.stats
    try:
        audio.check()
        snapshots.poll()
    except (AudioDeviceError, CameraError) as e:
        return e
    if not worker.running:
        return worker.error or MoshivisError("the model thread stopped unexpectedly")
    return None


@contextmanager
def _quiet_stderr(enabled: bool) -> Iterator[None]:
    """Silences file descriptor 2 while the full-screen UI is up: C libraries (ALSA) print
    warnings straight to it, which would scribble over the screen."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _terminal_loop(ui: TerminalUI, worker: ModelWorker, audio: AudioIO,
                   display: queue.Queue[Event], console: Console, snapshots: _Snapshots,
                   debug: bool = False) -> BaseException | None:
    with _quiet_stderr(not debug), KeyReader() as keys, Live(
            ui.render(), console=console, screen=True, auto_refresh=False,
            redirect_stderr=False) as live:
        while True:
            failure = _update(ui, worker, audio, display, snapshots)
            if failure is not None:
                return failure
            for k in keys.read(1.0 / FPS):
                action = ui.key(k)
                if action is None:
                    continue
                if action[0] == "quit":
                    return None
                if action[0] == "restart":
                    worker.restart()
                elif action[0] == "mute":
                    ui.muted = not ui.muted
                    worker.mute(ui.muted)
                elif action[0] == "image":
                    ui.say(f"loading {action[1]} ...")
                    worker.load_image(action[1])
                elif action[0] == "camera":
                    ui.say("camera snapshot ...")
                    try:
                        snapshots.take()
                    except CameraError as e:
                        return e
            live.update(ui.render(), refresh=True)


def _plain_loop(ui: PlainUI, worker: ModelWorker, audio: AudioIO,
                display: queue.Queue[Event], snapshots: _Snapshots) -> BaseException | None:
    while True:
        failure = _update(ui, worker, audio, display, snapshots)
        if failure is not None:
            return failure
        time.sleep(0.05)
