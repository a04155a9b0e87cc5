"""The order samples are trained in, and batches of them.

Every slot of every batch is a speech sample with probability `p_audio` and a speechless
one otherwise (the paper's mixing; 25% is its trade-off), so a batch usually holds both
kinds. Within each kind the samples come in a fresh seeded permutation every epoch. The
whole order follows from the seed: a resumed run replays it up to where it stopped (only
indices are drawn), and every process of a data-parallel run draws the same global batch
and takes its own slice of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import UsageError
from .dataset import Sample

PAD_TO = 8
"""Sequences are padded to a multiple of this many steps: few distinct shapes, so few
compilations of the training step."""


class Order:
    """An endless seeded stream of sample indices, mixed by `p_audio`."""

    def __init__(self, samples: list[Sample], p_audio: float, seed: int):
        if not 0.0 <= p_audio <= 1.0:
            raise UsageError(f"--p-audio must be in [0, 1], got {p_audio}")
        self.pools = {kind: [i for i, s in enumerate(samples) if s.speech == kind]
                      for kind in (True, False)}
        if not samples:
            raise UsageError("no training samples")
        if not self.pools[True]:
            p_audio = 0.0
        elif not self.pools[False]:
            p_audio = 1.0
        self.p_audio = p_audio
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        queues: dict[bool, list[int]] = {True: [], False: []}
        while True:
            speech = bool(rng.random() < self.p_audio)
            if not queues[speech]:
                pool = self.pools[speech]
                queues[speech] = [pool[j] for j in rng.permutation(len(pool))][::-1]
            yield queues[speech].pop()

    def batches(self, size: int, start: int = 0) -> Iterator[list[int]]:
        """Batches of `size` indices, from batch number `start` (the earlier ones are
        drawn and skipped: the same order as an uninterrupted run)."""
        it = iter(self)
        n = 0
        while True:
            batch = [next(it) for _ in range(size)]
            if n >= start:
                yield batch
            n += 1


def collate(samples: list[Sample], n_streams: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, n_streams, T] int32, each sequence padded with -1 (nothing given, no loss) to
    the longest, rounded up to a multiple of PAD_TO; and [B, T] bool, the user's text."""
    t = max(s.frames for s in samples)
    t = -(-t // PAD_TO) * PAD_TO
    codes = np.full((len(samples), n_streams, t), -1, dtype=np.int32)
    user = np.zeros((len(samples), t), dtype=bool)
    for i, s in enumerate(samples):
        codes[i, :, : s.frames] = s.codes
        if s.user_text is not None:
            user[i, : s.frames] = s.user_text
    return codes, user


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous slice of a global batch."""
    n = len(batch) // world
    return batch[rank * n: (rank + 1) * n]
