"""Sample-rate conversion in NumPy: polyphase windowed-sinc, offline and streaming.

Microphones often run at 44.1 or 48 kHz and WAV files come at any rate, while Mimi
works at 24 kHz. The ratio out/in is reduced to a fraction up/down; output sample n
sits at input time n * down / up, and is a dot product of the neighbouring input
samples with a Kaiser-windowed sinc evaluated at that fractional position. There are
only `up` distinct fractional positions, so the filter is tabulated once per phase; for
an odd rate (a prime number of Hz: `up` in the tens of thousands) the table holds
`MAX_PHASES` evenly spaced phases instead and the taps of a position are interpolated
between its two neighbours, so memory is bounded whatever the rates
(the ratio in/out at most `MAX_DOWN`: the filter reaches further the more it reduces).
The cutoff is placed a little below the lower of the two Nyquist frequencies, which
keeps the pass band flat to ~90% of it and pushes aliases down by ~80 dB.
"""

from __future__ import annotations

from math import ceil, gcd

import numpy as np

ZERO_CROSSINGS = 16
"""Sinc lobes on each side of the centre: longer is sharper (and slower)."""
KAISER_BETA = 8.6
ROLLOFF = 0.94
"""Cutoff as a fraction of the lower Nyquist frequency (room for the transition band)."""
CHUNK = 1 << 16
MAX_PHASES = 1024
"""Phases tabulated at most (beyond, the taps are interpolated between phases)."""
MAX_WORK = 1 << 20
"""Elements of the tap matrix computed at once (outputs x taps): bounded memory."""
MAX_DOWN = 256
"""The most `in_rate / out_rate` may be: the filter's reach grows with it (16 lobes of the
output's period on each side), so 2^31 Hz to 24 kHz would tabulate 1.5 billion taps.
768 kHz (the highest rate anything records) to 8 kHz is 96."""


def _filter_bank(up: int, down: int, phases: int) -> tuple[np.ndarray, int]:
    """Taps [phases, 2 * half] at the fractional positions j / (phases - 1) of an input
    sample (j / up when `phases == up`: one row per exact phase), and `half`, the
    filter's reach in input samples."""
    cutoff = ROLLOFF * min(1.0, up / down)  # relative to the input Nyquist
    half = ceil(ZERO_CROSSINGS / cutoff)
    k = np.arange(-half + 1, half + 1)  # input offsets around floor(t)
    step = 1 / up if phases == up else 1 / (phases - 1)
    taps = np.empty((phases, 2 * half), dtype=np.float32)
    rows = max(1, (MAX_WORK // 8) // (2 * half))  # in blocks: np.i0's float64 temporaries
    for start in range(0, phases, rows):
        phase = np.arange(start, min(start + rows, phases))[:, None] * step  # fraction of t
        t = k[None, :] - phase  # distance of each tap from the output instant
        # The Kaiser window evaluated at the (fractional) tap positions, zero beyond `half`.
        r = np.clip(t / half, -1.0, 1.0)
        w = np.i0(KAISER_BETA * np.sqrt(1.0 - r * r)) / np.i0(KAISER_BETA)
        taps[start: start + len(phase)] = cutoff * np.sinc(cutoff * t) * w
    return taps, half


class Resampler:
    """Streaming conversion from `in_rate` to `out_rate` for mono float32 audio.

    Feed blocks of any size; each call returns every output sample that the input so far
    determines. Over a stream, `n` input samples give `floor(n * out_rate / in_rate)`
    outputs (minus a constant delay of `half` input samples, which `flush` releases).
    Memory stays constant however long the stream runs.
    """

    def __init__(self, in_rate: int, out_rate: int):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if in_rate > MAX_DOWN * out_rate:
            raise ValueError(f"cannot resample {in_rate} Hz to {out_rate} Hz: at most "
                             f"{MAX_DOWN} times fewer samples")
        g = gcd(int(in_rate), int(out_rate))
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.up, self.down = self.out_rate // g, self.in_rate // g
        self.passthrough = self.up == self.down
        self.exact = self.up <= MAX_PHASES
        if self.passthrough:
            self.taps, self.half = None, 0
        else:
            phases = self.up if self.exact else MAX_PHASES + 1
            self.taps, self.half = _filter_bank(self.up, self.down, phases)
        self.reset()

    def reset(self) -> None:
        # `half` zeros of history stand for the silence before the stream.
        self._buf = np.zeros(self.half, dtype=np.float32)
        self._buf_start = -self.half  # absolute input index of _buf[0]
        self._n_out = 0  # outputs produced so far

    def _available(self, end: int) -> int:
        """How many more outputs the input up to absolute index `end` (exclusive) allows."""
        # Output n needs input up to floor(n * down / up) + half.
        last = end - 1 - self.half  # largest usable floor(t)
        if last < 0:
            return 0
        # Outputs with floor(n * down / up) <= last, i.e. n * down < (last + 1) * up.
        n_max = -(-(last + 1) * self.up // self.down)
        return max(0, n_max - self._n_out)

    def _taps(self, phase: np.ndarray) -> np.ndarray:
        """The taps of each output's phase (`phase` / `up` of an input sample)."""
        if self.exact:
            return self.taps[phase]
        pos = phase * ((len(self.taps) - 1) / self.up)
        lo = np.minimum(pos.astype(np.int64), len(self.taps) - 2)
        w = (pos - lo)[:, None].astype(np.float32)
        return (1 - w) * self.taps[lo] + w * self.taps[lo + 1]

    def _compute(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.float32)
        step = max(1, MAX_WORK // (2 * self.half))
        offsets = np.arange(-self.half + 1, self.half + 1)
        for s in range(0, count, step):
            n = self._n_out + s + np.arange(min(step, count - s), dtype=np.int64)
            num = n * self.down
            base = num // self.up
            idx = (base - self._buf_start)[:, None] + offsets
            out[s: s + len(n)] = np.einsum("ij,ij->i", self._buf[idx],
                                           self._taps(num % self.up))
        return out

    def process(self, x: np.ndarray) -> np.ndarray:
        """Next block of input -> the output samples it completes."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.passthrough:
            return x.copy()
        self._buf = np.concatenate([self._buf, x])
        end = self._buf_start + len(self._buf)
        count = self._available(end)
        out = self._compute(count) if count else np.zeros(0, dtype=np.float32)
        self._n_out += count
        # Keep only what later outputs can still reach.
        next_base = (self._n_out * self.down) // self.up
        keep_from = next_base - self.half + 1
        drop = min(max(0, keep_from - self._buf_start), len(self._buf))
        if drop:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out

    def flush(self) -> np.ndarray:
        """The outputs still held back by the filter's look-ahead (the stream is over)."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        return self.process(np.zeros(self.half, dtype=np.float32))


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Whole-signal conversion, time-aligned: `round(len(x) * out_rate / in_rate)` samples."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n_out = round(len(x) * out_rate / in_rate)
    r = Resampler(in_rate, out_rate)
    if r.passthrough:
        return x.copy()
    # The streaming filter is centred with `half` zeros of history, so output 0 lines up
    # with input 0; flushing supplies the zeros after the end. Chunks bound the memory.
    parts = [r.process(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]
    out = np.concatenate(parts + [r.flush()])
    if len(out) < n_out:
        out = np.concatenate([out, np.zeros(n_out - len(out), dtype=np.float32)])
    return out[:n_out]
