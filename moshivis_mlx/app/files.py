"""File mode: a WAV of the user in, a WAV of the model out, through the same `Session`
as live mode, as fast as the machine allows.

Any WAV goes in (PCM 8/16/24/32-bit or float, any rate, any channels): it is mixed down
to mono and resampled to the model's rate (24 kHz). The output is 24 kHz mono 16-bit:
frame i of the output is what the model said while frame i was heard, and after the
question ends the model hears silence until it has finished answering (no words and a
near-silent voice for `answer_silence` seconds) or until the cap; `same_length` stops
with the question instead. Frames are submitted one ahead of being collected: the whole
input is known, so the host builds frame n+1 while the device computes frame n.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

from ..errors import AudioFileError
from ..paths import check_readable_file
from ..progress import Counter, Steps
from ..resample import Resampler
from ..session import AnswerWatch, AudioFrame, Piece, Session, load_picture
from ..signals import shielded
from ..stream import FrameGeometry
from ..wav import WavReader, WavWriter
from .opening import open_session, opening_steps
from .options import AppOptions
from .preflight import check_file_mode
from .transcript import Transcript, TranscriptWriter
from .ui import print_line


class InputFrames:
    """A WAV file as mono frames of the model's geometry, read and resampled block by block.

    `samples` is the input's length at the model's rate; the last frame is zero-padded.
    """

    BLOCK = 1 << 16

    def __init__(self, reader: WavReader, geometry: FrameGeometry):
        self.reader = reader
        self.frame_size = geometry.frame_size
        rate = reader.sample_rate
        self.resampler = Resampler(rate, geometry.sample_rate)
        self.samples = round(reader.frames * geometry.sample_rate / rate)
        self.frames = math.ceil(self.samples / self.frame_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """(frame of `frame_size` samples, how many of them are real audio)."""
        size = self.frame_size
        pending = np.zeros(0, dtype=np.float32)
        flushed = False
        for i in range(self.frames):
            while len(pending) < size and not flushed:
                block = self.reader.read(self.BLOCK)
                if len(block):
                    more = self.resampler.process(block.mean(axis=1))
                else:
                    more = self.resampler.flush()
                    flushed = True
                pending = np.concatenate([pending, more])
            valid = min(size, self.samples - i * size)
            frame = np.zeros(size, dtype=np.float32)
            take = min(valid, len(pending))
            frame[:take] = pending[:take]
            pending = pending[size:]
            yield frame, valid


def process(session: Session, frames: InputFrames, out: WavWriter, transcript: Transcript,
            console: Console, watch: AnswerWatch | None = None,
            writer: TranscriptWriter | None = None, clock: Clock | None = None) -> int:
    """Runs the question (and, with a `watch`, the answer after it) through the session;
    returns the frames done (an interrupt leaves `out` and `transcript` holding everything
    before it)."""
    frame_seconds = session.geometry.frame_seconds
    clock = clock or Clock()
    done = 0
    with Counter(console, unit="frames", every=0.25) as bar:
        task = bar.add("model", frames.frames)
        question = ((frame, None, valid) for frame, valid in frames)
        for valid, events in session.converse(question, watch):
            for ev in events:
                if isinstance(ev, AudioFrame):
                    out.write(ev.pcm if valid is None else ev.pcm[:valid])
                elif isinstance(ev, Piece):
                    transcript.add(ev.text, ev.t, ev.gate, ev.step)
            if writer is not None:
                writer.tick(transcript)
            done += 1
            clock.frame_done()
            bar.update(task, min(done, frames.frames),
                       rate=f"{clock.speed(frame_seconds):.1f}x real time")
    return done


class Clock:
    """The real-time factor of the steady state: timed from the end of the first frame,
    which pays for compiling the step (and the lazy imports behind it)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.frames = 0

    def frame_done(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.frames += 1
        self.last = now

    def speed(self, frame_seconds: float) -> float:
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return self.frames * frame_seconds / (self.last - self.first)


def run_file(opts: AppOptions, console: Console) -> int:
    out_path = opts.output_wav
    transcript_path = opts.transcript
    # Before anything loads: an unusable input, an output that would overwrite an input
    # (or the bundle), or one that cannot be written.
    reader = WavReader(check_readable_file(opts.input_wav, "a WAV file", AudioFileError))
    try:
        picture = load_picture(opts.image) if opts.image else None
        check_file_mode(opts)
        with Steps(console, opening_steps(picture is not None, picture is not None)) as steps:
            opened = open_session(opts.model, steps, picture is not None, opts.image, picture)
        check_file_mode(opts, opened.bundle)  # the bundle may be elsewhere than expected
        frames = InputFrames(reader, opened.session.geometry)
        return _run(opts, console, opened.session, frames, out_path, transcript_path)
    finally:
        reader.close()


def _run(opts: AppOptions, console: Console, session: Session, frames: InputFrames,
         out_path: Path, transcript_path: Path | None) -> int:
    rate = session.geometry.sample_rate
    writer = None
    if transcript_path is not None:
        writer = TranscriptWriter(transcript_path, {
            "sample_rate": rate, "frame_seconds": session.geometry.frame_seconds,
            "input": opts.input_wav, "output": str(out_path), "image": opts.image})
    transcript = Transcript(keep=1, on_word=writer.write_word if writer else None,
                            on_event=writer.write_event if writer else None)
    watch = None if opts.same_length else AnswerWatch(
        session.geometry.frame_seconds, opts.answer_silence, opts.max_answer_seconds)
    clock = Clock()
    t0 = time.perf_counter()
    stopped: BaseException | None = None
    with WavWriter(out_path, rate, 1) as out:
        try:
            done = process(session, frames, out, transcript, console, watch, writer, clock)
        except (KeyboardInterrupt, Exception) as e:  # Ctrl-C, SIGTERM, SIGHUP, a failure:
            stopped = e                              # both files keep what was made
            done = session.frames
        with shielded():  # a second Ctrl-C waits until both files are complete
            out.close()
            samples = out.frames
            seconds = samples / rate
            question = frames.samples / rate
            ending = _ending(watch, seconds - question, opts, stopped)
            if writer is not None:
                writer.close(transcript, {"duration_s": round(seconds, 3),
                                          "question_s": round(question, 3),
                                          "answer_end": ending[0]})
    elapsed = time.perf_counter() - t0
    steady = clock.speed(session.geometry.frame_seconds)
    speed = f"{steady:.1f}x real time after the first frame" if steady else "real time -"
    print_line(console, f"wrote {out_path} ({seconds:.2f} s at {rate} Hz, {done} frames in "
                  f"{elapsed:.1f} s: {speed}); {ending[1]}")
    if transcript_path is not None:
        print_line(console, f"wrote {transcript_path} ({transcript.count} words)")
    text = transcript.text
    if text:
        print_line(console, f"model said: {text[:300]}{' ...' if len(text) > 300 else ''}")
    if stopped is not None:
        raise stopped
    return 0


def _ending(watch: AnswerWatch | None, after_s: float, opts: AppOptions,
            stopped: BaseException | None) -> tuple[str, str]:
    """How the answer ended: a key for the transcript and a phrase for the user."""
    if isinstance(stopped, KeyboardInterrupt):
        return "interrupted", "interrupted"
    if stopped is not None:
        return "error", "stopped by an error"
    if watch is None:
        return "same-length", "as long as the question (--same-length)"
    if watch.outcome == "finished":
        return "finished", (f"the model finished answering {after_s:.2f} s after the "
                            f"question ({opts.answer_silence:g} s of silence)")
    return "cap", (f"the answer was cut {after_s:.2f} s after the question, at the cap "
                   f"(--max-answer-seconds {opts.max_answer_seconds:g})")
