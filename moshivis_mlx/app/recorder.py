"""Session recording: written while the conversation runs, completed on exit.

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

from ..stream import FRAME_SECONDS, SAMPLE_RATE, StepResult
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
    """Receives every step (from the model thread) and writes the session files."""

    def __init__(self, directory: str | Path, metadata: dict[str, Any] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metadata = dict(metadata or {})
        self.started = datetime.now().astimezone()
        self._words = TranscriptWriter(self.dir / "transcript.json", {
            "sample_rate": SAMPLE_RATE, "frame_seconds": FRAME_SECONDS,
            "started": self.started.isoformat(timespec="seconds")})
        self.transcript = Transcript(keep=1, on_word=self._words.write_word)
        self.frames = 0
        self.wav = WavWriter(self.dir / "conversation.wav", SAMPLE_RATE, channels=2)
        self._latency = open(self.dir / "latency.csv", "w", buffering=1 << 16)
        self._latency.write(LATENCY_HEADER)
        self._stereo = np.zeros((0, 2), dtype=np.float32)
        self._last_flush = time.monotonic()
        self.closed = False

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_SECONDS

    def add_step(self, user: np.ndarray, result: StepResult, backlog: int = 0) -> None:
        """The user's frame as the model heard it, and what the model made of it."""
        n = len(user)
        if self._stereo.shape[0] != n:
            self._stereo = np.zeros((n, 2), dtype=np.float32)
        self._stereo[:, 0] = user
        self._stereo[:, 1] = result.pcm
        self.wav.write(self._stereo)
        t = self.seconds
        self.transcript.add(result.piece, t, result.gate, result.step)
        self._latency.write(f"{result.step},{t:.2f},{result.latency_ms:.3f},"
                            f"{result.host_ms:.3f},{backlog}\n")
        self.frames += 1
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
