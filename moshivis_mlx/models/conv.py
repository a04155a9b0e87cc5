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
at minute 60 as at second 1. Their arrays are allocated at the start of the stream with
their final shapes and kept in a list (`state`) that each call updates in place, so a
streaming step has fixed shapes and can be compiled once, carrying the states.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def elu(x: mx.array) -> mx.array:
    """ELU with alpha 1, through expm1 (as PyTorch) for accuracy near zero."""
    return mx.where(x > 0, x, mx.expm1(mx.minimum(x, 0)))


class ConvState:
    """Left context of one causal conv: its last input samples, [B, context, C_in], and
    whether the stream has started (before that, the padding is zeros or the first
    sample, as the conv's `pad_mode` says)."""

    def __init__(self, batch: int, context: int, channels: int):
        self.state = [mx.zeros((batch, context, channels)), mx.array(False)]

    def reset(self) -> None:
        self.state[0] = mx.zeros_like(self.state[0])
        self.state[1] = mx.array(False)


class ConvTransposeState:
    """Overlap of one transposed conv: its last `kernel - stride` outputs, bias excluded,
    [B, overlap, C_out] (zeros at the start of a stream: nothing to add yet)."""

    def __init__(self, batch: int, overlap: int, channels: int):
        self.state = [mx.zeros((batch, overlap, channels))]

    def reset(self) -> None:
        self.state[0] = mx.zeros_like(self.state[0])


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
        self.in_channels = in_channels
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def new_state(self, batch: int = 1) -> ConvState:
        return ConvState(batch, max(self.context, 0), self.in_channels)

    def _padding(self, x: mx.array) -> mx.array:
        """The left padding at the start of a stream (or of a whole clip)."""
        if self.pad_mode == "replicate":
            return mx.repeat(x[:, :1], self.context, axis=1)
        return mx.zeros((x.shape[0], self.context, x.shape[2]), dtype=x.dtype)

    def __call__(self, x: mx.array, state: ConvState | None = None) -> mx.array:
        t = x.shape[1]
        if t % self.stride:
            raise ValueError(f"input length {t} is not a multiple of the stride {self.stride}")
        if self.context > 0:
            if state is None:
                previous = self._padding(x)
            elif self.pad_mode == "replicate":
                started = state.state[1]
                previous = mx.where(started, state.state[0].astype(x.dtype), self._padding(x))
            else:
                previous = state.state[0].astype(x.dtype)  # zeros at the start
            x = mx.concatenate([previous, x], axis=1)
            if state is not None:
                state.state[0] = x[:, -self.context:]
                state.state[1] = mx.array(True)
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
        self.out_channels = out_channels
        self.overlap = kernel_size - stride

    def new_state(self, batch: int = 1) -> ConvTransposeState:
        return ConvTransposeState(batch, max(self.overlap, 0), self.out_channels)

    def __call__(self, x: mx.array, state: ConvTransposeState | None = None) -> mx.array:
        y = mx.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.groups)
        n = self.overlap
        if n > 0:
            if state is not None:
                partial = state.state[0].astype(y.dtype)
                y = mx.concatenate([y[:, :n] + partial, y[:, n:]], axis=1)
                state.state[0] = y[:, -n:]
            y = y[:, :-n]
        if "bias" in self:
            y = y + self.bias
        return y
