"""Session recording: written from the session's events as they come, completed on exit.

    conversation.wav   stereo 16-bit 24 kHz: the user on the left, the model on the right
    transcript.json    the model's words with start/end times (s) and gate values, events
    latency.csv        one row per 80 ms step: what each stage cost, the input backlog
    session.json       when, which image(s), settings, dropped frames and underruns

Audio and latency rows go to disk as they come (the WAV header is kept valid), so memory
stays flat in an hour-long session and a crash loses at most the last second.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..stream import FrameGeometry
from .session import AudioFrame, Event, ImageChanged, Piece, Restarted, Stats
from .transcript import Transcript, TranscriptWriter
from .wav import WavWriter

DEFAULT_ROOT = Path("moshivis-sessions")
LATENCY_HEADER = "step,t_s,total_ms,host_ms,backlog_frames\n"


def default_session_dir(root: Path = DEFAULT_ROOT) -> Path:
    """`moshivis-sessions/<YYYYmmdd-HHMMSS>`, with a suffix if that already exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


class SessionRecorder:
    """Receives the session's events (on the model thread) and writes the session files."""

    def __init__(self, directory: str | Path, geometry: FrameGeometry,
                 metadata: dict[str, Any] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.geometry = geometry
        self.metadata = dict(metadata or {})
        self.started = datetime.now().astimezone()
        self._words = TranscriptWriter(self.dir / "transcript.json", {
            "sample_rate": geometry.sample_rate, "frame_seconds": geometry.frame_seconds,
            "started": self.started.isoformat(timespec="seconds")})
        self.transcript = Transcript(keep=1, on_word=self._words.write_word)
        self.frames = 0
        self.wav = WavWriter(self.dir / "conversation.wav", geometry.sample_rate, channels=2)
        self._latency = open(self.dir / "latency.csv", "w", buffering=1 << 16)
        self._latency.write(LATENCY_HEADER)
        self._stereo = np.zeros((0, 2), dtype=np.float32)
        self._last_flush = time.monotonic()
        self.closed = False

    @property
    def seconds(self) -> float:
        return self.frames * self.geometry.frame_seconds

    def add(self, event: Event, backlog: int = 0) -> None:
        """One of the session's events; `backlog`: the frames waiting for the model (the
        latency row of a step's `Stats` keeps it)."""
        if isinstance(event, AudioFrame):
            self.add_audio(event.heard, event.pcm)
        elif isinstance(event, Piece):
            self.transcript.add(event.text, event.t, event.gate, event.step)
        elif isinstance(event, Stats):
            self.add_stats(event, backlog)
        elif isinstance(event, ImageChanged):
            self.add_event("image", path=event.path)
        elif isinstance(event, Restarted):
            self.add_event("restart")

    def add_audio(self, user: np.ndarray, model: np.ndarray) -> None:
        """The user's frame as the model heard it (left), the model's frame (right)."""
        n = len(user)
        if self._stereo.shape[0] != n:
            self._stereo = np.zeros((n, 2), dtype=np.float32)
        self._stereo[:, 0] = user
        self._stereo[:, 1] = model
        self.wav.write(self._stereo)
        self.frames += 1

    def add_stats(self, s: Stats, backlog: int = 0) -> None:
        self._latency.write(f"{s.step},{s.t:.2f},{s.latency_ms:.3f},{s.host_ms:.3f},"
                            f"{backlog}\n")
        now = time.monotonic()
        if now - self._last_flush > 1.0:
            self._latency.flush()
            self._last_flush = now

    def add_event(self, kind: str, **info: Any) -> None:
        """An image change, a restart, an error: kept in the transcript at the current time."""
        self.transcript.add_event(self.seconds, kind, **info)

    def close(self, summary: dict[str, Any] | None = None) -> Path:
        """Completes every file (safe to call twice); returns the directory."""
        if self.closed:
            return self.dir
        self.closed = True
        self.wav.close()
        self._latency.close()
        self._words.close(self.transcript, {"duration_s": round(self.seconds, 2)})
        session = {
            "started": self.started.isoformat(timespec="seconds"),
            "duration_s": round(self.seconds, 2),
            "frames": self.frames,
            **self.metadata,
            **(summary or {}),
            "files": {"audio": "conversation.wav (left: user, right: model)",
                      "transcript": "transcript.json", "latency": "latency.csv"},
        }
        (self.dir / "session.json").write_text(json.dumps(session, indent=1, default=str) + "\n")
        return self.dir
