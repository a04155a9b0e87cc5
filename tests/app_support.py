"""Shared pieces of the app tests: the tiny demo bundle, spoken clips, a private PulseAudio
server, a scriptable stand-in for the sounddevice module, and running the CLI."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
APP = [sys.executable, "-m", "moshivis_mlx.cli.app"]


# -- models and media -------------------------------------------------------------------

@functools.cache
def demo_bundle() -> Path:
    """The tiny random-weight bundle the demo uses (LM, Mimi, SigLIP, tokenizer), built
    once per test run."""
    import atexit

    from moshivis_mlx.app.demo import build_demo_bundle

    root = Path(tempfile.mkdtemp(prefix="moshivis-app-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return build_demo_bundle(root / "bundle")


def speech_wav(path: Path, text: str, rate: int = 22050, channels: int = 1,
               bits: int = 16) -> Path:
    """Speech synthesised by espeak-ng, converted by sox to the given format."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    enc = ["-e", "floating-point"] if bits == 32 else ["-e", "signed-integer"]
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", str(channels), "-b", str(bits),
                    *enc, str(path)], check=True, capture_output=True)
    raw.unlink()
    return path


def second_image(path: Path) -> Path:
    """Another picture: the sample mirrored, in grey, as PNG."""
    from PIL import Image

    from moshivis_mlx.app.demo import SAMPLE_IMAGE

    Image.open(SAMPLE_IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L").save(path)
    return path


def app_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    env.update(extra)
    return env


def run_app(*args: str, cwd: Path | None = None, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (stdout is a pipe: plain mode)."""
    return subprocess.run([*APP, *args], cwd=cwd or REPO, env=env or app_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args: str) -> int:
    """moshivis_mlx.cli.app.main in this process (for tests that replace the audio backend)."""
    from moshivis_mlx.cli.app import main

    try:
        return main(list(args))
    except SystemExit as e:  # argparse
        return int(e.code or 0)


# -- a private PulseAudio server --------------------------------------------------------

class PulseServer:
    """A PulseAudio server with two null sinks: `speaker` (the app plays into it; its
    monitor is recorded) and `mic` (speech is played into it; its monitor is the app's
    microphone). A private daemon is started unless one already answers, in which case
    only the sinks are added (and removed afterwards). The sinks run at `rate` (a browser's
    audio context takes the output device's rate)."""

    SPEAKER = "moshivis_test_speaker"
    MIC = "moshivis_test_mic"

    def __init__(self, rate: int = 24000) -> None:
        self.rate = rate
        self.process: subprocess.Popen | None = None
        self.modules: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="moshivis-pulse-"))
        self.env: dict[str, str] = {}

    def _pactl(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run(["pactl", *args], env=env or self.client_env(), capture_output=True,
                           text=True, timeout=10)
        if r.returncode:
            raise RuntimeError(f"pactl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()

    def client_env(self, **extra: str) -> dict[str, str]:
        return app_env(**self.env, **extra)

    def start(self) -> PulseServer:
        running = subprocess.run(["pactl", "info"], env=app_env(), capture_output=True,
                                 timeout=10).returncode == 0
        if not running:
            socket = self.dir / "native"
            self.env = {"PULSE_SERVER": f"unix:{socket}", "HOME": str(self.dir),
                        "XDG_RUNTIME_DIR": str(self.dir)}
            self.process = subprocess.Popen(
                ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                 "-n", "--disallow-exit", f"--log-target=file:{self.dir / 'log'}",
                 "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1"],
                env=app_env(**self.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 15
            while subprocess.run(["pactl", "info"], env=self.client_env(),
                                 capture_output=True).returncode:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
                    raise RuntimeError(f"pulseaudio did not start: {log[-2000:]}")
                time.sleep(0.1)
        for name in (self.SPEAKER, self.MIC):
            self.modules.append(self._pactl(
                "load-module", "module-null-sink", f"sink_name={name}", f"rate={self.rate}",
                "channels=1", f"sink_properties=device.description={name}"))
        self.env.update({"PULSE_SINK": self.SPEAKER, "PULSE_SOURCE": f"{self.MIC}.monitor"})
        return self

    def stop(self) -> None:
        for m in self.modules:
            try:
                self._pactl("unload-module", m)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def record_speaker(self, path: Path) -> subprocess.Popen:
        """Starts recording what is played to the speaker (raw s16le mono 24 kHz)."""
        return subprocess.Popen(
            ["parec", "-d", f"{self.SPEAKER}.monitor", "--rate=24000", "--channels=1",
             "--format=s16le", "--raw", str(path)], env=self.client_env())

    def talk(self, wav: Path, pause: float = 0.3) -> subprocess.Popen:
        """Plays `wav` into the microphone over and over until terminated."""
        loop = f"while true; do paplay -d {self.MIC} '{wav}'; sleep {pause}; done"
        return subprocess.Popen(["bash", "-c", loop], env=self.client_env(),
                                start_new_session=True)


def stop_process_group(p: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    p.wait(timeout=10)


# -- a scriptable sounddevice ------------------------------------------------------------

class PortAudioError(Exception):
    pass


class FakeStream:
    """Calls its callback from a thread, like PortAudio: an input stream delivers a signal
    (or silence), an output stream collects what the app plays."""

    def __init__(self, backend: FakeSoundDevice, kind: str, samplerate: float, channels: int,
                 blocksize: int, callback, **_):
        self.backend, self.kind = backend, kind
        self.samplerate, self.channels, self.blocksize = int(samplerate), channels, blocksize
        self.callback = callback
        self.active = False
        self.blocks = 0
        self.played: list[np.ndarray] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        backend.streams.append(self)

    def start(self) -> None:
        self.active = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.blocksize / self.samplerate / self.backend.speed
        t_next = time.monotonic()
        n = 0
        status = SimpleNamespace(input_overflow=False)
        while not self._stop.is_set():
            if self.kind == "input" and self.backend.input_stops_after is not None \
                    and self.blocks >= self.backend.input_stops_after:
                self.active = not self.backend.inactive_when_stopped
                return  # the device is gone: no more callbacks
            if self.kind == "input":
                t = (n + np.arange(self.blocksize)) / self.samplerate
                mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
                data = np.repeat(mono[:, None], self.channels, axis=1)
                self.callback(data, self.blocksize, None, status)
            else:
                data = np.zeros((self.blocksize, self.channels), dtype=np.float32)
                self.callback(data, self.blocksize, None, status)
                self.played.append(data.copy())
            n += self.blocksize
            self.blocks += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))

    def abort(self) -> None:
        self._stop.set()
        self.active = False

    def close(self) -> None:
        self.abort()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


class FakeSoundDevice:
    """Stands in for the sounddevice module: one microphone and one speaker at `rate`
    (24 kHz unless told), optionally refusing anything else, failing to open with a given
    PortAudio message, or stopping (unplugged) after a number of blocks."""

    PortAudioError = PortAudioError

    def __init__(self, rate: int = 24000, only_native: bool = False, channels: int = 1,
                 open_error: str | None = None, open_error_kind: str = "input",
                 input_stops_after: int | None = None, inactive_when_stopped: bool = True,
                 speed: float = 1.0):
        self.rate, self.only_native, self.channels = rate, only_native, channels
        self.open_error, self.open_error_kind = open_error, open_error_kind
        self.input_stops_after = input_stops_after
        self.inactive_when_stopped = inactive_when_stopped
        self.speed = speed
        self.streams: list[FakeStream] = []
        self.default = SimpleNamespace(device=(0, 1))

    def _devices(self):
        return [
            {"name": "Fake Microphone", "max_input_channels": self.channels,
             "max_output_channels": 0, "default_samplerate": float(self.rate)},
            {"name": "Fake Speakers", "max_input_channels": 0,
             "max_output_channels": max(2, self.channels), "default_samplerate": float(self.rate)},
        ]

    def query_devices(self, device=None, kind=None):
        devices = self._devices()
        if kind is None and device is None:
            return devices
        if device is None:
            device = self.default.device[0 if kind == "input" else 1]
        if isinstance(device, str):
            found = [i for i, d in enumerate(devices) if device.lower() in d["name"].lower()
                     and d[f"max_{kind}_channels"] > 0]
            if not found:
                raise ValueError(f"No {kind} device matching {device!r}")
            device = found[0]
        return devices[device]

    def _check(self, kind, device, samplerate, channels, **_):
        info = self.query_devices(device, kind)
        if self.only_native and int(samplerate) != self.rate:
            raise PortAudioError("Error opening stream: Invalid sample rate [PaErrorCode -9997]")
        if channels > info[f"max_{kind}_channels"]:
            raise PortAudioError("Error opening stream: Invalid number of channels "
                                 "[PaErrorCode -9998]")
        if self.only_native and channels != info[f"max_{kind}_channels"]:
            raise PortAudioError("Error opening stream: Invalid number of channels "
                                 "[PaErrorCode -9998]")

    def check_input_settings(self, device=None, samplerate=None, channels=None, **kw):
        self._check("input", device, samplerate, channels, **kw)

    def check_output_settings(self, device=None, samplerate=None, channels=None, **kw):
        self._check("output", device, samplerate, channels, **kw)

    def InputStream(self, **kw):  # noqa: N802 (sounddevice's name)
        if self.open_error and self.open_error_kind == "input":
            raise PortAudioError(self.open_error)
        return FakeStream(self, "input", **kw)

    def OutputStream(self, **kw):  # noqa: N802
        if self.open_error and self.open_error_kind == "output":
            raise PortAudioError(self.open_error)
        return FakeStream(self, "output", **kw)

    def stream(self, kind: str) -> FakeStream:
        return next(s for s in self.streams if s.kind == kind)


# -- the app in a process of its own, with stand-in devices ---------------------------------

FAKE_DEVICES = """import sys
sys.path.insert(0, {tests!r})
from app_support import FakeSoundDevice
from moshivis_mlx.app import audio
audio.load_backend = lambda: FakeSoundDevice()
{extra}
from moshivis_mlx.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def start_app(*args: str, fake_devices: bool = False, extra: str = "",
              cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """The app as a process of its own (to signal or kill), stdout and stderr piped; with
    `fake_devices` live mode gets the stand-in microphone and speaker; `extra` is code run
    before the app starts (to slow something down, say); `env`: more variables."""
    code = FAKE_DEVICES.format(tests=str(Path(__file__).parent), extra=extra)
    cmd = [sys.executable, "-c", code, *args] if fake_devices or extra else [*APP, *args]
    return subprocess.Popen(cmd, cwd=cwd or REPO, env=app_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None
               ) -> None:
    """Polls `condition()` until it holds; fails saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the app ended before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def jsonl(path: Path) -> list[dict]:
    """A JSON Lines file's objects (every line must parse)."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]
