"""Several layers of the same kind read as one: one lookup or one matmul, not one each.

A streaming step embeds its 17 input tokens from 17 tables and projects the temporal
output 8 times for the depth transformer's 8 sub-steps. On a GPU every lookup or matmul
is a kernel (a quantized table's lookup is four: three gathers and a dequantization),
whatever its size. `RowStack` concatenates the layers' rows once and replaces each layer's
arrays by a view of its rows of the stack: the same values, no extra memory, and the layers
still work on their own (training, the converter) while a step reads the stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

_QUANTIZED = ("weight", "scales", "biases")


class RowStack:
    """The rows of `layers` (all `nn.Embedding` or all `nn.Linear` without bias, or their
    quantized forms with the same bits and group size, all as wide) as one array, each
    layer's arrays then views of it. `zero_row` appends a row of zeros (index `zero`):
    what an embedding's id -1 gives (a quantized zero row is zero, scales and biases 0)."""

    def __init__(self, layers: Sequence[nn.Module], zero_row: bool = False):
        first = layers[0]
        self.quantized = hasattr(first, "scales")
        self.names = _QUANTIZED if self.quantized else ("weight",)
        self.group_size = getattr(first, "group_size", None)
        self.bits = getattr(first, "bits", None)
        self.offsets: list[int] = []
        rows = 0
        for layer in layers:
            self.offsets.append(rows)
            rows += layer["weight"].shape[0]
        self.zero = rows
        self.arrays: dict[str, mx.array] = {}
        for name in self.names:
            parts = [layer[name] for layer in layers]
            if zero_row:
                parts.append(mx.zeros((1, *parts[0].shape[1:]), dtype=parts[0].dtype))
            self.arrays[name] = mx.concatenate(parts, axis=0)
        mx.eval(self.arrays)
        self.layers = list(layers)
        self.views: list[dict[str, mx.array]] = []
        for layer, start in zip(layers, self.offsets):
            n = layer["weight"].shape[0]
            view = {name: self.arrays[name][start: start + n] for name in self.names}
            mx.eval(view)
            for name, a in view.items():
                layer[name] = a
            self.views.append(view)

    @staticmethod
    def fits(layers: Sequence[nn.Module]) -> bool:
        """Whether `layers` can be stacked (one kind, one width, one quantization)."""
        kinds = {type(layer) for layer in layers}
        if len(kinds) != 1 or len(layers) < 2:
            return False
        first = layers[0]
        if any("bias" in layer for layer in layers) or (
                "scales" in first and first.get("biases") is None):
            return False
        names = _QUANTIZED if "scales" in first else ("weight",)
        for layer in layers:
            for name in names:
                a, b = layer[name], first[name]
                if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                    return False
            if (getattr(layer, "bits", None), getattr(layer, "group_size", None),
                    getattr(layer, "mode", "affine")) != (
                    getattr(first, "bits", None), getattr(first, "group_size", None),
                    getattr(first, "mode", "affine")):
                return False
        return True

    def intact(self) -> bool:
        """The layers still hold the views (nobody loaded other weights into them since)."""
        return all(layer[name] is view[name] for layer, view in zip(self.layers, self.views)
                   for name in self.names)

    @staticmethod
    def current(stack: RowStack | None) -> RowStack | None:
        """`stack` if its layers still hold its views (nobody loaded other weights), else
        None: the caller reads the layers one by one."""
        return stack if stack is not None and stack.intact() else None

    @classmethod
    def refreshed(cls, stack: RowStack | None, layers: Sequence[nn.Module],
                  zero_row: bool = False) -> RowStack | None:
        """`stack` while current, else a new stack of `layers` (None if they cannot be)."""
        if cls.current(stack) is not None:
            return stack
        return cls(layers, zero_row) if cls.fits(layers) else None

    def lookup(self, rows: mx.array) -> mx.array:
        """The rows at indices `rows` (of the stack): [..., width]."""
        w = self.arrays
        if not self.quantized:
            return w["weight"][rows]
        return mx.dequantize(w["weight"][rows], w["scales"][rows], w["biases"][rows],
                             group_size=self.group_size, bits=self.bits)

    def matmul(self, x: mx.array) -> mx.array:
        """x @ every layer's weight: [..., total rows] (the layers' outputs side by side)."""
        w = self.arrays
        if not self.quantized:
            return x @ w["weight"].T
        return mx.quantized_matmul(x, w["weight"], w["scales"], w["biases"], transpose=True,
                                   group_size=self.group_size, bits=self.bits)
