"""What the user sees: a full-screen terminal UI (rich), or plain lines when stdout is not
a terminal.

The terminal UI shows the image as a colour thumbnail, the transcript word by word with
each word coloured by the cross-attention gate of the moment it was spoken (how much the
model was looking at the image: the MoshiVis paper's Figure 7, live), and a status line
with step latency, real-time headroom, dropped frames, underruns and the microphone level.
Both displays are fed the session's events (session.py) by the main loop in `live.py`,
and the audio layer's counters (dropped frames, underruns) with them.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import sys
import time
from collections import deque
from typing import Any, TextIO

import numpy as np
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.text import Text

from ..session import ImageChanged, Message, Piece, Restarted, Stats
from ..stream import RELEASED, FrameGeometry
from .transcript import Transcript

STATS_SECONDS = 5.0
SILENT_MIC_SECONDS = 3.0
THUMB_COLS, THUMB_ROWS = 32, 16
KEYS_HELP = "i image  r restart  space mute  q quit"
CAMERA_KEYS_HELP = "c snapshot  i image  r restart  space mute  q quit"

# Gate 0 -> 1: dim blue, violet, red, yellow (readable on dark and light backgrounds).
GATE_RAMP = [(0.0, (90, 110, 200)), (0.35, (160, 80, 220)), (0.7, (235, 70, 90)),
             (1.0, (250, 200, 40))]


def gate_rgb(gate: float) -> tuple[int, int, int]:
    g = min(1.0, max(0.0, gate))
    for (x0, c0), (x1, c1) in itertools.pairwise(GATE_RAMP):
        if g <= x1:
            f = (g - x0) / (x1 - x0)
            return tuple(round(a + f * (b - a)) for a, b in zip(c0, c1))  # type: ignore
    return GATE_RAMP[-1][1]


def gate_style(gate: float | None) -> str:
    if gate is None:
        return "default"
    r, g, b = gate_rgb(gate)
    return f"rgb({r},{g},{b})"


def print_line(console: Console, line: str) -> None:
    """A line for the user on `console` (rich markup, no highlighting); after SIGHUP there
    may be no terminal left to print to."""
    try:
        console.print(line, highlight=False)
    except OSError:
        pass


class GateScale:
    """Maps gates onto the colour ramp over the range seen recently.

    MoshiVis' gate is sigmoid(... - 4): it idles near 0.02 and rises when the image
    matters, so a fixed 0..1 scale would paint everything the same colour. The legend
    shows the actual range.
    """

    MIN_SPAN = 0.02

    def __init__(self, keep: int = 600):
        self.recent: deque[float] = deque(maxlen=keep)

    def add(self, gate: float | None) -> None:
        if gate is not None:
            self.recent.append(gate)

    def bounds(self) -> tuple[float, float]:
        if not self.recent:
            return 0.0, 1.0
        lo, hi = min(self.recent), max(self.recent)
        if hi - lo < self.MIN_SPAN:
            mid = (lo + hi) / 2
            lo, hi = max(0.0, mid - self.MIN_SPAN / 2), mid + self.MIN_SPAN / 2
        return lo, hi

    def style(self, gate: float | None) -> str:
        if gate is None:
            return "default"
        lo, hi = self.bounds()
        return gate_style((gate - lo) / (hi - lo))

    def legend(self) -> Text:
        lo, hi = self.bounds()
        t = Text(f"gate {lo:.2f} ")
        for i in range(8):
            t.append("\u2588", style=gate_style(i / 7))
        t.append(f" {hi:.2f}")
        return t


def thumbnail(image: Any, max_cols: int = THUMB_COLS, max_rows: int = THUMB_ROWS) -> Text:
    """A PIL image as half-block characters: each cell shows two pixels (top in the
    foreground colour of "▀", bottom in its background), about square on screen."""
    w, h = image.size
    scale = min(max_cols / w, 2 * max_rows / h)
    cols = max(1, round(w * scale))
    rows = max(1, round(h * scale / 2))
    from PIL import Image

    px = np.asarray(image.convert("RGB").resize((cols, 2 * rows), Image.Resampling.BOX))
    text = Text()
    for r in range(rows):
        for c in range(cols):
            top, bottom = px[2 * r, c], px[2 * r + 1, c]
            text.append("\u2580", style=f"rgb({top[0]},{top[1]},{top[2]}) on "
                                        f"rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        if r < rows - 1:
            text.append("\n")
    return text


def level_meter(level: float, cells: int = 10) -> Text:
    """Microphone RMS as a bar on a -60..0 dBFS scale."""
    db = 20 * math.log10(max(level, 1e-6))
    n = round(cells * min(1.0, max(0.0, (db + 60) / 60)))
    t = Text()
    t.append("\u25ae" * n, style="green" if db < -6 else "red")
    t.append("\u25af" * (cells - n), style="bright_black")
    return t


class LiveStats:
    """Latency percentiles over the last seconds, counters, smoothed microphone level."""

    def __init__(self, geometry: FrameGeometry = RELEASED, seconds: float = STATS_SECONDS):
        self.frame_seconds = geometry.frame_seconds
        self.budget_ms = geometry.budget_ms
        self.latencies: deque[float] = deque(maxlen=max(2, round(seconds / self.frame_seconds)))
        self.level = 0.0
        self.zero_frames = 0
        """Consecutive frames of digital silence (exact zeros) from the microphone."""
        self.silent_mic_frames = round(SILENT_MIC_SECONDS / self.frame_seconds)
        self.dropped = 0
        self.underruns = 0
        self.backlog = 0
        self.echo: Any = None
        """The echo canceller's `EchoStats` (None: not in live mode)."""
        self.t = 0.0
        self.steps = 0

    def add(self, ev: Stats) -> None:
        self.latencies.append(ev.latency_ms)
        self.level = max(ev.level, 0.7 * self.level)  # fast attack, slow release
        self.zero_frames = self.zero_frames + 1 if ev.level == 0.0 else 0
        self.t = ev.t + self.frame_seconds
        self.steps += 1

    def counters(self, dropped: int, underruns: int, backlog: int = 0) -> None:
        """The audio layer's counts: frames dropped, speaker underruns, frames waiting."""
        self.dropped, self.underruns, self.backlog = dropped, underruns, backlog

    def percentiles(self) -> tuple[float, float] | None:
        if not self.latencies:
            return None
        a = np.fromiter(self.latencies, dtype=np.float64)
        return float(np.percentile(a, 50)), float(np.percentile(a, 95))

    def summary(self) -> str:
        """The exit line: the status line's figures (headroom as on screen)."""
        p = self.percentiles()
        if p is None:
            lat = "step -"
        else:
            budget = self.budget_ms
            room = (f"headroom {budget - p[1]:.0f}/{budget:.0f} ms" if p[1] <= budget
                    else f"behind real time ({p[1]:.0f} > {budget:.0f} ms)")
            lat = f"step p50 {p[0]:.0f} ms p95 {p[1]:.0f} ms, {room}"
        text = f"{lat}, dropped {self.dropped}, underruns {self.underruns}"
        echo = echo_label(self.echo)
        return f"{text}, {echo}" if echo else text

    def numbers(self) -> dict[str, float | None]:
        """The same figures for session.json, as numbers (ms)."""
        p = self.percentiles()
        p50, p95 = (None, None) if p is None else (round(p[0], 2), round(p[1], 2))
        return {"p50_ms": p50, "p95_ms": p95, "budget_ms": round(self.budget_ms, 2),
                "headroom_ms": None if p95 is None else round(self.budget_ms - p95, 2)}


def echo_label(stats: Any) -> str:
    """The echo canceller in a few words: off, or how much quieter it makes the echo
    (echo return loss enhancement, over the last second the model was heard)."""
    if stats is None:
        return ""
    if not stats.enabled:
        return "echo cancel off"
    if stats.erle_db is None:
        return "echo cancel on"
    return f"echo -{stats.erle_db:.0f} dB"


def silent_mic_hint(stats: LiveStats) -> str | None:
    """On macOS a microphone the terminal may not use delivers exact zeros, no error."""
    if sys.platform == "darwin" and stats.zero_frames == stats.silent_mic_frames:
        return ("the microphone gives pure silence: if macOS blocked it, allow your terminal "
                "in System Settings > Privacy & Security > Microphone and restart it")
    return None


def format_clock(t: float) -> str:
    m, s = divmod(int(t), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class TranscriptView:
    """The transcript, wrapped to the panel and scrolled so the latest words show."""

    def __init__(self, transcript: Transcript, scale: GateScale):
        self.transcript = transcript
        self.scale = scale

    def text(self) -> Text:
        t = Text()
        first = True
        for w in self.transcript.words:
            if not first:
                t.append(" ")
            t.append(w.text, style=self.scale.style(w.gate))
            first = False
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width)
        height = options.height or options.size.height
        lines = self.text().wrap(console, width)
        if not self.transcript.words:
            lines = Text("(listening: speak to the model)", style="bright_black").wrap(console,
                                                                                       width)
        shown = list(lines)[-height:] if height else list(lines)
        yield Text("\n").join(shown)


class TerminalUI:
    """Full-screen display state; `render()` draws it, `key()` interprets a key press."""

    def __init__(self, image_name: str | None, image: Any | None, record_dir: str | None,
                 devices: str = "", image_enabled: bool = True, keep_words: int = 600,
                 geometry: FrameGeometry = RELEASED, camera: bool = False):
        self.transcript = Transcript(keep=keep_words, keep_text=False)
        self.gates = GateScale()
        self.view = TranscriptView(self.transcript, self.gates)
        self.stats = LiveStats(geometry)
        self.record_dir = record_dir
        self.devices = devices
        self.image_enabled = image_enabled
        self.camera = camera
        self.muted = False
        self.prompt: str | None = None  # the image path being typed, when asking
        self.message: Text = Text("")
        self._message_until = 0.0
        self.set_image(image_name, image)

    # -- state ------------------------------------------------------------------------------

    def set_image(self, name: str | None, image: Any | None) -> None:
        self.image_name = name
        if image is not None:
            self.thumb = thumbnail(image)
            self.thumb_cols = len(self.thumb.plain.split("\n")[0])
            self.image_size = f"{image.size[0]}x{image.size[1]}"
        else:
            self.thumb = None
            self.thumb_cols = 0
            self.image_size = ""

    def say(self, text: str, style: str = "", seconds: float = 8.0) -> None:
        self.message = Text(text, style=style)
        self._message_until = time.monotonic() + seconds

    def handle(self, ev: Any) -> None:
        """One of the session's events (audio frames are not for the display)."""
        if isinstance(ev, Piece):
            self.gates.add(ev.gate)
            self.transcript.add(ev.text, ev.t, ev.gate, ev.step)
        elif isinstance(ev, Stats):
            self.stats.add(ev)
            hint = silent_mic_hint(self.stats) if not self.muted else None
            if hint:
                self.say(hint, "yellow", seconds=20)
        elif isinstance(ev, ImageChanged):
            self.transcript.finish()
            self.set_image(os.path.basename(ev.path), ev.picture)
            self.say(f"image: {ev.path}", "green")
        elif isinstance(ev, Restarted):
            self.transcript.clear()
            self.say("conversation restarted", "green")
        elif isinstance(ev, Message):
            style = {"error": "bold red", "warning": "yellow"}.get(ev.level, "")
            self.say(ev.text, style)

    def key(self, k: str) -> tuple[str, str] | None:
        """A key (or typed text) -> an action: ("quit",), ("restart",), ("mute",),
        ("image", path); None when nothing is to be done."""
        if self.prompt is not None:
            if k in ("\r", "\n"):
                path, self.prompt = self.prompt.strip(), None
                path = clean_path(path)
                return ("image", path) if path else None
            if k == "\x1b":
                self.prompt = None
            elif k in ("\x7f", "\x08"):
                self.prompt = self.prompt[:-1]
            elif k.isprintable():
                self.prompt += k
            return None
        if k in ("q", "Q"):
            return ("quit", "")
        if k in ("r", "R"):
            return ("restart", "")
        if k == " ":
            return ("mute", "")
        if k in ("c", "C"):
            if not self.camera:
                self.say("no camera (start with --camera)", "yellow")
                return None
            return ("camera", "")
        if k in ("i", "I"):
            if not self.image_enabled:
                self.say("images are off (--no-image)", "yellow")
                return None
            self.prompt = ""
        return None

    # -- drawing ------------------------------------------------------------------------------

    def _status(self) -> Text:
        """Clock, step latency (p50 / p95 over the last seconds), headroom against the
        80 ms budget, dropped frames, underruns: one line that fits 80 columns."""
        s = self.stats
        budget = s.budget_ms
        t = Text()
        t.append("\u25cf ", style="red" if not self.muted else "bright_black")
        t.append(f"{format_clock(s.t)}  ")
        p = s.percentiles()
        if p is None:
            t.append("step -  ")
        else:
            p50, p95 = p
            t.append(f"step {p50:.0f} ms p50 \u00b7 {p95:.0f} ms p95  ")
            if p95 <= budget:
                t.append(f"headroom {budget - p95:.0f}/{budget:.0f} ms",
                         style="green" if p95 < 0.75 * budget else "yellow")
            else:
                t.append(f"behind real time ({p95:.0f} > {budget:.0f} ms)", style="bold red")
            t.append("  ")
        t.append(f"dropped {s.dropped}  ", style="red" if s.dropped else "")
        t.append(f"underruns {s.underruns}", style="red" if s.underruns else "")
        return t

    def _footer(self) -> Group:
        lines = [self._status()]
        mic = Text()
        if self.muted:
            mic.append("mic MUTED ", style="bold yellow")
        else:
            mic.append("mic ")
            mic.append_text(level_meter(self.stats.level))
        echo = echo_label(self.stats.echo)
        if echo:
            mic.append(f"  {echo}", style="bright_black" if "off" in echo else "")
        mic.append("   ")
        if self.prompt is not None:
            mic.append_text(Text.assemble(
                ("image path: ", "bold"), self.prompt, ("\u2588", "blink"),
                ("   (Enter to load, Esc to cancel)", "bright_black")))
        else:
            mic.append(CAMERA_KEYS_HELP if self.camera else KEYS_HELP, style="bold")
            if self.record_dir:
                mic.append(f"    recording to {self.record_dir}", style="bright_black")
        lines.append(mic)
        if time.monotonic() < self._message_until:
            lines.append(self.message)
        elif self.devices:
            lines.append(Text(self.devices, style="bright_black"))
        return Group(*lines)

    def render(self) -> Layout:
        root = Layout()
        root.split_column(Layout(name="body", ratio=1), Layout(name="footer", size=3))
        transcript = Panel(self.view, title="transcript", title_align="left",
                           subtitle=self.gates.legend() if self.image_enabled else None,
                           subtitle_align="right")
        if self.image_enabled:
            if self.thumb is not None:
                width = max(self.thumb_cols + 4, 24)
                title = f"{self.image_name} {self.image_size}"
                image = Panel(self.thumb, title=title, title_align="left")
            else:
                width = 24
                image = Panel(Text("no image\npress i to load one", style="bright_black"),
                              title="image", title_align="left")
            body = Layout(name="body")
            body.split_row(Layout(image, name="image", size=width),
                           Layout(transcript, name="transcript", ratio=1))
            root["body"].update(body)
        else:
            root["body"].update(transcript)
        root["footer"].update(self._footer())
        return root


def clean_path(text: str) -> str:
    """A typed or dropped path: quotes and shell escapes removed, ~ expanded."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = text.replace("\\ ", " ")
    return os.path.expanduser(text)


class PlainUI:
    """Line-by-line output for logs and pipes: the transcript a phrase per line with its
    time, a status line every few seconds."""

    def __init__(self, out: TextIO | None = None, status_every: float = 10.0,
                 line_width: int = 72, geometry: FrameGeometry = RELEASED):
        self.out = out or sys.stdout
        self.stats = LiveStats(geometry)
        self.status_every = status_every
        self.line_width = line_width
        self.pause_frames = round(1.0 / geometry.frame_seconds)
        """A pause this long (1 s without text) ends a line."""
        self._line: list[str] = []
        self._line_start = 0.0
        self._quiet_frames = 0
        self._spoke = False  # this step had a piece of text
        self._next_status = status_every

    def print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _flush_line(self) -> None:
        if self._line:
            self.print(f"[{self._line_start:8.2f}s] {''.join(self._line).strip()}")
            self._line = []

    def handle(self, ev: Any) -> None:
        """One of the session's events (a step's `Piece`, if any, comes before its `Stats`)."""
        if isinstance(ev, Piece):
            text = ev.text.replace("\u2581", " ")
            if (self._line and text.startswith(" ")
                    and sum(len(p) for p in self._line) >= self.line_width):
                self._flush_line()  # a long line ends before a new word
            if not self._line:
                self._line_start = ev.t
                text = text.lstrip()
            self._line.append(text)
            self._quiet_frames = 0
            self._spoke = True
        elif isinstance(ev, Stats):
            self.stats.add(ev)
            hint = silent_mic_hint(self.stats)
            if hint:
                self.print(f"[{ev.t:8.2f}s] warning: {hint}")
            if not self._spoke:
                self._quiet_frames += 1
                if self._quiet_frames == self.pause_frames:
                    self._flush_line()
            self._spoke = False
            if self.stats.t >= self._next_status:
                self._next_status += self.status_every
                self.print(f"[{self.stats.t:8.2f}s] status: {self.stats.summary()}")
        elif isinstance(ev, ImageChanged):
            self._flush_line()
            self.print(f"[{self.stats.t:8.2f}s] image: {ev.path}")
        elif isinstance(ev, Restarted):
            self._flush_line()
            self.print(f"[{self.stats.t:8.2f}s] conversation restarted")
        elif isinstance(ev, Message):
            self.print(f"[{self.stats.t:8.2f}s] {ev.level}: {ev.text}")

    def close(self) -> None:
        self._flush_line()


class KeyReader:
    """Single key presses from the terminal (cbreak mode: no echo, no Enter needed;
    Ctrl-C still interrupts). Restores the terminal on exit."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdin
        self.fd = self.stream.fileno()
        self._saved = None

    def __enter__(self) -> KeyReader:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout: float) -> list[str]:
        """Keys pressed within `timeout` seconds (escape sequences such as arrows are
        dropped, a lone Esc is kept)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 256).decode("utf-8", errors="ignore")
        keys: list[str] = []
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b" and i + 1 < len(data) and data[i + 1] in "[O":
                i += 2
                while i < len(data) and not data[i].isalpha() and data[i] != "~":
                    i += 1
                i += 1
                continue
            keys.append(ch)
            i += 1
        return keys
