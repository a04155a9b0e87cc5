"""SEANet: Mimi's convolutional encoder (waveform -> 25 Hz latents) and decoder (back).

Every conv is causal, so both run frame by frame. Each module's `new_state()` gives the
streaming state of all its convs (nested lists mirroring the module); passing no state
processes a whole clip from silence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigBase
from .conv import CausalConv1d, CausalConvTranspose1d, ConvState, ConvTransposeState, elu


@dataclass
class SeanetConfig(ConfigBase):
    """Kyutai's SEANet settings that Mimi uses (ELU, causal, no norm, true skip)."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    """Decoder (upsampling) order; the encoder uses them reversed."""
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)



class ResidualUnit(nn.Module):
    """x + conv1x1(elu(conv_k(elu(x)))), the inner width reduced by `compress`."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.conv1 = CausalConv1d(dim, hidden, kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(hidden, dim, 1)

    def new_state(self, batch: int = 1) -> list[ConvState]:
        return [self.conv1.new_state(batch), self.conv2.new_state(batch)]

    def __call__(self, x: mx.array, state: list[ConvState] | None = None) -> mx.array:
        s1, s2 = state if state is not None else (None, None)
        h = self.conv1(elu(x), s1)
        h = self.conv2(elu(h), s2)
        return x + h


def _residual_units(cfg: SeanetConfig, dim: int) -> list[ResidualUnit]:
    return [
        ResidualUnit(dim, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress)
        for j in range(cfg.n_residual_layers)
    ]


class EncoderBlock(nn.Module):
    """Residual units, then a strided conv: time divided by `ratio`, width doubled."""

    def __init__(self, cfg: SeanetConfig, dim: int, ratio: int):
        super().__init__()
        self.residuals = _residual_units(cfg, dim)
        self.downsample = CausalConv1d(dim, 2 * dim, 2 * ratio, stride=ratio)

    def new_state(self, batch: int = 1) -> list:
        return [r.new_state(batch) for r in self.residuals] + [self.downsample.new_state(batch)]

    def __call__(self, x: mx.array, state: list | None = None) -> mx.array:
        state = state if state is not None else [None] * (len(self.residuals) + 1)
        for r, s in zip(self.residuals, state):
            x = r(x, s)
        return self.downsample(elu(x), state[-1])


class DecoderBlock(nn.Module):
    """A transposed conv (time multiplied by `ratio`, width halved), then residual units."""

    def __init__(self, cfg: SeanetConfig, dim: int, ratio: int):
        super().__init__()
        self.upsample = CausalConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)
        self.residuals = _residual_units(cfg, dim // 2)

    def new_state(self, batch: int = 1) -> list:
        return [self.upsample.new_state(batch)] + [r.new_state(batch) for r in self.residuals]

    def __call__(self, x: mx.array, state: list | None = None) -> mx.array:
        state = state if state is not None else [None] * (len(self.residuals) + 1)
        x = self.upsample(elu(x), state[0])
        for r, s in zip(self.residuals, state[1:]):
            x = r(x, s)
        return x


class _ConvStack(nn.Module):
    """conv_in -> blocks -> ELU -> conv_out, each carrying its own streaming state."""

    def new_state(self, batch: int = 1) -> list:
        return [self.conv_in.new_state(batch), [b.new_state(batch) for b in self.blocks],
                self.conv_out.new_state(batch)]

    def __call__(self, x: mx.array, state: list | None = None) -> mx.array:
        s_in, s_blocks, s_out = state if state is not None else (None, None, None)
        x = self.conv_in(x, s_in)
        for i, block in enumerate(self.blocks):
            x = block(x, None if s_blocks is None else s_blocks[i])
        return self.conv_out(elu(x), s_out)


class SEANetEncoder(_ConvStack):
    """[B, T, channels] audio -> [B, T / hop_length, dimension]."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        nf = cfg.n_filters
        self.conv_in = CausalConv1d(cfg.channels, nf, cfg.kernel_size)
        self.blocks = [
            EncoderBlock(cfg, nf * 2**i, ratio) for i, ratio in enumerate(reversed(cfg.ratios))
        ]
        width = nf * 2 ** len(cfg.ratios)
        self.conv_out = CausalConv1d(width, cfg.dimension, cfg.last_kernel_size)


class SEANetDecoder(_ConvStack):
    """[B, T, dimension] latents -> [B, T * hop_length, channels] audio."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        nf = cfg.n_filters
        width = nf * 2 ** len(cfg.ratios)
        self.conv_in = CausalConv1d(cfg.dimension, width, cfg.kernel_size)
        self.blocks = [
            DecoderBlock(cfg, width // 2**i, ratio) for i, ratio in enumerate(cfg.ratios)
        ]
        self.conv_out = CausalConv1d(nf, cfg.channels, cfg.last_kernel_size)


def conv_states(state: Any) -> list[ConvState | ConvTransposeState]:
    """Every conv state in a (nested) streaming state."""
    if isinstance(state, (ConvState, ConvTransposeState)):
        return [state]
    if isinstance(state, (list, tuple)):
        return [c for s in state for c in conv_states(s)]
    return []
