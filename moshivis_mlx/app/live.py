"""Live mode: microphone -> model -> speaker, with the terminal UI.

Threads:
  PortAudio's callbacks  copy 80 ms blocks in and out (audio.py), never wait
  the model thread       frames -> Stream.step -> speaker FIFO + recording + events
  the main thread        loads, then draws the UI, reads keys, and on exit saves

The session is saved whatever ends it: `q`, Ctrl-C, SIGTERM, a device that vanishes or
any error in the model thread (which is then reported after saving).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live

from ..errors import MoshivisError
from ..progress import Steps
from ..stream import FRAME_SIZE, Stream
from .audio import AudioIO
from .opening import image_encoder, load_picture, open_stream, opening_steps
from .options import AppOptions
from .recorder import SessionRecorder, default_session_dir
from .ui import KeyReader, PlainUI, TerminalUI
from .worker import FatalEvent, ModelWorker, ReadyEvent

WARMUP_STEPS = 4
FPS = 12


def _terminate_as_interrupt(signum, frame):  # SIGTERM / SIGHUP end the session like Ctrl-C
    raise KeyboardInterrupt


def warm_up(stream: Stream, steps: int = WARMUP_STEPS, image_tokens: int | None = None) -> None:
    """A few steps on silence so the first real frame does not pay for compilation and
    allocation, the step with an image included (it first runs at `xa_start`, and an image
    may come later with `i`); then a fresh conversation."""
    silence = np.zeros(FRAME_SIZE, dtype=np.float32)
    for _ in range(steps):
        stream.step(silence)
    stream.gen.warm_up(image_tokens=image_tokens)
    stream.reset()
    stream.frames = 0


def _prepare(opts: AppOptions, steps: Steps, picture: Any, info: dict[str, Any]):
    """Loading and warm-up; runs on the model thread (see worker.py)."""
    opened = open_stream(opts.model, steps, not opts.no_image, opts.image, picture)
    info["bundle"] = opened.bundle
    vision = opened.vision
    with steps.step("warm-up"):
        warm_up(opened.stream, image_tokens=vision.config.num_tokens if vision else None)
    return opened.stream, (image_encoder(vision) if vision is not None else None)


def _wait_ready(worker: ModelWorker) -> None:
    """Blocks until the model thread is ready; raises what made it fail."""
    while True:
        try:
            ev = worker.events.get(timeout=0.1)
        except queue.Empty:
            if not worker.running:
                raise MoshivisError("the model thread stopped while loading") from None
            continue
        if isinstance(ev, ReadyEvent):
            return
        if isinstance(ev, FatalEvent):
            raise ev.error


def run_live(opts: AppOptions, console: Console) -> int:
    interactive = console.is_terminal and sys.stdin.isatty()
    want_vision = not opts.no_image
    picture = load_picture(opts.image) if opts.image else None
    with Steps(console, 2 + opening_steps(want_vision, picture is not None)) as steps:
        # The devices first: a missing microphone (or macOS asking for permission) should
        # not wait until a 7B model has loaded.
        with steps.step("audio devices"):
            audio = AudioIO(opts.input_device, opts.output_device)
            audio.open()
        info: dict[str, Any] = {}
        worker = ModelWorker(lambda: _prepare(opts, steps, picture, info), audio)
        try:
            worker.start()
            _wait_ready(worker)
        except BaseException:
            worker.stop(timeout=0.5)  # a failed or interrupted load: do not wait for it
            audio.close()
            raise
    stream = worker.stream

    recorder = None
    if opts.record:
        record_dir = opts.record_dir or default_session_dir()
        try:
            recorder = SessionRecorder(record_dir, {
                "bundle": str(info["bundle"]),
                "image": opts.image,
                "devices": audio.description,
                "sampling": {"text": repr(stream.gen.text_sampler),
                             "audio": repr(stream.gen.audio_sampler),
                             "xa_start": stream.gen.xa_start},
            })
        except OSError as e:
            worker.stop()
            audio.close()
            raise MoshivisError(f"cannot record the session in {record_dir} ({e.strerror or e})",
                           "pick another directory with --record DIR, or use --no-record"
                           ) from None
        if opts.image:
            recorder.add_event("image", path=opts.image)

    fatal: BaseException | None = None
    old_handlers = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old_handlers[sig] = signal.signal(sig, _terminate_as_interrupt)
    ui: Any = None
    try:
        audio.start()
        worker.begin(recorder)
        if interactive:
            ui = TerminalUI(os.path.basename(opts.image) if opts.image else None, picture,
                            str(recorder.dir) if recorder else None, audio.description,
                            image_enabled=want_vision)
            fatal = _terminal_loop(ui, worker, console, opts.debug)
        else:
            ui = PlainUI()
            ui.print(f"listening ({audio.description}); Ctrl-C to stop")
            fatal = _plain_loop(ui, worker)
    except KeyboardInterrupt:
        pass
    except MoshivisError as e:
        fatal = e
    finally:
        worker.stop()
        audio.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if isinstance(ui, PlainUI):
            ui.close()
        summary = {"dropped_frames": audio.dropped, "underruns": audio.underruns,
                   "input_overflows": audio.input_overflows,
                   "output_dropped": audio.fifo.dropped}
        if ui is not None:
            summary["latency"] = ui.stats.summary()
        if recorder is not None:
            if fatal is not None:
                recorder.add_event("error", message=str(fatal))
            saved = recorder.close(summary)
            console.print(f"session saved to {saved}/ ({recorder.seconds:.1f} s: "
                          f"conversation.wav, transcript.json, latency.csv)", highlight=False)
        if ui is not None:
            console.print(ui.stats.summary(), highlight=False)
    if fatal is not None:
        raise fatal
    return 0


def _drain(worker: ModelWorker, ui: Any, limit: int = 500) -> BaseException | None:
    for _ in range(limit):
        try:
            ev = worker.events.get_nowait()
        except queue.Empty:
            return None
        if isinstance(ev, FatalEvent):
            return ev.error
        ui.handle(ev)
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


def _terminal_loop(ui: TerminalUI, worker: ModelWorker, console: Console,
                   debug: bool = False) -> BaseException | None:
    with _quiet_stderr(not debug), KeyReader() as keys, Live(
            ui.render(), console=console, screen=True, auto_refresh=False,
            redirect_stderr=False) as live:
        while True:
            failure = _worker_failure(worker, ui)
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
                    worker.muted = ui.muted = not ui.muted
                elif action[0] == "image":
                    ui.say(f"loading {action[1]} ...")
                    worker.load_image(action[1])
            live.update(ui.render(), refresh=True)


def _plain_loop(ui: PlainUI, worker: ModelWorker) -> BaseException | None:
    while True:
        failure = _worker_failure(worker, ui)
        if failure is not None:
            return failure
        time.sleep(0.05)


def _worker_failure(worker: ModelWorker, ui: TerminalUI | PlainUI) -> BaseException | None:
    """Shows the worker's news; what ends the session, if anything."""
    fatal = _drain(worker, ui)
    if fatal is not None:
        return fatal
    if not worker.running:
        return MoshivisError("the model thread stopped unexpectedly")
    return None

