"""File mode: a WAV of the user in, a WAV of the model out, through the same `Stream`
as live mode, as fast as the machine allows.

Any WAV goes in (PCM 8/16/24/32-bit or float, any rate, any channels): it is mixed down
to mono and resampled to 24 kHz. The output is 24 kHz mono 16-bit and exactly as long as
the input: frame i of the output is what the model said while frame i was heard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

from ..errors import MoshivisError
from ..progress import Counter, Steps
from ..stream import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE, Stream
from .opening import load_picture, open_stream, opening_steps
from .options import AppOptions
from .resample import Resampler
from .transcript import Transcript, TranscriptWriter
from .wav import WavReader, WavWriter


class InputFrames:
    """A WAV file as 24 kHz mono frames, read and resampled block by block.

    `samples` is the input's length at 24 kHz; the last frame is zero-padded.
    """

    BLOCK = 1 << 16

    def __init__(self, path: str | Path):
        self.reader = WavReader(path)
        rate = self.reader.sample_rate
        self.resampler = Resampler(rate, SAMPLE_RATE)
        self.samples = round(self.reader.frames * SAMPLE_RATE / rate)
        self.frames = math.ceil(self.samples / FRAME_SIZE)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """(frame of FRAME_SIZE samples, how many of them are real audio)."""
        pending = np.zeros(0, dtype=np.float32)
        flushed = False
        for i in range(self.frames):
            while len(pending) < FRAME_SIZE and not flushed:
                block = self.reader.read(self.BLOCK)
                if len(block):
                    more = self.resampler.process(block.mean(axis=1))
                else:
                    more = self.resampler.flush()
                    flushed = True
                pending = np.concatenate([pending, more])
            valid = min(FRAME_SIZE, self.samples - i * FRAME_SIZE)
            frame = np.zeros(FRAME_SIZE, dtype=np.float32)
            take = min(valid, len(pending))
            frame[:take] = pending[:take]
            pending = pending[FRAME_SIZE:]
            yield frame, valid

    def close(self) -> None:
        self.reader.close()


def _writable(path: Path, what: str) -> None:
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise MoshivisError(f"cannot write {what} {path}: directory {parent} does not exist")


def process(stream: Stream, frames: InputFrames, out: WavWriter, transcript: Transcript,
            console: Console) -> int:
    """Runs every frame through the stream; returns the frames done (an interrupt leaves
    `out` and `transcript` holding everything before it)."""
    t0 = time.perf_counter()
    total = frames.frames
    done = 0
    with Counter(console, unit="frames", quarters=True) as bar:
        task = bar.add("model", total)
        for i, (frame, valid) in enumerate(frames):
            result = stream.step(frame)
            out.write(result.pcm[:valid])
            transcript.add(result.piece, i * FRAME_SECONDS, result.gate, result.step)
            done = i + 1
            speed = done * FRAME_SECONDS / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, done, rate=f"{speed:.1f}x real time")
    return done


def run_file(opts: AppOptions, console: Console) -> int:
    out_path = opts.output_wav
    transcript_path = opts.transcript
    _writable(out_path, "the output")
    if transcript_path is not None:
        _writable(transcript_path, "the transcript")
    frames = InputFrames(opts.input_wav)
    try:
        picture = load_picture(opts.image) if opts.image else None
        with Steps(console, opening_steps(picture is not None, picture is not None)) as steps:
            opened = open_stream(opts.model, steps, picture is not None, opts.image, picture)
        return _run(opts, console, opened.stream, frames, out_path, transcript_path)
    finally:
        frames.close()


def _run(opts: AppOptions, console: Console, stream: Stream, frames: InputFrames,
         out_path: Path, transcript_path: Path | None) -> int:
    writer = None
    if transcript_path is not None:
        writer = TranscriptWriter(transcript_path, {
            "sample_rate": SAMPLE_RATE, "frame_seconds": FRAME_SECONDS,
            "input": opts.input_wav, "output": str(out_path), "image": opts.image})
    transcript = Transcript(keep=1, on_word=writer.write_word if writer else None)
    t0 = time.perf_counter()
    interrupted = False
    with WavWriter(out_path, SAMPLE_RATE, 1) as out:
        try:
            done = process(stream, frames, out, transcript, console)
        except KeyboardInterrupt:
            interrupted = True
            done = stream.frames
        samples = out.frames
    elapsed = time.perf_counter() - t0
    seconds = samples / SAMPLE_RATE
    if writer is not None:
        writer.close(transcript, {"duration_s": round(seconds, 3)})
    speed = seconds / max(elapsed, 1e-9)
    console.print(f"wrote {out_path} ({seconds:.2f} s at {SAMPLE_RATE} Hz, {done} frames in "
                  f"{elapsed:.1f} s: {speed:.1f}x real time)", highlight=False)
    if transcript_path is not None:
        console.print(f"wrote {transcript_path} ({transcript.count} words)", highlight=False)
    text = transcript.text
    if text:
        console.print(f"model said: {text[:300]}{' ...' if len(text) > 300 else ''}",
                      highlight=False)
    if interrupted:
        raise KeyboardInterrupt
    return 0
