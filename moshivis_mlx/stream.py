"""The real-time data path, one 80 ms frame at a time:

    frame in (1920 samples, 24 kHz)
      -> Mimi streaming encoder   -> the user's 8 codes
      -> Generator.step           -> the model's text token, 8 codes, cross-attention gate
      -> Mimi streaming decoder   -> frame out (1920 samples of the model's voice)

Live mode and file mode both call `Stream.step`; neither this module nor the models know
about devices, threads or the terminal. Every stage is evaluated before it is timed, so
the latencies are what the frame really cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .generate import Generator, PendingStep
from .models.mimi import MimiConfig
from .text import TextTokenizer


@dataclass(frozen=True)
class FrameGeometry:
    """The audio a frame holds, as the codec defines it."""

    sample_rate: int
    frame_size: int

    @classmethod
    def of(cls, cfg: MimiConfig) -> FrameGeometry:
        return cls(cfg.sample_rate, cfg.frame_size)

    @property
    def frame_seconds(self) -> float:
        """The duration of a frame: the real-time budget of one whole frame."""
        return self.frame_size / self.sample_rate

    @property
    def budget_ms(self) -> float:
        return 1e3 * self.frame_seconds


RELEASED = FrameGeometry.of(MimiConfig())
"""The released Mimi's frames (24 kHz, 1920 samples: 80 ms). Audio devices are opened with
it before a model is loaded; a stream checks its codec agrees."""


@dataclass
class StepResult:
    """What one frame in gave."""

    step: int
    """Frames processed by this stream before this one (not reset by `reset`)."""
    pcm: np.ndarray
    """One frame of float32 samples of the model's voice (silence until it has spoken)."""
    text_token: int | None
    piece: str | None
    """The text piece of this frame ("▁" starts a word), None for padding."""
    gate: float | None
    """Mean cross-attention gate when the text token was produced (None: no image yet)."""
    latency_ms: float
    """From the frame given to its result on the host: what the whole frame cost."""
    host_ms: float = 0.0
    """Of which the host spent building the frame's graph (the device may be busy with
    the previous frame meanwhile)."""
    encode_ms: float | None = None
    model_ms: float | None = None
    decode_ms: float | None = None
    """Per stage: measured by the serial path only (each stage evaluated on its own)."""


class PendingFrame:
    """A submitted frame; `result()` waits for it (frames are collected in order)."""

    def __init__(self, stream: Stream, index: int, started: float, host_ms: float,
                 step, voice: mx.array | None):
        self._stream = stream
        self.index = index
        self._started = started
        self._host_ms = host_ms
        self._step = step
        self._voice = voice
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            out = self._step.result()  # waits for the frame's one evaluation
            if out is None:  # the acoustic delay: the model's first frame comes a step later
                voice, token, piece, gate = self._stream.silence, None, None, None
            else:
                voice = np.array(self._voice).astype(np.float32, copy=False)
                token, gate = out.text_token, out.gate
                piece = self._stream.piece(token)
            latency = 1e3 * (time.perf_counter() - self._started)
            self._result = StepResult(step=self.index, pcm=voice, text_token=token,
                                      piece=piece, gate=gate, latency_ms=latency,
                                      host_ms=self._host_ms)
            self._voice = None
        return self._result


CODEC_DEVICES = ("default", "cpu", "rust")
RUST = "rust"


def codec_device(name: str) -> mx.Device | str | None:
    """Where Mimi runs, by name: "default" (with the language model), "cpu" (MLX's Mimi on
    the CPU beside it) or "rust" (Kyutai's own Rust Mimi on the CPU, `rust_mimi.py`, as
    Kyutai's clients run it). `moshivis-bench --codec-device` tells which is faster on a
    given machine."""
    if name not in CODEC_DEVICES:
        raise ValueError(f"unknown codec device {name!r} ({', '.join(CODEC_DEVICES)})")
    return {"cpu": mx.cpu, RUST: RUST}.get(name)


class Stream:
    """Mimi encoder + generator + Mimi decoder, streaming.

    stream = Stream(mimi, gen, tokenizer)
    out = stream.step(pcm_frame)       # out.pcm, out.piece, out.gate, out.latency_ms

    A frame is one lazy graph — samples in, the user's codes, the model's step, its codes,
    samples out — evaluated once: the codes flow on the device from stage to stage and the
    host reads back only the frame's results. `submit` returns at once, so a caller that
    has the next frame (file mode) submits it before collecting this one and the host
    builds frame n+1 while the device computes frame n.

    `codec_device=mx.cpu` runs Mimi on the CPU while the language model runs on the
    default device; `codec_device="rust"` runs Kyutai's Rust Mimi on the CPU instead (what
    Kyutai's clients do; the codec is then outside the graph: the voice waits for the
    step). `serial=True` is the reference path: each stage evaluated on its own, and timed.
    """

    def __init__(self, mimi, gen: Generator, tokenizer: TextTokenizer | None = None,
                 codec_device: mx.Device | str | None = None, serial: bool = False,
                 compiled: bool = True):
        self.geometry = FrameGeometry.of(mimi.cfg)
        self.mimi = mimi
        self.gen = gen
        self.tokenizer = tokenizer
        self.serial = serial
        self.codec_device = codec_device
        # mlx-lm's habit: the model's work on a stream of its own (made on this thread:
        # MLX streams belong to the thread that creates them).
        self.generation_stream = mx.new_stream(mx.default_device())
        if codec_device == RUST:
            from .rust_mimi import RustMimi

            rust = RustMimi(mimi, gen.num_user_codes)
            self.encoder, self.decoder = rust.encoder, rust.decoder
            self.codec_stream = self.generation_stream
        else:
            self.codec_stream = mx.new_stream(codec_device) if codec_device is not None \
                else self.generation_stream
            self.encoder = mimi.streaming_encoder(gen.num_user_codes, compiled=compiled)
            self.decoder = mimi.streaming_decoder(compiled=compiled)
        self.frames = 0
        self.silence = np.zeros(self.geometry.frame_size, dtype=np.float32)

    def piece(self, token: int) -> str | None:
        return self.tokenizer.piece(token) if self.tokenizer is not None else None

    def set_image(self, tokens: mx.array | None) -> None:
        """Switch images mid-conversation (None: no image); the conversation goes on."""
        with mx.stream(self.generation_stream):
            self.gen.set_image(tokens, reset=False)

    def reset(self) -> None:
        """Restart the conversation: codec and model state (the image is kept)."""
        self.encoder.reset()
        self.decoder.reset()
        self.gen.reset()

    def _frame(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.shape[0] != self.geometry.frame_size:
            raise ValueError(f"a frame is {self.geometry.frame_size} samples, got {pcm.shape[0]}")
        return pcm

    def submit(self, pcm: np.ndarray, force_text: int | None = None,
               force_audio: np.ndarray | None = None) -> PendingFrame:
        """One frame of the user's audio (float32 samples in [-1, 1]), built as one graph
        and evaluated once, asynchronously. `force_text` / `force_audio` replace the
        model's own tokens of this step (words typed into its text stream)."""
        pcm = self._frame(pcm)
        if self.serial:
            return _Done(self._serial_step(pcm, force_text, force_audio))
        t0 = time.perf_counter()
        step, voice, state = self.build(pcm, force_text, force_audio)
        mx.async_eval(step.outputs, voice, state)  # the frame's one evaluation
        host_ms = 1e3 * (time.perf_counter() - t0)
        pending = PendingFrame(self, self.frames, t0, host_ms, step, voice)
        self.frames += 1
        return pending

    def build(self, pcm: np.ndarray, force_text: int | None = None,
              force_audio: np.ndarray | None = None
              ) -> tuple[PendingStep, mx.array | None, list[mx.array]]:
        """The frame's graph, not evaluated: the model's step, the voice (None while the
        acoustic delay holds it back) and the codec's new state. What `submit` evaluates,
        and what the benchmark counts the kernels of."""
        with mx.stream(self.codec_stream):
            user_codes = self.encoder(mx.array(pcm))
        with mx.stream(self.generation_stream):
            step = self.gen.step_async(user_codes, force_text, force_audio, evaluate=False)
        voice = None
        if step.tokens is not None:
            with mx.stream(self.codec_stream):
                voice = self.decoder(step.tokens[0, 1:])
        state = self.encoder.state_arrays() + (
            self.decoder.state_arrays() if voice is not None else [])
        return step, voice, state

    def step(self, pcm: np.ndarray) -> StepResult:
        """One frame in, its result out (live mode: the lowest latency)."""
        return self.submit(pcm).result()

    def _serial_step(self, pcm: np.ndarray, force_text: int | None = None,
                     force_audio: np.ndarray | None = None) -> StepResult:
        """The reference path: encoder, generator and decoder each evaluated and timed."""
        t0 = time.perf_counter()
        user_codes = np.asarray(self.encoder.step(pcm)).reshape(-1)
        t1 = time.perf_counter()
        out = self.gen.step(user_codes, force_text, force_audio)
        t2 = time.perf_counter()
        if out is None:
            voice, token, piece, gate = self.silence, None, None, None
        else:
            voice = np.asarray(self.decoder.step(np.asarray(out.audio_codes, dtype=np.int32)))
            voice = voice.reshape(-1).astype(np.float32, copy=False)
            token, gate = out.text_token, out.gate
            piece = self.piece(token)
        t3 = time.perf_counter()
        result = StepResult(step=self.frames, pcm=voice, text_token=token, piece=piece,
                            gate=gate, latency_ms=1e3 * (t3 - t0), encode_ms=1e3 * (t1 - t0),
                            model_ms=1e3 * (t2 - t1), decode_ms=1e3 * (t3 - t2))
        self.frames += 1
        return result


class _Done:
    """A frame of the serial path: already computed."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result
