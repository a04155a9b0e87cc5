"""Session recording: written from the session's events as they come, completed on exit.

    conversation.wav   stereo 16-bit 24 kHz: the user on the left, the model on the right
    transcript.json    the model's words with start/end times (s) and gate values, events
    latency.csv        one row per 80 ms step: what each stage cost, the input backlog
    session.json       when, which images, settings, dropped frames and underruns

Everything goes to disk as it comes, so memory stays flat in an hour-long session and a
hard stop (SIGKILL, a crash) loses at most the last second: the WAV's header is rewritten
every second, latency rows are flushed every second, the words and events go to
`transcript.jsonl` as they come (transcript.json is made from it at the end), and
session.json is rewritten (atomically) every second with the duration so far
(`"complete": false` until the end).

A write that fails (a full disk) ends the session with one line naming the file; every
other file is still completed (transcript.json is made from its log), so what was
recorded up to then is kept.

A directory holding a session is never written over: session.json is created exclusively
first, so a second run with the same --record DIR (or two started in the same second) is
refused before it writes anything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoshivisError, UsageError, one_line
from ..fileio import atomic_write
from ..session import AudioFrame, Event, ImageChanged, Piece, Restarted, Stats
from ..stream import FrameGeometry
from ..wav import WavWriter
from .transcript import Transcript, TranscriptWriter, log_path

DEFAULT_ROOT = Path("moshivis-sessions")
LATENCY_HEADER = "step,t_s,total_ms,host_ms,backlog_frames\n"
FILES = ("session.json", "conversation.wav", "transcript.json", "transcript.jsonl",
         "latency.csv")
"""What a session directory holds (transcript.jsonl only while recording, or after a
hard stop)."""
SYNC_SECONDS = 1.0
WRITE_FIX = "free some space (what was recorded up to then is kept), or use --no-record"


def default_session_dir(root: Path = DEFAULT_ROOT, create: bool = False) -> Path:
    """`moshivis-sessions/<YYYYmmdd-HHMMSS>`, with a suffix if that already exists; with
    `create`, made here (atomically: two runs never get the same one)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        n += 1
        if path.exists():
            continue
        if not create:
            return path
        root.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def existing_session(directory: Path) -> str | None:
    """The session file already in `directory`, if any (it is not written over)."""
    for name in FILES:
        if (directory / name).exists():
            return name
    return None


def session_taken(directory: Path, found: str) -> UsageError:
    return UsageError(f"{directory} already holds a session ({found}): it is not written over",
                         "choose a new directory with --record DIR, or leave --record out")


class SessionRecorder:
    """Receives the session's events (on the model thread) and writes the session files."""

    def __init__(self, directory: str | Path, geometry: FrameGeometry,
                 metadata: dict[str, Any] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.geometry = geometry
        self.metadata = dict(metadata or {})
        self.images: list[dict[str, Any]] = []
        """Every image used, with when it came: {"t", "path"}."""
        self.started = datetime.now().astimezone()
        self.frames = 0
        self._claim()
        self._words = TranscriptWriter(self.dir / "transcript.json", {
            "sample_rate": geometry.sample_rate, "frame_seconds": geometry.frame_seconds,
            "started": self.started.isoformat(timespec="seconds")})
        self.transcript = Transcript(keep=1, on_word=self._words.write_word,
                                     on_event=self._words.write_event)
        self.wav = WavWriter(self.dir / "conversation.wav", geometry.sample_rate, channels=2)
        self._latency = open(self.dir / "latency.csv", "w", buffering=1 << 16)
        self._latency.write(LATENCY_HEADER)
        self._stereo = np.zeros((0, 2), dtype=np.float32)
        self._last_flush = time.monotonic()
        self.closed = False
        self.unfinished: list[str] = []
        """The files `close` could not complete (a full disk)."""

    def _claim(self) -> None:
        """session.json, created exclusively: the directory is this run's, or an error."""
        found = existing_session(self.dir)
        if found is None:
            try:
                fd = os.open(self.dir / "session.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o666)
            except FileExistsError:
                found = "session.json"
            else:
                os.write(fd, self._session_text())
                os.close(fd)
        if found is not None:
            raise session_taken(self.dir, found)

    def _session_text(self, summary: dict[str, Any] | None = None, complete: bool = False
                      ) -> bytes:
        session = {
            "started": self.started.isoformat(timespec="seconds"),
            "complete": complete,
            "duration_s": round(self.seconds, 2),
            "frames": self.frames,
            **self.metadata,
            "images": self.images,
            **(summary or {}),
            "files": {"audio": "conversation.wav (left: user, right: model)",
                      "transcript": "transcript.json" if complete else
                      f"{log_path(Path('transcript.json'))} (transcript.json at the end)",
                      "latency": "latency.csv"},
        }
        return (json.dumps(session, indent=1, default=str) + "\n").encode()

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A failed write of the session's file `name` (a full disk) as one line naming
        it."""
        try:
            yield
        except OSError as e:
            raise MoshivisError(f"cannot write {self.dir / name}: {e.strerror or one_line(e)}",
                                WRITE_FIX) from None

    @property
    def seconds(self) -> float:
        return self.frames * self.geometry.frame_seconds

    def add(self, event: Event, backlog: int = 0) -> None:
        """One of the session's events; `backlog`: the frames waiting for the model (the
        latency row of a step's `Stats` keeps it)."""
        if isinstance(event, AudioFrame):
            self.add_audio(event.heard, event.pcm)
        elif isinstance(event, Piece):
            with self._writing(self._words.log.name):
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
        with self._writing(self.wav.path.name):
            self.wav.write(self._stereo)
        self.frames += 1

    def add_stats(self, s: Stats, backlog: int = 0) -> None:
        with self._writing("latency.csv"):
            self._latency.write(f"{s.step},{s.t:.2f},{s.latency_ms:.3f},{s.host_ms:.3f},"
                                f"{backlog}\n")
        self.tick()

    def tick(self) -> None:
        """At most once a second: everything on disk up to now (see the module docstring)."""
        now = time.monotonic()
        if now - self._last_flush < SYNC_SECONDS:
            return
        self._last_flush = now
        with self._writing(self.wav.path.name):
            self.wav.sync()
        with self._writing("latency.csv"):
            self._latency.flush()
        with self._writing(self._words.log.name):
            self._words.tick(self.transcript)
        with self._writing("session.json"):
            atomic_write(self.dir / "session.json", self._session_text())

    def add_event(self, kind: str, **info: Any) -> None:
        """An image change, a restart, an error: kept in the transcript at the current time
        (images also in session.json)."""
        if kind == "image":
            self.images.append({"t": round(self.seconds, 3), **info})
        with self._writing(self._words.log.name):
            self.transcript.add_event(self.seconds, kind, **info)

    def close(self, summary: dict[str, Any] | None = None) -> Path:
        """Completes every file (safe to call twice); returns the directory."""
        if self.closed:
            return self.dir
        self.closed = True
        steps: list[tuple[str, Callable[[], None]]] = [
            (self.wav.path.name, self.wav.close),
            ("latency.csv", self._latency.close),
            ("transcript.json", lambda: self._words.close(
                self.transcript, {"duration_s": round(self.seconds, 2)})),
            ("session.json", lambda: atomic_write(self.dir / "session.json",
                                                  self._session_text(summary, complete=True))),
        ]
        failure: MoshivisError | None = None
        for name, step in steps:  # each file completed even if another cannot be
            try:
                with self._writing(name):
                    step()
            except MoshivisError as e:
                failure = failure or e
                self.unfinished.append(name)
        if failure is not None:
            raise failure
        return self.dir

    def partly_saved(self) -> str:
        """What a close that failed left, for the user: which files are not complete, and
        where the words are when transcript.json could not be made."""
        log = self._words.log
        words = (f"; the words are in {log.name}" if "transcript.json" in self.unfinished
                 and log.exists() else "")
        return (f"session partly saved to {self.dir}/ ({self.seconds:.1f} s; not completed: "
                f"{', '.join(self.unfinished)}{words})")
