"""Moshi's multi-stream language model, with MoshiVis' gated cross-attention.

One temporal step: the 17 token streams of a frame (text, 8 model codebooks, 8 user
codebooks) are embedded and summed, go through the temporal transformer (with the image
cross-attention when MoshiVis has an image), and `out_norm` gives the hidden state `h`.
`text_linear(h)` scores the text token; then the depth transformer emits the 8 model
codebooks one after another, each sub-step seeing `h` and the token sampled just before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from .cache import RingKVCache, StepCache
from .config import ConfigBase, ConfigError, check_divides, check_range
from .stacked import RowStack
from .transformer import (
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_WIDTH,
    CrossAttention,
    CrossAttentionInput,
    RMSNorm,
    Transformer,
    TransformerConfig,
)

MOSHI_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


@dataclass
class DepformerConfig(ConfigBase):
    """The depth transformer: `num_layers` layers over the `dep_q` sub-steps of one frame."""

    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 6
    ffn_hidden: int = 2816
    weights_per_step: bool = True
    multi_linear: bool = True


@dataclass
class LmConfig(ConfigBase):
    """Moshi / MoshiVis language model. Defaults are the released 7B model."""

    nested: ClassVar[dict[str, type[ConfigBase]]] = {"depformer": DepformerConfig}

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    ffn_hidden: int = 11264
    context: int = 3000
    max_period: float = 10000.0
    text_card: int = 32000
    card: int = 2048
    n_q: int = 16
    dep_q: int = 8
    delays: list[int] = field(default_factory=lambda: list(MOSHI_DELAYS))
    text_padding_id: int = 3
    end_of_text_padding_id: int = 0
    depformer: DepformerConfig = field(default_factory=DepformerConfig)
    cross_attention: bool = False
    image_dim: int = 1152
    xa_gate_hidden: int = 512

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "") -> None:
        if len(self.delays) != self.n_q + 1:
            raise ConfigError(f"{where}delays: {len(self.delays)} delays for "
                              f"{self.n_q + 1} streams (n_q + 1)")
        for i, d in enumerate(self.delays):
            check_range(f"{where}delays[{i}]", d, 0, 16)
        check_range(where + "n_q", self.n_q, 1, 64)
        check_range(where + "dep_q", self.dep_q, 1, self.n_q)
        check_range(where + "text_card", self.text_card, 1, 1 << 20)
        check_range(where + "card", self.card, 1, 1 << 16)
        check_range(where + "text_padding_id", self.text_padding_id, 0, self.text_card - 1)
        check_range(where + "end_of_text_padding_id", self.end_of_text_padding_id, 0,
                    self.text_card - 1)
        check_range(where + "image_dim", self.image_dim, 1, MAX_WIDTH)
        check_range(where + "max_period", self.max_period, 1.0, 1e9)
        check_range(where + "context", self.context, 1, MAX_CONTEXT)
        d, dp = self.depformer, where + "depformer."
        for prefix, dim, heads, layers, ffn in (
                (where, self.dim, self.num_heads, self.num_layers, self.ffn_hidden),
                (dp, d.dim, d.num_heads, d.num_layers, d.ffn_hidden)):
            check_range(prefix + "dim", dim, 1, MAX_WIDTH)
            check_range(prefix + "num_heads", heads, 1, dim)
            check_divides(prefix + "dim", dim, prefix + "num_heads", heads)
            check_range(prefix + "num_layers", layers, 1, MAX_LAYERS)
            check_range(prefix + "ffn_hidden", ffn, 1, 16 * MAX_WIDTH)
        if self.cross_attention:
            check_range(where + "xa_gate_hidden", self.xa_gate_hidden, 1, MAX_WIDTH)

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card

    @property
    def text_padding_ids(self) -> tuple[int, int]:
        """The text tokens that are not words: padding and end-of-padding."""
        return (self.text_padding_id, self.end_of_text_padding_id)

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            ffn_hidden=self.ffn_hidden,
            ffn="silu_gated",
            norm="rms_norm",
            norm_eps=1e-8,
            causal=True,
            context=self.context,
            rope=True,
            max_period=self.max_period,
            cross_attention=self.cross_attention,
            xa_gate_hidden=self.xa_gate_hidden,
        )

    def depformer_transformer_config(self) -> TransformerConfig:
        d = self.depformer
        return TransformerConfig(
            d_model=d.dim,
            num_heads=d.num_heads,
            num_layers=d.num_layers,
            ffn_hidden=d.ffn_hidden,
            ffn="silu_gated",
            norm="rms_norm",
            norm_eps=1e-8,
            causal=True,
            context=self.dep_q,
            rope=False,
            weights_per_step=self.dep_q if d.weights_per_step else 0,
        )


def moshi_7b() -> LmConfig:
    return LmConfig()


def moshivis_7b() -> LmConfig:
    return LmConfig(cross_attention=True)


def tiny(cross_attention: bool = True) -> LmConfig:
    """A few-MB model with the real structure, for tests and the offline demo."""
    return LmConfig(
        dim=64,
        num_heads=4,
        num_layers=2,
        ffn_hidden=192,
        context=24,
        text_card=96,
        card=64,
        depformer=DepformerConfig(dim=64, num_heads=2, num_layers=2, ffn_hidden=128),
        cross_attention=cross_attention,
        image_dim=48,
        xa_gate_hidden=8,
    )


PRESETS: dict[str, Callable[[], LmConfig]] = {
    "moshi-7b": moshi_7b,
    "moshivis-7b": moshivis_7b,
    "tiny": tiny,
}


def embed(table: nn.Module, ids: mx.array) -> mx.array:
    """Embedding lookup where id -1 gives a zero vector (Kyutai's 'zero token')."""
    out = table(mx.maximum(ids, 0))
    return mx.where((ids >= 0)[..., None], out, mx.zeros((), dtype=out.dtype))


class ImagePrefix(nn.Module):
    """SigLIP tokens -> model width: proj_xa (with bias) then an RMSNorm."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj_xa = nn.Linear(image_dim, dim, bias=True)
        self.norm_xa = RMSNorm(dim, eps=1e-8)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.norm_xa(self.proj_xa(tokens))


class Depformer(nn.Module):
    """Depth transformer: emits the `dep_q` model codebooks of a frame one by one."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        d = cfg.depformer
        n_in = cfg.dep_q if d.multi_linear else 1
        self.in_proj = [nn.Linear(cfg.dim, d.dim, bias=False) for _ in range(n_in)]
        self.text_emb = nn.Embedding(cfg.text_card + 1, d.dim)
        # The last codebook is never an input: dep_q - 1 audio tables.
        self.audio_emb = [nn.Embedding(cfg.card + 1, d.dim) for _ in range(cfg.dep_q - 1)]
        self.transformer = Transformer(cfg.depformer_transformer_config())
        self.heads = [nn.Linear(d.dim, cfg.card, bias=False) for _ in range(cfg.dep_q)]
        self.in_stack: RowStack | None = None
        """The input projections as one matmul (`stack`), for streaming."""

    def stack(self) -> None:
        """Streaming projects h once for all sub-steps (`RowStack`; no extra memory)."""
        self.in_stack = RowStack.refreshed(self.in_stack, self.in_proj)

    def make_cache(self) -> list[StepCache]:
        """A frame's caches: its sub-steps only ever see each other."""
        return [StepCache() for _ in self.transformer.layers]

    def _input(self, k: int, h: mx.array, prev: mx.array, projected: mx.array | None = None,
               zero_tokens: bool = True) -> mx.array:
        """Sub-step k's input: its projection of h (or `projected`, already) plus the
        embedding of the token before (the text token for k = 0, codebook k - 1 after).
        `zero_tokens`: prev may hold -1 (a zero embedding); sampled tokens never do."""
        table = self.text_emb if k == 0 else self.audio_emb[k - 1]
        if projected is None:
            proj = self.in_proj[k] if len(self.in_proj) > 1 else self.in_proj[0]
            projected = proj(h)
        return projected + (embed(table, prev) if zero_tokens else table(prev))

    def __call__(
        self,
        h: mx.array,
        text_token: mx.array,
        sample: Callable[[mx.array], mx.array],
        caches: list[RingKVCache],
        zero_tokens: bool = True,
    ) -> tuple[mx.array, list[mx.array]]:
        """One frame, streaming: h [B, 1, dim], text_token [B] -> codes [B, dep_q] and the
        logits of each sub-step. The caches must be fresh: the depth transformer starts
        afresh every frame. `zero_tokens`: the tokens may be -1 (given, not sampled)."""
        prev = text_token
        codes, logits = [], []
        stack = RowStack.current(self.in_stack)
        projected = [None] * len(self.heads)
        if stack is not None:  # one matmul for every sub-step's projection of h
            projected = mx.split(stack.matmul(h), len(self.heads), axis=-1)
        for k, head in enumerate(self.heads):
            x = self._input(k, h, prev[:, None], projected[k], zero_tokens)
            y = self.transformer(x, caches, step=k)
            step_logits = head(y)[:, 0]
            prev = sample(step_logits)
            codes.append(prev)
            logits.append(step_logits)
        return mx.stack(codes, axis=1), logits

    def forward(self, h: mx.array, prev_tokens: mx.array) -> mx.array:
        """Every frame at once, teacher-forced: h [B, T, dim] and the input token of each
        sub-step prev_tokens [B, n, T] -> logits [B, n, T, card] of the first n <= dep_q
        sub-steps (the later ones are not run: they cannot change the earlier ones)."""
        b, t, _ = h.shape
        n = prev_tokens.shape[1]
        if not 1 <= n <= len(self.heads):
            raise ValueError(f"the depth transformer has {len(self.heads)} sub-steps, asked {n}")
        x = mx.stack([self._input(k, h, prev_tokens[:, k]) for k in range(n)], axis=2)
        y = self.transformer(x.reshape(b * t, n, -1))  # position k: sub-step k's weights
        return mx.stack([head(y[:, k]).reshape(b, t, -1)
                         for k, head in enumerate(self.heads[:n])], axis=1)


@dataclass
class LMOutput:
    """The teacher-forced forward's logits, aligned with the codes given (as Kyutai's
    `LMOutput`): position t of each row scores that row's token at time t."""

    text_logits: mx.array
    """[B, 1, T, text_card]"""
    audio_logits: mx.array
    """[B, dep_q, T, card]; NaN where the acoustic delay leaves no prediction"""
    text_mask: mx.array
    """[B, 1, T] bool: where a text token was given (not -1)"""
    audio_mask: mx.array
    """[B, dep_q, T] bool: valid predictions of given tokens"""
    gates: mx.array | None = None
    """[B, T] the cross-attention gate of each step, averaged (None: no image)"""


def delay_streams(codes: mx.array, delays: list[int], initial: mx.array) -> mx.array:
    """[B, K, T] -> row k shifted right by delays[k], the first steps its initial token."""
    rows = []
    for k, d in enumerate(delays):
        row = codes[:, k]
        if d > 0:
            fill = mx.broadcast_to(initial[k], (row.shape[0], d)).astype(row.dtype)
            row = mx.concatenate([fill, row[:, : row.shape[1] - d]], axis=1)
        rows.append(row)
    return mx.stack(rows, axis=1)


def undelay_logits(logits: mx.array, delays: list[int]) -> tuple[mx.array, mx.array]:
    """[B, K, T, V] -> row k shifted left by delays[k] (NaN past the end), and the mask of
    the positions that hold a prediction [B, K, T]."""
    b, _, t, v = logits.shape
    rows, masks = [], []
    for k, d in enumerate(delays):
        row = logits[:, k]
        valid = mx.ones((b, t), dtype=mx.bool_)
        if d > 0:
            nan = mx.full((b, d, v), float("nan"), dtype=row.dtype)
            row = mx.concatenate([row[:, d:], nan], axis=1)
            valid = mx.concatenate([valid[:, d:], mx.zeros((b, d), dtype=mx.bool_)], axis=1)
        rows.append(row)
        masks.append(valid)
    return mx.stack(rows, axis=1), mx.stack(masks, axis=1)


class LM(nn.Module):
    """The Moshi (or MoshiVis, with `cfg.cross_attention`) language model.

    Two ways to run it: one frame at a time with caches (`forward_text` + the depformer,
    driven by `Generator`), or teacher-forced over a whole token sequence (`forward`, in
    Kyutai's training layout: what training and scoring use).
    """

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.audio_emb = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(cfg.transformer_config())
        if cfg.cross_attention:
            # One cross-attention shared by all layers, stored once; gates are per layer.
            self.xa = CrossAttention(cfg.dim, cfg.num_heads)
            self.image_prefix = ImagePrefix(cfg.image_dim, cfg.dim)
        self.out_norm = RMSNorm(cfg.dim, eps=1e-8)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer = Depformer(cfg)
        self.input_stack: RowStack | None = None
        """The 17 input tables as one (`stack`), for streaming."""

    def stack(self) -> None:
        """Reads the input tables as one (one lookup for the 17 streams) and the depth
        transformer's input projections as one matmul: what a streaming step launches
        (`RowStack`: the same values, no extra memory). Idempotent."""
        self.input_stack = RowStack.refreshed(self.input_stack, [self.text_emb, *self.audio_emb],
                                              zero_row=True)
        self.depformer.stack()

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (norm weights are never quantized)."""
        return self.out_norm.weight.dtype

    def make_cache(self, batch: int = 1, kv_bits: int | None = None) -> list[RingKVCache]:
        return self.transformer.make_cache(batch=batch, dtype=self.dtype, kv_bits=kv_bits)

    def initial_tokens(self) -> mx.array:
        """[1 + n_q] the token each stream starts with (text start, then audio initial)."""
        cfg = self.cfg
        return mx.array([cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q,
                        dtype=mx.int32)

    def image_kv(self, image_tokens: mx.array) -> tuple[mx.array, mx.array]:
        """SigLIP tokens [B, N, image_dim] -> cross-attention keys and values."""
        if not self.cfg.cross_attention:
            raise ValueError(
                "this model has no cross-attention (plain Moshi): it cannot take an image")
        prefix = self.image_prefix(image_tokens.astype(self.dtype))
        return self.xa.image_kv(prefix)

    def embed_streams(self, tokens: mx.array) -> mx.array:
        """tokens [B, 1 + n_q, T] -> summed embeddings [B, T, dim] (audio first, as Kyutai sums)."""
        stack = RowStack.current(self.input_stack)
        if stack is not None:
            # One lookup: row k's ids offset into the stack, -1 to its zero row.
            offsets = mx.array(stack.offsets, dtype=tokens.dtype)[None, :, None]
            e = stack.lookup(mx.where(tokens >= 0, tokens + offsets, stack.zero))
            x = e[:, 1]
            for i in range(2, e.shape[1]):
                x = x + e[:, i]
            return e[:, 0] if e.shape[1] == 1 else x + e[:, 0]
        x = None
        for i, table in enumerate(self.audio_emb):
            e = embed(table, tokens[:, i + 1])
            x = e if x is None else x + e
        t = embed(self.text_emb, tokens[:, 0])
        return t if x is None else x + t

    def forward_text(
        self,
        tokens: mx.array,
        caches: list[RingKVCache] | None,
        cross: CrossAttentionInput | None = None,
        window_full: bool = False,
        span: int | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Temporal transformer: tokens [B, 17, T] -> (h [B, T, dim] after out_norm, logits).
        `window_full`: the caches have wrapped (no mask needed); `span`: before they wrap,
        the slots that hold positions (`Transformer`)."""
        x = self.embed_streams(tokens)
        h = self.out_norm(self.transformer(x, caches, cross, window_full=window_full,
                                           span=span))
        return h, self.text_linear(h)

    def forward(self, codes: mx.array, image_tokens: mx.array | None = None,
                force_gate: float | None = None, audio_codebooks: int | None = None
                ) -> LMOutput:
        """Teacher-forced logits for a whole sequence, as Kyutai's `LMModel.forward`.

        `codes` [B, 1 + n_q, T]: every stream's tokens, not delayed (row 0 text, rows
        1..dep_q the model's codebooks, the rest the user's); -1 gives a zero embedding and
        no loss. The streams are delayed here, the initial tokens put first, and the logits
        undelayed again, so `out.text_logits[:, 0, t]` scores `codes[:, 0, t]`. With
        `image_tokens` [B, N, image_dim] (SigLIP's) every step attends to the image.
        `audio_codebooks`: score only the model's first n codebooks (the depth transformer
        runs n sub-steps, none for 0; `audio_logits` is [B, n, T, card]); default all dep_q.
        """
        cfg = self.cfg
        b, k, t = codes.shape
        if k != 1 + cfg.n_q:
            raise ValueError(f"codes must have {1 + cfg.n_q} streams, got {k}")
        initial = self.initial_tokens()
        delayed = delay_streams(codes, cfg.delays, initial)
        start = mx.broadcast_to(initial[None, :, None], (b, k, 1)).astype(codes.dtype)
        sequence = mx.concatenate([start, delayed], axis=2)
        cross = None
        if image_tokens is not None:
            cross = CrossAttentionInput(self.xa, *self.image_kv(image_tokens), force_gate)
        n = cfg.dep_q if audio_codebooks is None else audio_codebooks
        h, text_logits = self.forward_text(sequence[:, :, :-1], None, cross)
        if n > 0:
            audio_logits = self.depformer.forward(h, sequence[:, :n, 1:])
            audio_logits, audio_mask = undelay_logits(audio_logits, cfg.delays[1: 1 + n])
            audio_mask = audio_mask & (codes[:, 1: 1 + n] != -1)
        else:  # nothing to score: the depth transformer is not run
            audio_logits = mx.zeros((b, 0, t, cfg.card), dtype=text_logits.dtype)
            audio_mask = mx.zeros((b, 0, t), dtype=mx.bool_)
        text_logits, text_mask = undelay_logits(text_logits[:, None], cfg.delays[:1])
        text_mask = text_mask & (codes[:, :1] != -1)
        return LMOutput(text_logits, audio_logits, text_mask, audio_mask,
                        cross.mean_gate() if cross is not None else None)
