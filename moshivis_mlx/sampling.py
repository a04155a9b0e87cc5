"""Token sampling for the text and audio streams.

Temperature is applied first (as Kyutai does), then the top-k / top-p filters on the
tempered log-probabilities, then one categorical draw. Each sampler owns its random key,
so a seeded text stream does not depend on how many audio tokens were drawn, and the draw
is a pure function of (logits, key) that a compiled step can contain.

The draw is the Gumbel-max trick, argmax(logits + Gumbel noise), which samples exactly the
softmax of the logits. It lets a step draw the noise of all its draws at once (`noise`:
one kernel for the 8 codebooks of a frame), and top-k needs no scatter: the k best logits
are gathered, drawn among, and the winner's index looked up, five kernels a draw on a GPU.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx

from .models.config import ConfigBase, check_range

MAX_SEED = (1 << 63) - 2
"""The largest seed a tool takes (--seed of the app, the evaluation and training)."""


class Sampler:
    """Draws token ids from logits [..., V].

    temperature 0 is greedy: the argmax of the float32 logits. top_k 0 and top_p 0 (or 1)
    disable those filters. With a seed the draws are reproducible.
    """

    def __init__(
        self,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self._key = mx.random.key(self._seed_value())

    def _seed_value(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(63)

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, seed={self.seed})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def settings(self) -> tuple[float, int, float]:
        return (self.temperature, self.top_k, self.top_p)

    def reset(self) -> None:
        """Restart the random stream from the seed (a new conversation replays identically)."""
        if self.seed is not None:
            self._key = mx.random.key(self.seed)

    def next_key(self) -> mx.array:
        """A fresh key for one draw (lazy: no host synchronisation)."""
        self._key, key = mx.random.split(self._key)
        return key

    def _top_k_only(self, vocab: int) -> bool:
        return 0 < self.top_k < vocab and not 0.0 < self.top_p < 1.0

    def noise(self, key: mx.array, shape: tuple[int, ...], vocab: int) -> mx.array | None:
        """The Gumbel noise of draws from logits of shape [*shape, vocab] (None if greedy):
        one array for several draws (`sample(..., noise=n[i])`)."""
        if self.greedy:
            return None
        width = self.top_k if self._top_k_only(vocab) else vocab
        return mx.random.gumbel((*shape, width), key=key)

    def sample(self, logits: mx.array, key: mx.array | None = None,
               noise: mx.array | None = None) -> mx.array:
        """Token ids [...] from logits [..., V] with an explicit key, or the noise that
        `noise` drew for them (a pure function either way)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)  # bfloat16 -> float32 is exact: no cast
        vocab = logits.shape[-1]
        if noise is None:
            noise = self.noise(key, logits.shape[:-1], vocab)
        if self._top_k_only(vocab):
            # The k best (in any order), drawn among, and the winner's id looked up.
            best = mx.argpartition(logits, kth=vocab - self.top_k, axis=-1)[..., -self.top_k:]
            kept = mx.take_along_axis(logits, best, axis=-1).astype(mx.float32)
            pick = mx.argmax(kept / self.temperature + noise, axis=-1, keepdims=True)
            return mx.take_along_axis(best, pick, axis=-1)[..., 0]
        logprobs = logits.astype(mx.float32) / self.temperature
        if 0.0 < self.top_p < 1.0:  # the nucleus needs probabilities; the draw and top-k do not
            logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if 0 < self.top_k < vocab:
            logprobs = keep_top_k(logprobs, self.top_k)
        if 0.0 < self.top_p < 1.0:
            logprobs = keep_top_p(logprobs, self.top_p)
        return mx.argmax(logprobs + noise, axis=-1)

    def __call__(self, logits: mx.array) -> mx.array:
        return self.sample(logits, self.next_key())


def keep_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Every token but the k most likely set to -inf (the draw then ignores them)."""
    dropped = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def keep_top_p(logprobs: mx.array, p: float) -> mx.array:
    """The nucleus of normalised log-probabilities, as Kyutai samples it: the most likely
    tokens while the mass of those more likely is at most p; the rest set to -inf."""
    ranked = -mx.sort(-logprobs, axis=-1)
    probs = mx.exp(ranked.astype(mx.float32))
    before = mx.cumsum(probs, axis=-1) - probs
    kept = (before <= p).sum(axis=-1, keepdims=True)  # >= 1: nothing precedes the first
    threshold = mx.take_along_axis(ranked, kept - 1, axis=-1)
    return mx.where(logprobs < threshold, mx.array(-mx.inf, logprobs.dtype), logprobs)


@dataclass
class GenerationConfig(ConfigBase):
    """How a conversation is sampled: one sampler per stream, and when the image starts to
    count. The defaults are Kyutai's; a bundle stores its own under `generation` in
    config.json, which every tool reads (and the command line may override)."""

    text_temperature: float = 0.7
    text_top_k: int = 25
    text_top_p: float = 0.0
    audio_temperature: float = 0.8
    audio_top_k: int = 250
    audio_top_p: float = 0.0
    xa_start: int = 16
    """Steps before the cross-attention is applied (the model first hears, then looks)."""

    def check(self, where: str = "") -> None:
        for stream in ("text", "audio"):
            check_range(f"{where}{stream}_temperature", getattr(self, f"{stream}_temperature"),
                        0.0, 100.0)
            check_range(f"{where}{stream}_top_k", getattr(self, f"{stream}_top_k"), 0, 1 << 20)
            check_range(f"{where}{stream}_top_p", getattr(self, f"{stream}_top_p"), 0.0, 1.0)
        check_range(where + "xa_start", self.xa_start, 0, 1 << 30)

    def text_sampler(self, seed: int | None = None) -> Sampler:
        return Sampler(self.text_temperature, self.text_top_k, self.text_top_p, seed)

    def audio_sampler(self, seed: int | None = None) -> Sampler:
        """Seeded with `seed + 1`: the two streams never share a random sequence."""
        return Sampler(self.audio_temperature, self.audio_top_k, self.audio_top_p,
                       None if seed is None else seed + 1)


KYUTAI_GENERATION = GenerationConfig()


def kyutai_text_sampler(seed: int | None = None) -> Sampler:
    """Kyutai's default for text (temperature 0.7, top-k 25)."""
    return KYUTAI_GENERATION.text_sampler(seed)


def kyutai_audio_sampler(seed: int | None = None) -> Sampler:
    """Kyutai's default for audio (temperature 0.8, top-k 250)."""
    return KYUTAI_GENERATION.audio_sampler(seed)
