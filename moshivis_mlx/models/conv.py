"""Causal 1-D convolutions that stream: Mimi's building blocks.

Arrays are channels-last, [B, T, C], as MLX's convolutions expect. A whole clip is one
call with a fresh state; a stream is a sequence of calls sharing a state. Both give the
same output because every conv sees exactly the same left context either way:

* `CausalConv1d` pads on the left by `(kernel - 1) * dilation + 1 - stride` samples
  (zeros, or copies of the very first sample with `pad_mode="replicate"`). Its state is
  the last that many input samples, the left padding of the next call.
* `CausalConvTranspose1d` produces `kernel - stride` samples past the end of its input,
  which the next input still adds to. Its state holds them (without the bias, which is
  added once, when a sample is emitted); a whole clip simply drops them.

States are small objects held by the caller (as the transformer's KV caches are), so a
model can serve several streams, and their size never changes: a stream costs the same
at minute 60 as at second 1.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def elu(x: mx.array) -> mx.array:
    """ELU with alpha 1, through expm1 (as PyTorch) for accuracy near zero."""
    return mx.where(x > 0, x, mx.expm1(mx.minimum(x, 0)))


class ConvState:
    """Left context of one causal conv: its last input samples ([B, context, C_in])."""

    def __init__(self) -> None:
        self.previous: mx.array | None = None
        """None at the start of a stream (the conv pads with zeros or the first sample)."""

    def arrays(self) -> list[mx.array]:
        return [] if self.previous is None else [self.previous]


class ConvTransposeState:
    """Overlap of one transposed conv: its last `kernel - stride` outputs, bias excluded."""

    def __init__(self) -> None:
        self.partial: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        return [] if self.partial is None else [self.partial]


class CausalConv1d(nn.Module):
    """Conv1d whose output at step t depends on inputs up to the end of input frame t.

    The input length must be a multiple of the stride (Mimi only ever feeds whole frames).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unknown pad_mode {pad_mode!r}")
        scale = 1.0 / math.sqrt(in_channels // groups * kernel_size)
        self.weight = mx.random.uniform(
            -scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.pad_mode = pad_mode
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def new_state(self) -> ConvState:
        return ConvState()

    def __call__(self, x: mx.array, state: ConvState | None = None) -> mx.array:
        b, t, c = x.shape
        if t % self.stride:
            raise ValueError(f"input length {t} is not a multiple of the stride {self.stride}")
        if self.context > 0:
            previous = state.previous if state is not None else None
            if previous is None:
                if self.pad_mode == "replicate":
                    previous = mx.repeat(x[:, :1], self.context, axis=1)
                else:
                    previous = mx.zeros((b, self.context, c), dtype=x.dtype)
            x = mx.concatenate([previous, x], axis=1)
            if state is not None:
                state.previous = x[:, -self.context:]
        y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation,
                      groups=self.groups)
        if "bias" in self:
            y = y + self.bias
        return y


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed on the right: T input steps give exactly T * stride outputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        scale = 1.0 / math.sqrt(in_channels // groups * kernel_size)
        self.weight = mx.random.uniform(
            -scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.groups = groups
        self.overlap = kernel_size - stride

    def new_state(self) -> ConvTransposeState:
        return ConvTransposeState()

    def __call__(self, x: mx.array, state: ConvTransposeState | None = None) -> mx.array:
        y = mx.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.groups)
        n = self.overlap
        if n > 0:
            if state is not None:
                if state.partial is not None:
                    y = mx.concatenate([y[:, :n] + state.partial, y[:, n:]], axis=1)
                state.partial = y[:, -n:]
            y = y[:, :-n]
        if "bias" in self:
            y = y + self.bias
        return y
