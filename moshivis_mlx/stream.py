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

from .generate import Generator
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
    encode_ms: float
    model_ms: float
    decode_ms: float

    @property
    def latency_ms(self) -> float:
        return self.encode_ms + self.model_ms + self.decode_ms


class Stream:
    """Mimi encoder + generator + Mimi decoder, streaming.

    stream = Stream(mimi, gen, tokenizer)
    out = stream.step(pcm_frame)       # out.pcm, out.piece, out.gate, out.latency_ms
    """

    def __init__(self, mimi, gen: Generator, tokenizer: TextTokenizer | None = None):
        self.geometry = FrameGeometry.of(mimi.cfg)
        self.mimi = mimi
        self.gen = gen
        self.tokenizer = tokenizer
        self.encoder = mimi.streaming_encoder(gen.num_user_codes)
        self.decoder = mimi.streaming_decoder()
        self.frames = 0
        self._silence = np.zeros(self.geometry.frame_size, dtype=np.float32)

    def set_image(self, tokens: mx.array | None) -> None:
        """Switch images mid-conversation (None: no image); the conversation goes on."""
        self.gen.set_image(tokens, reset=False)

    def reset(self) -> None:
        """Restart the conversation: codec and model state (the image is kept)."""
        self.encoder.reset()
        self.decoder.reset()
        self.gen.reset()

    def step(self, pcm: np.ndarray) -> StepResult:
        """One frame of the user's audio (FRAME_SIZE float32 samples in [-1, 1])."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.shape[0] != self.geometry.frame_size:
            raise ValueError(f"a frame is {self.geometry.frame_size} samples, got {pcm.shape[0]}")

        t0 = time.perf_counter()
        user_codes = np.asarray(self.encoder.step(pcm)).reshape(-1)
        t1 = time.perf_counter()
        out = self.gen.step(user_codes)
        t2 = time.perf_counter()
        if out is None:  # the acoustic delay: the model's first frame comes one step later
            voice, token, piece, gate = self._silence, None, None, None
        else:
            voice = np.asarray(self.decoder.step(np.asarray(out.audio_codes, dtype=np.int32)))
            voice = voice.reshape(-1).astype(np.float32, copy=False)
            token, gate = out.text_token, out.gate
            piece = self.tokenizer.piece(token) if self.tokenizer is not None else None
        t3 = time.perf_counter()

        result = StepResult(step=self.frames, pcm=voice, text_token=token, piece=piece,
                            gate=gate, encode_ms=1e3 * (t1 - t0), model_ms=1e3 * (t2 - t1),
                            decode_ms=1e3 * (t3 - t2))
        self.frames += 1
        return result
