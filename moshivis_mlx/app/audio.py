"""Microphone and speaker (sounddevice / PortAudio), as 24 kHz mono frames.

The audio callbacks run on PortAudio's real-time thread. They only copy: the input
callback puts the block on a bounded queue (or counts it as dropped when the model
thread is behind), the output callback takes what is ready from a FIFO (or plays
silence and counts an underrun). Resampling and assembling frames happen on the side of
whoever reads and writes the frames (live mode: the model thread), in `read_frame` and
`write_frame`. Opening, starting, checking and closing the devices are the main thread's.

Devices that cannot run at 24 kHz mono are opened at their own rate and channel count;
the conversion is done here, so the rest of the app only ever sees frames of the model's
geometry (1920 samples at 24 kHz: `stream.RELEASED`, the devices open before a model is
loaded).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from ..errors import AudioDeviceError, one_line
from ..resample import Resampler
from ..stream import RELEASED, FrameGeometry
from .echo import NoEchoCanceller

MAX_INPUT_BACKLOG = 3
"""Frames waiting for the model beyond which the oldest are dropped (240 ms of latency)."""
MAX_OUTPUT_BACKLOG = 4
"""Frames waiting for the speaker beyond which the oldest are dropped."""
OUTPUT_PREBUFFER = 1
"""Frames of silence queued ahead of the model's first frame: slack for scheduling jitter
(80 ms of latency that saves a click every time a step finishes late)."""
STALL_SECONDS = 2.0
"""No microphone block for this long while running: the device has gone."""

PERMISSION_FIX = ("allow microphone access for your terminal app in System Settings > "
                  "Privacy & Security > Microphone, then restart the terminal")
DEVICES_FIX = "see --list-devices and pick one with --input-device / --output-device"


def load_backend() -> Any:
    """The sounddevice module (PortAudio); a clear error if PortAudio is missing."""
    try:
        import sounddevice
    except OSError as e:  # Linux wheels do not bundle PortAudio
        raise AudioDeviceError(
            f"cannot load the PortAudio audio library ({e})",
            "install it (Debian/Ubuntu: sudo apt install libportaudio2; macOS: pip install "
            "--force-reinstall sounddevice)") from None
    return sounddevice


def list_devices(backend: Any | None = None) -> str:
    """The text of --list-devices."""
    sd = backend or load_backend()
    try:
        devices = sd.query_devices()
        default_in, default_out = sd.default.device
    except Exception as e:  # PortAudio errors have their own type per backend
        raise device_error(e, "input", None) from None
    lines = ["audio devices (use the number or part of the name):"]
    for i, d in enumerate(devices):
        marks = []
        if i == default_in:
            marks.append("default input")
        if i == default_out:
            marks.append("default output")
        kinds = []
        if d["max_input_channels"] > 0:
            kinds.append(f"{d['max_input_channels']} in")
        if d["max_output_channels"] > 0:
            kinds.append(f"{d['max_output_channels']} out")
        extra = f"  <- {', '.join(marks)}" if marks else ""
        lines.append(f"  {i:3d}  {d['name']}  ({', '.join(kinds) or 'no channels'}, "
                     f"{d['default_samplerate']:.0f} Hz){extra}")
    if len(lines) == 1:
        raise AudioDeviceError("no audio devices found",
                               "connect a microphone and speakers; on Linux, check that the "
                               "sound server (PulseAudio or PipeWire) is running")
    return "\n".join(lines)


def device_error(e: BaseException, kind: str, device: int | str | None) -> AudioDeviceError:
    """A PortAudio / sounddevice failure -> what it means for the user, in one line."""
    text = one_line(e)
    low = text.lower()
    what = "microphone" if kind == "input" else "speaker"
    flag = f"--{kind}-device"
    named = f" {device!r}" if device is not None else ""
    if ("-66748" in text or "notpermitted" in low or "permission" in low
            or "not permitted" in low or "not authorized" in low):
        return AudioDeviceError(f"microphone access was denied ({text})", PERMISSION_FIX)
    if "no " in low and "device matching" in low:
        return AudioDeviceError(f"no {kind} device matching {device!r}", DEVICES_FIX)
    if "device unavailable" in low or "-9985" in text or "busy" in low:
        return AudioDeviceError(
            f"the {what}{named} is busy or unavailable ({text})",
            f"close the program using it, or pick another one with {flag} (see --list-devices)")
    if ("querying device -1" in low or "no default" in low or "invalid device" in low
            or "-9996" in text or "invalid number of channels" in low or "-9998" in text
            or "not an input device" in low or "not an output device" in low):
        if kind == "input":
            return AudioDeviceError("no microphone found",
                                    f"connect a microphone or pick one with {flag} "
                                    f"(see --list-devices)")
        return AudioDeviceError("no audio output device found",
                                f"connect speakers or headphones or pick a device with {flag} "
                                f"(see --list-devices)")
    if sys.platform == "darwin" and kind == "input" and "internal portaudio error" in low:
        # What macOS reports when the terminal has no microphone permission.
        return AudioDeviceError(f"cannot open the microphone ({text})", PERMISSION_FIX)
    return AudioDeviceError(f"cannot open the {what}{named} ({text})", DEVICES_FIX)


class OutputFifo:
    """Model frames waiting for the speaker. The model thread appends, the audio callback
    reads; `deque.append` / `popleft` are atomic, so neither side takes a lock."""

    def __init__(self, max_frames: int):
        self.chunks: deque[np.ndarray] = deque()
        self.max_frames = max_frames
        self.current: np.ndarray | None = None
        self.pos = 0
        self.dropped = 0

    def push(self, samples: np.ndarray) -> None:
        self.chunks.append(samples)
        while len(self.chunks) > self.max_frames:
            try:
                self.chunks.popleft()
                self.dropped += 1
            except IndexError:
                break

    def read_into(self, out: np.ndarray) -> int:
        """Fills `out` (1-D) with what is ready; returns how many samples were filled."""
        n, filled = len(out), 0
        while filled < n:
            if self.current is None or self.pos >= len(self.current):
                try:
                    self.current = self.chunks.popleft()
                except IndexError:
                    self.current = None
                    break
                self.pos = 0
            take = min(n - filled, len(self.current) - self.pos)
            out[filled:filled + take] = self.current[self.pos:self.pos + take]
            self.pos += take
            filled += take
        return filled


class AudioIO:
    """Opens the microphone and the speaker and moves 24 kHz frames through them.

    audio = AudioIO(input_device, output_device); audio.open(); audio.start()
    frame = audio.read_frame(timeout)   # the reader: 1920 samples, or None
    audio.write_frame(pcm)              # the writer: 1920 samples of the model's voice
    audio.check()                       # the main thread: raises if a device failed

    `echo` (an `EchoCanceller`) sits here, between the devices and the conversation:
    every frame written for the speaker is its reference, every microphone frame read
    goes through it, and its delay is the devices' reported latency plus the output
    prebuffer. Reader and writer are the same thread (the model's), as it requires.
    """

    def __init__(self, input_device: int | str | None = None,
                 output_device: int | str | None = None, backend: Any | None = None,
                 max_input_backlog: int = MAX_INPUT_BACKLOG,
                 max_output_backlog: int = MAX_OUTPUT_BACKLOG,
                 geometry: FrameGeometry = RELEASED, echo: Any | None = None):
        self.sd = backend or load_backend()
        self.geometry = geometry
        self.echo = echo if echo is not None else NoEchoCanceller(
            geometry.sample_rate, geometry.frame_size)
        self.input_device = input_device
        self.output_device = output_device
        self.max_input_backlog = max_input_backlog
        # Input blocks are 80 ms at any rate, so one block is one frame.
        self._in_q: queue.Queue[np.ndarray] = queue.Queue(maxsize=max_input_backlog + 2)
        self.fifo = OutputFifo(max_output_backlog)
        self.dropped_input = 0  # callback found the queue full
        self.dropped_backlog = 0  # the model thread skipped stale frames
        self.underruns = 0
        self.input_overflows = 0
        self.input_blocks = 0
        self.input_stream = None
        self.output_stream = None
        self._playing = False
        self._primed = False
        self._started_at: float | None = None
        self._last_input = 0.0
        self._callback_error: BaseException | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()  # guards open/close only, never taken by callbacks

    # -- the main thread: open, start, close -----------------------------------------------

    def _settings(self, kind: str) -> tuple[int, int]:
        """(sample rate, channels) for a device: 24 kHz mono if it can, else its own."""
        sd, device = self.sd, getattr(self, f"{kind}_device")
        check = sd.check_input_settings if kind == "input" else sd.check_output_settings
        rate = self.geometry.sample_rate
        try:
            check(device=device, samplerate=rate, channels=1, dtype="float32")
            return rate, 1
        except Exception:
            pass
        try:
            info = sd.query_devices(device, kind)
        except Exception as e:
            raise device_error(e, kind, device) from None
        rate = round(info["default_samplerate"])
        most = int(info[f"max_{kind}_channels"])
        if most < 1:
            raise device_error(ValueError(f"not an {kind} device"), kind, device)
        for channels in (1, min(2, most), most):
            try:
                check(device=device, samplerate=rate, channels=channels, dtype="float32")
                return rate, channels
            except Exception as e:
                last = e
        raise device_error(last, kind, device)

    def open(self) -> None:
        """Opens both streams (not started); raises AudioDeviceError with the fix."""
        sd = self.sd
        self.in_rate, self.in_channels = self._settings("input")
        self.out_rate, self.out_channels = self._settings("output")
        rate, seconds = self.geometry.sample_rate, self.geometry.frame_seconds
        self.in_resampler = Resampler(self.in_rate, rate)
        self.out_resampler = Resampler(rate, self.out_rate)
        try:
            self.input_stream = sd.InputStream(
                device=self.input_device, samplerate=self.in_rate, channels=self.in_channels,
                dtype="float32", blocksize=round(self.in_rate * seconds),
                callback=self._on_input)
        except Exception as e:
            raise device_error(e, "input", self.input_device) from None
        try:
            self.output_stream = sd.OutputStream(
                device=self.output_device, samplerate=self.out_rate,
                channels=self.out_channels, dtype="float32",
                blocksize=round(self.out_rate * seconds), callback=self._on_output)
        except Exception as e:
            self.close()
            raise device_error(e, "output", self.output_device) from None

    def start(self) -> None:
        try:
            self.output_stream.start()
            self.input_stream.start()
        except Exception as e:
            self.close()
            raise device_error(e, "input", self.input_device) from None
        self._started_at = self._last_input = time.monotonic()
        self.echo.set_delay_ms(self.echo_delay_ms())

    def echo_delay_ms(self) -> float:
        """How long after a frame is written its echo comes back in the microphone: the
        output prebuffer, then the devices' own latency (as PortAudio reports it)."""
        latency = 0.0
        for s in (self.input_stream, self.output_stream):
            try:
                value = s.latency
                latency += float(value[0] if isinstance(value, (tuple, list)) else value)
            except (AttributeError, TypeError, ValueError, IndexError):
                pass  # a backend that reports none: the canceller searches on its own
        return 1e3 * (latency + OUTPUT_PREBUFFER * self.geometry.frame_seconds)

    def close(self) -> None:
        """Stops and closes the streams; safe to call at any time, also twice."""
        with self._lock:
            for name in ("input_stream", "output_stream"):
                s = getattr(self, name)
                setattr(self, name, None)
                if s is None:
                    continue
                try:
                    s.abort()
                except Exception:
                    pass
                try:
                    s.close()
                except Exception:
                    pass

    @property
    def description(self) -> str:
        def one(kind: str, rate: int, ch: int) -> str:
            dev = getattr(self, f"{kind}_device")
            name = dev if isinstance(dev, str) else None
            try:
                name = self.sd.query_devices(dev, kind)["name"]
            except Exception:
                pass
            native = rate == self.geometry.sample_rate and ch == 1
            conv = "" if native else f" {rate} Hz x{ch}, converted"
            return f"{name or 'default'}{conv}"
        return (f"mic: {one('input', self.in_rate, self.in_channels)} | "
                f"speaker: {one('output', self.out_rate, self.out_channels)}")

    # -- the audio thread ------------------------------------------------------------------

    def _on_input(self, indata, frames, time_info, status) -> None:
        try:
            if status and getattr(status, "input_overflow", False):
                self.input_overflows += 1
            block = indata[:, 0].copy() if indata.shape[1] == 1 else indata.mean(axis=1)
            self._last_input = time.monotonic()
            self.input_blocks += 1
            try:
                self._in_q.put_nowait(block)
            except queue.Full:
                self.dropped_input += 1
        except BaseException as e:  # never let an exception stop the stream
            self._callback_error = e

    def _on_output(self, outdata, frames, time_info, status) -> None:
        try:
            mono = outdata[:, 0]
            filled = self.fifo.read_into(mono)
            if filled:
                self._playing = True
            if filled < frames:
                mono[filled:] = 0.0
                if self._playing:
                    self.underruns += 1
            if outdata.shape[1] > 1:
                outdata[:, 1:] = mono[:, None]
        except BaseException as e:
            self._callback_error = e
            outdata.fill(0)

    # -- the frames' reader and writer (live mode: the model thread) -----------------------

    def read_frame(self, timeout: float = 0.1) -> np.ndarray | None:
        """The next 80 ms of microphone audio at 24 kHz (1920 samples), or None if none
        arrived within `timeout`. When the reader is behind, stale frames are dropped so
        that the conversation keeps real time."""
        size = self.geometry.frame_size
        while len(self._pending) < size:
            try:
                block = self._in_q.get(timeout=timeout)
            except queue.Empty:
                return None
            while self._in_q.qsize() > self.max_input_backlog:
                try:
                    block = self._in_q.get_nowait()
                    self.dropped_backlog += 1
                except queue.Empty:
                    break
            self._pending = np.concatenate([self._pending, self.in_resampler.process(block)])
        frame, self._pending = self._pending[:size], self._pending[size:]
        return self.echo.near_end(frame)

    @property
    def backlog(self) -> int:
        """Frames waiting for the model."""
        return self._in_q.qsize()

    def write_frame(self, pcm: np.ndarray) -> None:
        """Queues the model's 24 kHz frame for the speaker."""
        if not self._primed:
            self._primed = True
            silence = np.zeros(round(self.out_rate * self.geometry.frame_seconds), np.float32)
            for _ in range(OUTPUT_PREBUFFER):
                self.fifo.push(silence)
        pcm = np.clip(pcm, -1.0, 1.0).astype(np.float32, copy=False)
        self.echo.far_end(pcm)  # exactly what the speaker is given
        out = self.out_resampler.process(pcm)
        if len(out):
            self.fifo.push(out.astype(np.float32, copy=False))

    @property
    def dropped(self) -> int:
        return self.dropped_input + self.dropped_backlog

    # -- the main thread: are the devices still there? -------------------------------------

    def check(self) -> None:
        """Raises AudioDeviceError if a stream died or the microphone stopped delivering
        (unplugged, taken by another program)."""
        if self._callback_error is not None:
            e, self._callback_error = self._callback_error, None
            raise AudioDeviceError(f"the audio stream failed ({one_line(e)})",
                                   DEVICES_FIX)
        for kind in ("input", "output"):
            s = getattr(self, f"{kind}_stream")
            if s is not None and not s.active:
                what = "microphone" if kind == "input" else "speaker"
                raise AudioDeviceError(f"the {what} stopped (disconnected?)",
                                       f"reconnect it, or pick another with --{kind}-device "
                                       f"(see --list-devices)")
        if self._started_at is not None and time.monotonic() - self._last_input > STALL_SECONDS:
            raise AudioDeviceError(
                f"the microphone stopped delivering audio for {STALL_SECONDS:.0f} s "
                f"(disconnected or taken by another program?)",
                "reconnect it, or pick another with --input-device (see --list-devices)")
