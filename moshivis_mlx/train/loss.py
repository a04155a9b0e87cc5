"""Kyutai's training loss for Moshi, as moshi-finetune computes it, for the adapters.

    loss = text_weight  * sum(w_text  * CE(text))  / sum(w_text)
         + audio_weight * sum(w_audio * CE(audio)) / sum(w_audio)

A token that was not given (-1, the "zero token") or that the acoustic delay leaves
without a prediction has weight 0. Text targets that are padding or end-of-padding weigh
`text_padding_weight` (0.5: most frames of a speech sample are padding); the model's first
(semantic) codebook weighs `first_codebook_weight` (100), the acoustic ones 1. Speechless
samples carry no audio, so they add to the text term only. `audio_codebooks` supervises
only the model's first codebooks (the MoshiVis paper trains on the first two): the depth
transformer then runs only that many sub-steps.

The weights depend only on the codes, so they are computed on the host before a step
(`loss_weights`), and so are their totals over each micro-batch, its slices on every
process together. A micro-batch's loss is its weighted sums divided by those totals, and
the optimizer step's loss is the mean of its micro-batches' losses, as moshi-finetune
averages them (`LossScale`: each micro-batch's factors are divided by their number). So
summing the gradients, across accumulation steps and across processes, gives exactly the
mean of the micro-batches' gradients, however many processes share each micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from ..errors import UsageError
from ..models.lm import LmConfig, LMOutput


@dataclass(frozen=True)
class LossConfig:
    text_padding_weight: float = 0.5
    """moshi-finetune's `text_padding_weight`."""
    first_codebook_weight: float = 100.0
    """moshi-finetune's `first_codebook_weight_multiplier` (MoshiVis' semantic weight)."""
    audio_codebooks: int | None = 2
    """Supervise the model's first n codebooks of speech samples (the paper: 2); None: all."""
    text_weight: float = 1.0
    audio_weight: float = 1.0
    user_text_weight: float = 1.0
    """Weight of the user's turns in the text of speechless samples (0: they are input
    only, as mlx-lm's --mask-prompt)."""

    def check(self, cfg: LmConfig) -> None:
        for name in ("text_padding_weight", "first_codebook_weight", "text_weight",
                     "audio_weight", "user_text_weight"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"{name.replace('_', '-')} must be >= 0")
        n = self.audio_codebooks
        if n is not None and not 1 <= n <= cfg.dep_q:
            raise UsageError(f"--audio-codebooks must be in 1..{cfg.dep_q} (the model's "
                             f"codebooks), got {n}")

    def codebooks(self, cfg: LmConfig) -> int:
        return cfg.dep_q if self.audio_codebooks is None else self.audio_codebooks

    def to_dict(self) -> dict:
        return asdict(self)


def loss_weights(codes: np.ndarray, cfg: LmConfig, loss: LossConfig,
                 speech: np.ndarray | None = None, user_text: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """codes [B, 1 + n_q, T] (training layout, -1: not given) -> the per-token weights of
    the text [B, T] and of the first n model codebooks [B, n, T], float32.

    `speech` [B] bool: which sequences are speech samples (default: all); the others'
    audio, if they carry any, is not scored. With no speech sample at all, n is 0: the
    depth transformer need not run. `user_text` [B, T] bool: the text tokens of the
    user's turns (speechless samples), weighted by `user_text_weight`."""
    codes = np.asarray(codes)
    b, _, t = codes.shape
    speech = np.ones(b, dtype=bool) if speech is None else np.asarray(speech, dtype=bool)
    text = codes[:, 0]
    w_text = (text >= 0).astype(np.float32)
    padding = np.isin(text, list(cfg.text_padding_ids))
    w_text = np.where(padding, w_text * loss.text_padding_weight, w_text)
    if user_text is not None:
        w_text = np.where(user_text, w_text * loss.user_text_weight, w_text)
    n = loss.codebooks(cfg) if speech.any() else 0
    audio = codes[:, 1: 1 + n]
    w_audio = (audio >= 0).astype(np.float32) * speech[:, None, None]
    for k in range(n):
        d = cfg.delays[1 + k]
        if d > 0:  # the last d steps of a delayed codebook are never predicted
            w_audio[:, k, t - d:] = 0.0
    if n:
        w_audio[:, 0] *= loss.first_codebook_weight
    return w_text.astype(np.float32), w_audio.astype(np.float32)


@dataclass
class LossScale:
    """The totals of one micro-batch's weights (all processes) and the loss weights, as the
    factors its weighted sums are scaled by; `micro_batches`: how many the optimizer step
    averages (moshi-finetune divides the accumulated loss and gradients by that number)."""

    text_total: float
    audio_total: float
    loss: LossConfig
    micro_batches: int = 1

    def factors(self) -> mx.array:
        """[text, audio]: weight / total / micro-batches (0 where nothing is scored)."""
        n = self.micro_batches
        t = self.loss.text_weight / float(self.text_total) / n if self.text_total > 0 else 0.0
        a = self.loss.audio_weight / float(self.audio_total) / n if self.audio_total > 0 else 0.0
        return mx.array([t, a], dtype=mx.float32)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32: logits [..., V], targets [...] in [0, V)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def weighted_sums(out: LMOutput, codes: mx.array, w_text: mx.array, w_audio: mx.array
                  ) -> mx.array:
    """[sum(w_text * CE_text), sum(w_audio * CE_audio)] of a batch. Positions of weight 0
    contribute exactly 0 (their logits may be NaN: the acoustic delay's last steps)."""
    n = w_audio.shape[1]
    text_targets = mx.maximum(codes[:, 0], 0)
    ce_text = cross_entropy(out.text_logits[:, 0], text_targets)
    text = mx.sum(mx.where(w_text > 0, ce_text * w_text, 0.0))
    if n == 0:  # no speech sample: no audio term
        return mx.stack([text, mx.zeros((), dtype=text.dtype)])
    scored = w_audio > 0
    logits = mx.where(scored[..., None], out.audio_logits, mx.zeros((), out.audio_logits.dtype))
    ce_audio = cross_entropy(logits, mx.maximum(codes[:, 1: 1 + n], 0))
    audio = mx.sum(mx.where(scored, ce_audio * w_audio, 0.0))
    return mx.stack([text, audio])


def batch_loss(out: LMOutput, codes: mx.array, w_text: mx.array, w_audio: mx.array,
               factors: mx.array) -> tuple[mx.array, mx.array]:
    """This micro-batch's share of the step's loss, and its weighted sums [text, audio]."""
    sums = weighted_sums(out, codes, w_text, w_audio)
    return mx.sum(sums * factors), sums
