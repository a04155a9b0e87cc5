"""Mimi, Kyutai's streaming speech codec: 24 kHz mono audio <-> 12.5 Hz frames of codes.

    audio --SEANet encoder--> 25 Hz latents --transformer--> --conv, stride 2--> 12.5 Hz
          --split RVQ--> codes [K, T]
    codes --RVQ decode--> --depthwise transposed conv, stride 2--> 25 Hz --transformer-->
          --SEANet decoder--> audio

Everything is causal, so one 1920-sample frame (80 ms) in gives one frame of codes out,
and back. Two ways to run it:

    codes = mimi.encode(pcm)            # whole clip, [K, T]
    pcm = mimi.decode(codes)

    enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()
    codes = enc.step(frame)             # 1920 samples -> K codes
    frame = dec.step(codes)             # K codes -> 1920 samples

Both give the same codes and samples. The clip API takes NumPy or MLX arrays and returns
the same kind.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import RingKVCache
from .config import ConfigBase, ConfigError, check_range
from .conv import CausalConv1d, CausalConvTranspose1d, ConvState, ConvTransposeState
from .quantizer import QuantizerConfig, SplitResidualVectorQuantizer
from .seanet import SeanetConfig, SEANetDecoder, SEANetEncoder, conv_states
from .transformer import MAX_WIDTH, Transformer, TransformerConfig

Array = Any  # np.ndarray or mx.array


def _released_transformer() -> TransformerConfig:
    return TransformerConfig(
        d_model=512, num_heads=8, num_layers=8, ffn_hidden=2048, ffn="gelu",
        norm="layer_norm", norm_eps=1e-5, bias=False, causal=True, context=250, rope=True,
        max_period=10000.0, layer_scale=True)


@dataclass
class MimiConfig(ConfigBase):
    """Every hyper-parameter of Mimi; the defaults are Kyutai's released model."""

    nested: ClassVar[dict[str, type[ConfigBase]]] = {
        "seanet": SeanetConfig, "quantizer": QuantizerConfig, "transformer": TransformerConfig}

    sample_rate: int = 24000
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: TransformerConfig = field(default_factory=_released_transformer)
    """Shared by the encoder-side and the decoder-side transformer."""

    @property
    def frame_size(self) -> int:
        """Audio samples per frame of codes (1920)."""
        return round(self.sample_rate / self.frame_rate)

    @property
    def encoder_frame_rate(self) -> float:
        """Rate of the SEANet latents and the transformers (25 Hz)."""
        return self.sample_rate / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        """Transformer positions per frame (2)."""
        return round(self.encoder_frame_rate / self.frame_rate)

    def check(self, where: str = "") -> None:
        check_range(where + "sample_rate", self.sample_rate, 1000, 192000)
        check_range(where + "frame_rate", self.frame_rate, 1.0, 1000.0)
        s, q = self.seanet, self.quantizer
        check_range(where + "seanet.dimension", s.dimension, 1, MAX_WIDTH)
        check_range(where + "seanet.n_filters", s.n_filters, 1, 4096)
        check_range(where + "seanet.n_residual_layers", s.n_residual_layers, 0, 16)
        if not 1 <= len(s.ratios) <= 8:
            raise ConfigError(f"{where}seanet.ratios: expected 1 to 8 ratios, got {s.ratios}")
        for i, r in enumerate(s.ratios):
            check_range(f"{where}seanet.ratios[{i}]", r, 1, 64)
        for key in ("kernel_size", "residual_kernel_size", "last_kernel_size"):
            check_range(f"{where}seanet.{key}", getattr(s, key), 1, 64)
        check_range(where + "seanet.dilation_base", s.dilation_base, 1, 16)
        check_range(where + "seanet.compress", s.compress, 1, s.dimension)
        check_range(where + "quantizer.dimension", q.dimension, 1, MAX_WIDTH)
        check_range(where + "quantizer.n_q", q.n_q, 2, 64)
        check_range(where + "quantizer.n_q_semantic", q.n_q_semantic, 1, q.n_q - 1)
        check_range(where + "quantizer.bins", q.bins, 2, 1 << 16)
        self.transformer.check(where + "transformer.")
        try:
            self.validate()
        except ValueError as e:
            raise ConfigError(f"{where.rstrip('.') or 'mimi'}: {e}") from None

    def validate(self) -> None:
        s, q, t = self.seanet, self.quantizer, self.transformer
        problems = []
        if s.channels != 1:
            problems.append(f"Mimi is mono, seanet.channels is {s.channels}")
        if self.frame_size * self.frame_rate != self.sample_rate:
            problems.append(f"frame rate {self.frame_rate} does not divide the sample rate "
                            f"{self.sample_rate}")
        if self.downsample_stride < 2 or (
                self.downsample_stride * s.hop_length != self.frame_size):
            problems.append(f"the frame size {self.frame_size} must be a multiple (>= 2) of "
                            f"the SEANet hop {s.hop_length}")
        if t.d_model != s.dimension:
            problems.append(f"transformer d_model {t.d_model} != seanet dimension {s.dimension} "
                            f"(projected transformers are not supported)")
        if (q.input_dimension, q.output_dimension) != (s.dimension, s.dimension):
            problems.append(f"quantizer input/output dimensions must be {s.dimension}")
        if t.context is None:
            problems.append("the transformers need a context (window) size")
        if problems:
            raise ValueError("invalid Mimi config: " + "; ".join(problems))

    # -- presets ----------------------------------------------------------------------

    @classmethod
    def released(cls) -> MimiConfig:
        """Kyutai's released Mimi (tokenizer-e351c8d8-checkpoint125), 32 codebooks."""
        return cls()

    @classmethod
    def tiny(cls, context: int = 250) -> MimiConfig:
        """Mimi's exact structure (24 kHz, 12.5 Hz, ratios 8-6-5-4, split RVQ) at a tiny
        width, for tests."""
        return cls(
            seanet=SeanetConfig(dimension=32, n_filters=8),
            quantizer=QuantizerConfig(dimension=16, n_q=10, bins=64, input_dimension=32,
                                      output_dimension=32),
            transformer=TransformerConfig(
                d_model=32, num_heads=4, num_layers=2, ffn_hidden=64, ffn="gelu",
                norm="layer_norm", norm_eps=1e-5, causal=True, context=context, rope=True,
                layer_scale=True),
        )


class Mimi(nn.Module):
    """The codec. `num_codebooks` is how many codes per frame `encode` gives by default
    (Moshi uses 8 of the 32)."""

    def __init__(self, cfg: MimiConfig, num_codebooks: int = 8):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, s = cfg.seanet.dimension, cfg.downsample_stride
        self.encoder = SEANetEncoder(cfg.seanet)
        self.encoder_transformer = Transformer(cfg.transformer)
        # 25 -> 12.5 Hz: a full conv whose left padding repeats the stream's first latent.
        self.downsample = CausalConv1d(d, d, 2 * s, stride=s, bias=False, pad_mode="replicate")
        self.quantizer = SplitResidualVectorQuantizer(cfg.quantizer)
        # 12.5 -> 25 Hz: depthwise (Kyutai's released model has groups = channels).
        self.upsample = CausalConvTranspose1d(d, d, 2 * s, stride=s, groups=d, bias=False)
        self.decoder_transformer = Transformer(cfg.transformer)
        self.decoder = SEANetDecoder(cfg.seanet)
        self.num_codebooks = self._check_num_codebooks(num_codebooks)

    # -- facts --------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def total_codebooks(self) -> int:
        return self.cfg.quantizer.n_q

    @property
    def cardinality(self) -> int:
        return self.cfg.quantizer.bins

    def _check_num_codebooks(self, k: int | None) -> int:
        k = self.num_codebooks if k is None else int(k)
        lo, hi = self.cfg.quantizer.n_q_semantic, self.total_codebooks
        if not lo <= k <= hi:
            raise ValueError(f"num_codebooks must be in [{lo}, {hi}], got {k}")
        return k

    # -- the two halves, on [1, N, 1] audio and [1, K, T] codes --------------------------

    def encode_latent(
        self,
        x: mx.array,
        seanet_state: list | None = None,
        caches: list[RingKVCache] | None = None,
        downsample_state: ConvState | None = None,
    ) -> mx.array:
        """[B, N, 1] float32, N a whole number of frames -> the unquantized 12.5 Hz latent
        [B, N / frame_size, dimension].

        Without states this is a whole clip starting from silence; with them, the next
        chunk of a stream.
        """
        h = self.encoder(x, seanet_state)
        h = self.encoder_transformer(h, caches)
        return self.downsample(h, downsample_state)

    def encode_audio(
        self,
        x: mx.array,
        num_codebooks: int,
        seanet_state: list | None = None,
        caches: list[RingKVCache] | None = None,
        downsample_state: ConvState | None = None,
    ) -> mx.array:
        """As `encode_latent`, then quantized: codes [B, K, N / frame_size] int32."""
        h = self.encode_latent(x, seanet_state, caches, downsample_state)
        return self.quantizer.encode(h, num_codebooks)

    def decode_codes(
        self,
        codes: mx.array,
        upsample_state: ConvTransposeState | None = None,
        caches: list[RingKVCache] | None = None,
        seanet_state: list | None = None,
    ) -> mx.array:
        """codes [B, K, T] int -> [B, T * frame_size, 1] float32."""
        h = self.quantizer.decode(codes)
        h = self.upsample(h, upsample_state)
        h = self.decoder_transformer(h, caches)
        return self.decoder(h, seanet_state)

    # -- whole clips ----------------------------------------------------------------------

    def encode(self, pcm: Array, num_codebooks: int | None = None) -> Array:
        """Mono audio -> codes [K, T] (int32), T = ceil(samples / frame_size).

        `pcm`: [N], [1, N] or [1, 1, N]; float in [-1, 1] or int16; NumPy or MLX (the codes
        come back as the same kind). A partial last frame is padded with zeros (with a
        warning): Mimi works in whole frames. The sample rate must be `sample_rate`.
        """
        k = self._check_num_codebooks(num_codebooks)
        x, is_mx = audio_input(pcm)
        x = pad_to_frames(x, self.frame_size)
        codes = self.encode_audio(x.reshape(1, -1, 1), k)[0]
        mx.eval(codes)
        return codes if is_mx else np.array(codes)

    def decode(self, codes: Array) -> Array:
        """Codes [K, T] or [1, K, T] -> float32 audio [T * frame_size], NumPy or MLX as given."""
        c, is_mx = self._codes_input(codes)
        pcm = self.decode_codes(c)[0, :, 0]
        mx.eval(pcm)
        return pcm if is_mx else np.array(pcm)

    def _codes_input(self, codes: Array, frame: bool = False) -> tuple[mx.array, bool]:
        """Checked codes as [1, K, T] int32. `frame`: one frame, [K] or [K, 1]."""
        is_mx = isinstance(codes, mx.array)
        c = codes if is_mx else np.asarray(codes)
        shape = tuple(c.shape)
        if frame:
            ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
            want = "[K] or [K, 1]"
        else:
            ok = len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)
            want = "[K, T] or [1, K, T]"
        if not ok or 0 in shape:
            raise ValueError(f"codes must be {want}, got shape {list(shape)}")
        integer = (mx.issubdtype(c.dtype, mx.integer) if is_mx
                   else np.issubdtype(c.dtype, np.integer))
        if not integer:
            raise ValueError(f"codes must be integers, got {c.dtype}")
        k = shape[-2] if not frame else shape[0]
        lo, hi = self.cfg.quantizer.n_q_semantic, self.total_codebooks
        if not lo <= k <= hi:
            raise ValueError(f"{k} codebooks given; Mimi decodes {lo} to {hi}")
        c = mx.array(c) if not is_mx else c
        c = c.astype(mx.int32).reshape(1, k, -1)
        if c.min().item() < 0 or c.max().item() >= self.cardinality:
            raise ValueError(f"codes must be in [0, {self.cardinality})")
        return c, is_mx

    # -- streams ----------------------------------------------------------------------------

    def streaming_encoder(self, num_codebooks: int | None = None,
                          compiled: bool = True) -> StreamingEncoder:
        return StreamingEncoder(self, self._check_num_codebooks(num_codebooks), compiled)

    def streaming_decoder(self, compiled: bool = True) -> StreamingDecoder:
        return StreamingDecoder(self, compiled)


class _Streaming:
    """What both directions share: the stream's state (every conv's context, the ring KV
    caches of the transformer's window), allocated once with fixed shapes and updated in
    place, and the step compiled once over it (`compiled=False`: traced every call)."""

    def __init__(self, mimi: Mimi, transformer: Transformer, compiled: bool):
        self.mimi = mimi
        self.caches = transformer.make_cache(batch=1, chunk=mimi.cfg.downsample_stride)
        self.convs = conv_states(self._conv_state())
        self.compiled = compiled
        state = self.state_lists()
        self._fn = mx.compile(self._step, inputs=state, outputs=state) if compiled \
            else self._step

    def _conv_state(self) -> list:
        raise NotImplementedError

    def _step(self, x: mx.array) -> mx.array:
        raise NotImplementedError

    def state_lists(self) -> list[list[mx.array]]:
        return [c.state for c in self.convs] + [c.state for c in self.caches]

    def state_arrays(self) -> list[mx.array]:
        return [a for lst in self.state_lists() for a in lst]

    def reset(self) -> None:
        """Start a new stream (in place: the compiled step keeps its state)."""
        for c in self.convs:
            c.reset()
        for c in self.caches:
            c.reset()


class StreamingEncoder(_Streaming):
    """Audio in, codes out, one frame (80 ms) at a time.

    `enc(frame)` (an MLX array of `frame_size` samples) returns the codes [K] lazily, as
    part of a larger graph (the stream's frame evaluates everything once); `enc.step(pcm)`
    is the same, evaluated, NumPy or MLX in and out. Nothing grows.
    """

    def __init__(self, mimi: Mimi, num_codebooks: int, compiled: bool = True):
        self.num_codebooks = num_codebooks
        mimi.quantizer.prepare()
        super().__init__(mimi, mimi.encoder_transformer, compiled)

    def _conv_state(self) -> list:
        self.seanet_state = self.mimi.encoder.new_state()
        self.downsample_state = self.mimi.downsample.new_state()
        return [self.seanet_state, self.downsample_state]

    def _step(self, x: mx.array) -> mx.array:
        codes = self.mimi.encode_audio(x.reshape(1, -1, 1), self.num_codebooks,
                                       self.seanet_state, self.caches, self.downsample_state)
        return codes.reshape(-1)

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape != (self.mimi.frame_size,):
            raise ValueError(f"a frame is {self.mimi.frame_size} samples, got {x.shape}")
        return self._fn(x.astype(mx.float32))

    def step(self, pcm: Array) -> Array:
        """`frame_size` samples (float or int16, NumPy or MLX) -> [K] int32 codes, same kind."""
        x, is_mx = audio_input(pcm)
        codes = self(x)
        mx.eval(codes, self.state_arrays())
        return codes if is_mx else np.array(codes)


class StreamingDecoder(_Streaming):
    """Codes in, audio out, one frame at a time (the mirror of `StreamingEncoder`):
    `dec(codes)` lazily on device codes [K], `dec.step(codes)` evaluated and checked."""

    def __init__(self, mimi: Mimi, compiled: bool = True):
        super().__init__(mimi, mimi.decoder_transformer, compiled)

    def _conv_state(self) -> list:
        self.upsample_state = self.mimi.upsample.new_state()
        self.seanet_state = self.mimi.decoder.new_state()
        return [self.upsample_state, self.seanet_state]

    def _step(self, codes: mx.array) -> mx.array:
        pcm = self.mimi.decode_codes(codes.reshape(1, -1, 1), self.upsample_state,
                                     self.caches, self.seanet_state)
        return pcm.reshape(-1)

    def __call__(self, codes: mx.array) -> mx.array:
        """Device codes [K] (from the generator: trusted, nothing is read back)."""
        lo, hi = self.mimi.cfg.quantizer.n_q_semantic, self.mimi.total_codebooks
        if codes.ndim != 1 or not lo <= codes.shape[0] <= hi:
            raise ValueError(f"codes must be [K] with {lo} <= K <= {hi}, got {codes.shape}")
        return self._fn(codes.astype(mx.int32))

    def step(self, codes: Array) -> Array:
        """[K] (or [K, 1]) codes -> `frame_size` float32 samples, NumPy or MLX as given."""
        c, is_mx = self.mimi._codes_input(codes, frame=True)
        pcm = self(c.reshape(-1))
        mx.eval(pcm, self.state_arrays())
        return pcm if is_mx else np.array(pcm)


# -- audio input ------------------------------------------------------------------------------

def audio_input(pcm: Array) -> tuple[mx.array, bool]:
    """Mono samples as a 1-D float32 MLX array, and whether the input was MLX.

    Accepts [N], [1, N] or [1, 1, N]; float (any width, in [-1, 1]) or int16 (scaled by
    1/32768). Anything with more than one channel is refused: which channel, or what mix,
    is the caller's choice.
    """
    is_mx = isinstance(pcm, mx.array)
    a = pcm if is_mx else np.asarray(pcm)
    shape = tuple(a.shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"audio must be [N], [1, N] or [1, 1, N], got shape {list(shape)}")
    if any(n != 1 for n in shape[:-1]):
        raise ValueError(f"Mimi takes mono audio; mix down or pick a channel "
                         f"(got shape {list(shape)}; expected [N], [1, N] or [1, 1, N])")
    if shape[-1] == 0:
        raise ValueError("empty audio")
    if is_mx:
        if a.dtype == mx.int16:
            a = a.astype(mx.float32) / 32768.0
        elif mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(mx.float32)
        else:
            raise ValueError(f"audio samples must be float or int16, got {a.dtype}")
    else:
        if a.dtype == np.int16:
            a = a.astype(np.float32) / 32768.0
        elif np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        else:
            raise ValueError(f"audio samples must be float or int16, got {a.dtype}")
        a = mx.array(a)
    return a.reshape(-1), is_mx


def pad_to_frames(x: mx.array, frame_size: int) -> mx.array:
    """Zero-pads 1-D audio to whole frames, warning when it does."""
    n = x.shape[0]
    pad = -n % frame_size
    if pad:
        warnings.warn(
            f"Mimi: {n} samples is not a whole number of {frame_size}-sample frames; "
            f"padded with {pad} zeros at the end ({(n + pad) // frame_size} frames)",
            stacklevel=3)
        x = mx.concatenate([x, mx.zeros((pad,), dtype=x.dtype)])
    return x
