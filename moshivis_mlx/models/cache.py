"""The attention caches of a streaming transformer (as mlx-lm keeps its caches in a module
of their own): the ring buffer of a sliding window, its 8-bit form, and the short cache of
the depth transformer's sub-steps. Streaming state lives here, outside the modules, so a
model can be shared by several generators.
"""

from __future__ import annotations

import mlx.core as mx


class RingKVCache:
    """Keys and values of the last `context` positions, in a buffer allocated once, and the
    position of the next write.

    Slot `p % capacity` holds position p, so memory is flat however long a conversation
    runs. Every call writes exactly `chunk` positions (1 for the language model, 2 for
    Mimi's 25 Hz transformers at 12.5 Hz frames); the capacity is the smallest multiple of
    `chunk` that is at least `context + chunk - 1`, so that every query of a chunk still
    sees its whole window and a chunk never straddles the end of the buffer.

    The keys, the values and the position are all arrays (`state`): a step has fixed shapes,
    attends to the whole buffer under a mask, and can be compiled once; the host never
    tracks where the cache is.
    """

    def __init__(
        self,
        batch: int,
        num_heads: int,
        head_dim: int,
        context: int,
        chunk: int = 1,
        dtype: mx.Dtype = mx.float32,
    ):
        self.context = context
        self.chunk = chunk
        self.capacity = -(-(context + chunk - 1) // chunk) * chunk
        self.state = self._buffers((batch, num_heads, self.capacity, head_dim), dtype) + [
            mx.zeros((), dtype=mx.int32)]
        """[keys, values, position]: a list, so that a compiled step can carry it as state."""
        self._slots = mx.arange(self.capacity, dtype=mx.int32)
        self._chunk = mx.arange(chunk, dtype=mx.int32)
        mx.eval(self._slots, self._chunk)  # constants of the step, not kernels of it

    def _buffers(self, shape: tuple[int, ...], dtype: mx.Dtype) -> list[mx.array]:
        return [mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)]

    @property
    def keys(self) -> mx.array:
        return self.state[0]

    @property
    def values(self) -> mx.array:
        return self.state[1]

    @property
    def position(self) -> mx.array:
        """The absolute position of the next write (the positions seen), an int32 array."""
        return self.state[-1]

    @property
    def offset(self) -> int:
        """`position` read on the host (a synchronisation: for tests and inspection)."""
        return self.position.item()

    def reset(self) -> None:
        # Stale slots are never read: the mask only lets through positions < position.
        self.state[-1] = mx.zeros((), dtype=mx.int32)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def mask(self, t: int) -> mx.array:
        """What the next `t` positions' queries may see of the buffer once they are written,
        [t, capacity] boolean. Every layer's cache is at the same position, so one mask
        serves the whole stack."""
        cap, pos = self.capacity, self.position
        end = pos + t
        steps = self._chunk if t == self.chunk else mx.arange(t, dtype=pos.dtype)
        # The newest position each slot holds; negative: never written.
        pos_k = (end - 1) - (end - 1 - self._slots) % cap
        delta = (pos + steps)[:, None] - pos_k[None, :]
        return (pos_k >= 0)[None, :] & (delta >= 0) & (delta < self.context)

    def update(self, k: mx.array, v: mx.array, slot: mx.array) -> tuple[mx.array, mx.array]:
        """Writes the keys/values [B, H, chunk, D] of the next positions at `slot` (what
        `slot()` gives); returns the whole buffer to attend to (under `mask`). The position
        moves on with `advance`: a stack of layers computes both once, not once a layer."""
        keys = mx.slice_update(self.keys, k, start_indices=slot, axes=(2,))
        values = mx.slice_update(self.values, v, start_indices=slot, axes=(2,))
        # In place: a compiled step holds on to this very list.
        self.state[0], self.state[1] = keys, values
        return keys, values

    def slot(self, t: int) -> mx.array:
        """Where the next `t` positions go in the buffer."""
        if t != self.chunk:
            raise ValueError(f"this cache takes {self.chunk} positions per call, got {t}")
        return (self.position % self.capacity).reshape(1)

    def advance(self, position: mx.array) -> None:
        """The positions up to `position` are written (shared by a stack's caches)."""
        self.state[-1] = position


class QuantizedRingKVCache(RingKVCache):
    """A `RingKVCache` whose keys and values are stored quantized (mlx-lm's KV quantization):
    8 bits take 0.53 of bfloat16's memory, which is what lets the 7B model's 3000-position
    window (1.6 GB in bfloat16) fit beside q4 weights on an 8 GB Mac. Each position's row
    is quantized once, when written; attention reads the quantized buffer directly."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, context: int,
                 chunk: int = 1, dtype: mx.Dtype = mx.float32, bits: int = 8,
                 group_size: int = 64):
        group_size = min(group_size, head_dim)
        if bits not in (4, 8) or head_dim % group_size or group_size not in (32, 64, 128):
            raise ValueError(f"cannot quantize {head_dim}-wide attention heads to {bits} bits "
                             f"(head_dim must be a multiple of 32, bits 4 or 8)")
        self.bits, self.group_size = bits, group_size
        super().__init__(batch, num_heads, head_dim, context, chunk, dtype)
        # state: [keys (packed, scales, biases), values (the same), position].

    def _buffers(self, shape: tuple[int, ...], dtype: mx.Dtype) -> list[mx.array]:
        *rows, head_dim = shape
        packed = mx.zeros((*rows, head_dim * self.bits // 32), dtype=mx.uint32)
        scales = mx.zeros((*rows, head_dim // self.group_size), dtype=dtype)
        return [packed, scales, mx.zeros_like(scales)] * 2

    @property
    def keys(self) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(self.state[0:3])

    @property
    def values(self) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(self.state[3:6])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state[:6])

    def update(self, k: mx.array, v: mx.array, slot: mx.array) -> tuple[tuple, tuple]:
        rows = [*mx.quantize(k, group_size=self.group_size, bits=self.bits),
                *mx.quantize(v, group_size=self.group_size, bits=self.bits)]
        for i, row in enumerate(rows):
            self.state[i] = mx.slice_update(self.state[i], row, start_indices=slot, axes=(2,))
        return self.keys, self.values

    def attention(self, q: mx.array, keys: tuple, values: tuple, scale: float,
                  mask: mx.array | None) -> mx.array:
        """Attention of q [B, H, T, D] over the quantized buffer (under `mask`)."""
        q_args = {"group_size": self.group_size, "bits": self.bits}
        scores = mx.quantized_matmul(q * scale, *keys, transpose=True, **q_args)
        if mask is not None:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
        return mx.quantized_matmul(probs, *values, transpose=False, **q_args)


class StepCache:
    """Keys and values of a short sequence built one position at a time and started afresh
    often: the depth transformer's sub-steps of one frame. Every earlier position is
    visible, so there is no mask and no ring; the position is a plain count.

    Keys and values grow as one array [B, 2H, T, D] (`extend`): the input projection gives
    them side by side, so one concatenation a layer and sub-step, not two.
    """

    def __init__(self) -> None:
        self.kv: mx.array | None = None
        self.position = 0

    @property
    def keys(self) -> mx.array | None:
        return None if self.kv is None else self.kv[:, : self.kv.shape[1] // 2]

    @property
    def values(self) -> mx.array | None:
        return None if self.kv is None else self.kv[:, self.kv.shape[1] // 2:]

    def extend(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """Appends the keys and values of the next positions, [B, 2H, T, D] (keys' heads
        first); returns all of them."""
        self.kv = kv if self.kv is None else mx.concatenate([self.kv, kv], axis=2)
        return self.keys, self.values

    def mask(self, t: int) -> None:
        if t != 1:
            raise ValueError("a step cache takes one position per call")
        return None

    def slot(self, t: int) -> None:
        return None

    def advance(self, position: int) -> None:
        self.position = position


def first_slots(kv: mx.array | tuple, span: int) -> mx.array | tuple:
    """The first `span` slots of a cache's keys or values (each part, when quantized)."""
    if isinstance(kv, tuple):
        return tuple(a[:, :, :span] for a in kv)
    return kv[:, :, :span]
