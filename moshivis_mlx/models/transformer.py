"""The one transformer of the project.

Every transformer in MoshiVis is a pre-norm residual stack of self-attention and a
feed-forward block; they differ only in knobs: the norm (RMS or LayerNorm), the FFN
(SiLU-gated or GELU), biases, layer scale, RoPE, causality and window, and whether each
step of a short sequence has its own weights (the depth transformer). This module holds
that one stack, configured by `TransformerConfig`; the temporal transformer adds the gated
cross-attention block of MoshiVis through `CrossAttentionInput`.

Streaming state lives outside the modules, in the caches of `cache.py` passed to each call
(as in mlx-lm), so a model can be shared by several generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import QuantizedRingKVCache, RingKVCache, StepCache, first_slots
from .config import ConfigBase, ConfigError, check_divides, check_range

MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
MAX_CONTEXT = 1 << 20


@dataclass
class TransformerConfig(ConfigBase):
    """Hyper-parameters of one transformer stack."""

    d_model: int
    num_heads: int
    num_layers: int
    ffn_hidden: int
    """Width of the FFN hidden layer (for the gated FFN: the width of each half)."""
    ffn: str = "silu_gated"
    """'silu_gated' (Moshi), 'gelu' (exact erf, Mimi) or 'gelu_tanh' (SigLIP)."""
    norm: str = "rms_norm"
    """'rms_norm' (accumulated in float32, as Kyutai's rms_norm_f32) or 'layer_norm'."""
    norm_eps: float = 1e-8
    bias: bool = False
    causal: bool = True
    context: int | None = None
    """Sliding window: a query sees this many keys, itself included. None: unbounded."""
    rope: bool = True
    max_period: float = 10000.0
    layer_scale: bool = False
    weights_per_step: int = 0
    """If > 0, position t of the sequence uses weight set t (the depth transformer)."""
    cross_attention: bool = False
    """Add MoshiVis' gated cross-attention block to every layer."""
    xa_gate_hidden: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def check(self, where: str = "") -> None:
        check_range(where + "d_model", self.d_model, 1, MAX_WIDTH)
        check_range(where + "num_heads", self.num_heads, 1, self.d_model)
        check_divides(where + "d_model", self.d_model, where + "num_heads", self.num_heads)
        check_range(where + "num_layers", self.num_layers, 0, MAX_LAYERS)
        check_range(where + "ffn_hidden", self.ffn_hidden, 1, 16 * MAX_WIDTH)
        if self.ffn not in ("silu_gated", "gelu", "gelu_tanh"):
            raise ConfigError(f"{where}ffn: unknown kind {self.ffn!r}")
        if self.norm not in ("rms_norm", "layer_norm"):
            raise ConfigError(f"{where}norm: unknown kind {self.norm!r}")
        check_range(where + "norm_eps", self.norm_eps, 0.0, 1.0)
        if self.context is not None:
            check_range(where + "context", self.context, 1, MAX_CONTEXT)
        check_range(where + "max_period", self.max_period, 1.0, 1e9)
        check_range(where + "weights_per_step", self.weights_per_step, 0, 64)
        if self.cross_attention:
            check_range(where + "xa_gate_hidden", self.xa_gate_hidden, 1, MAX_WIDTH)



class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, accumulated in float32 whatever the dtype.

    The fused kernel takes x as it is (as mlx-lm runs its norms): it accumulates the mean
    square in float32 itself, then rounds x / rms to x's dtype before the weight. In
    float32 that is exactly Kyutai's rms_norm_f32; in bfloat16 it rounds once more than
    casting x and w to float32 first would (within one bfloat16 step of it, which
    tests/test_kernels.py bounds), and saves the three casts of each of a step's 193
    norms: a kernel each on a GPU.
    """

    def __init__(self, dims: int, eps: float = 1e-8):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
        return mx.fast.rms_norm(x, w, self.eps)


def make_norm(kind: str, dims: int, eps: float) -> nn.Module:
    if kind == "rms_norm":
        return RMSNorm(dims, eps)
    if kind == "layer_norm":
        return nn.LayerNorm(dims, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (Mimi's transformers)."""

    def __init__(self, dims: int):
        super().__init__()
        self.scale = mx.full((dims,), 0.01)

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


class FeedForward(nn.Module):
    """linear_in -> activation -> linear_out; the gated variant splits linear_in's output [a|b]."""

    def __init__(self, dims: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        if kind not in ("silu_gated", "gelu", "gelu_tanh"):
            raise ValueError(f"unknown ffn {kind!r}")
        self.kind = kind
        width = 2 * hidden if kind == "silu_gated" else hidden
        self.linear_in = nn.Linear(dims, width, bias=bias)
        self.linear_out = nn.Linear(hidden, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_in(x)
        if self.kind == "silu_gated":
            a, b = mx.split(h, 2, axis=-1)
            h = nn.silu(a) * b
        elif self.kind == "gelu":
            h = nn.gelu(h)
        else:
            h = nn.gelu_approx(h)
        return self.linear_out(h)


def window_mask(t: int, causal: bool, context: int | None) -> mx.array | str | None:
    """Mask for a whole sequence processed at once (no cache)."""
    if not causal:
        return None
    if context is None or t <= context:
        return "causal"
    pos = np.arange(t)
    delta = pos[:, None] - pos[None, :]
    return mx.array((delta >= 0) & (delta < context))


class Attention(nn.Module):
    """Multi-head self-attention with a fused [q; k; v] input projection, head-major rows."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.rope = cfg.rope
        self.max_period = cfg.max_period
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def qkv(self, x: mx.array) -> mx.array:
        """x [B, T, D] -> the heads of q, then k, then v: [B, 3H, T, head_dim]."""
        b, t, _ = x.shape
        qkv = self.in_proj(x).reshape(b, t, 3 * self.num_heads, self.head_dim)
        return qkv.transpose(0, 2, 1, 3)

    def attend(
        self,
        qkv: mx.array,
        cache: RingKVCache | None,
        mask: mx.array | str | None,
        offset: int | mx.array,
        slot: mx.array | None = None,
        span: int | None = None,
    ) -> mx.array:
        """q, k, v heads [B, 3H, T, head_dim] -> the attention output [B, T, D], before
        out_proj. `offset`: the position of the first step (an int32 array when streaming),
        `slot`: where the cache writes it (`cache.slot`), `span`: attend to the cache's
        first `span` slots only (`Transformer`), the mask already cut to them.
        Splitting along the heads and rotating q and k together keeps the step's graph
        small: a step is a few thousand nodes, and each costs host time."""
        b, _, t, _ = qkv.shape
        h = self.num_heads
        if self.rope:
            qk, v = mx.split(qkv, [2 * h], axis=1)
            # Interleaved ("traditional") RoPE, the absolute position as offset; q and k
            # share their positions, so one rotation serves both.
            qk = mx.fast.rope(qk, self.head_dim, traditional=True, base=self.max_period,
                              scale=1.0, offset=offset)
            q, k = mx.split(qk, 2, axis=1)
            kv = None
        else:
            q, kv = mx.split(qkv, [h], axis=1)  # keys and values side by side
            k, v = mx.split(kv, 2, axis=1)
        if isinstance(cache, StepCache):
            alone = cache.kv is None and t == 1
            # Unrotated keys and values are already one array: one concatenation.
            k, v = cache.extend(mx.concatenate([k, v], axis=1) if kv is None else kv)
            if alone:  # a query alone with its own key: softmax([s]) is exactly 1, y is v
                return v.transpose(0, 2, 1, 3).reshape(b, t, -1)
        elif cache is not None:
            k, v = cache.update(k, v, slot)
            if span is not None:
                k, v = first_slots(k, span), first_slots(v, span)
        if isinstance(cache, QuantizedRingKVCache):
            y = cache.attention(q, k, v, self.scale, mask)
        else:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return y.transpose(0, 2, 1, 3).reshape(b, t, -1)

    def __call__(
        self,
        x: mx.array,
        cache: RingKVCache | None,
        mask: mx.array | str | None,
        offset: int | mx.array,
        slot: mx.array | None = None,
        span: int | None = None,
    ) -> mx.array:
        return self.out_proj(self.attend(self.qkv(x), cache, mask, offset, slot, span))


class CrossAttention(nn.Module):
    """MoshiVis' cross-attention onto image tokens: no RoPE, no mask, no bias.

    One instance is shared by all layers of the temporal transformer. Keys and values
    depend only on the image, so `image_kv` runs once per image and the result is reused
    at every step.
    """

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dims // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.kv_proj = nn.Linear(dims, 2 * dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def image_kv(self, image: mx.array) -> tuple[mx.array, mx.array]:
        """[B, N, D] projected image tokens -> keys, values [B, H, N, head_dim]."""
        b, n, _ = image.shape
        kv = self.kv_proj(image).reshape(b, n, 2, self.num_heads, self.head_dim)
        kv = kv.transpose(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        b, t, d = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        y = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, t, d))


GATE_OFFSET = 4.0
"""The gate is sigmoid(scores - 4): nearly closed until trained to open."""


class CrossAttentionGate(nn.Module):
    """Per-layer conditional gate g = sigmoid(W2 relu(W1 y) - 4) of the cross-attention output y."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dims, hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dims, bias=False)

    def scores(self, y: mx.array) -> mx.array:
        """W2 relu(W1 y): the gate before its offset and sigmoid."""
        return self.linear_out(nn.relu(self.linear_in(y)))

    def __call__(self, y: mx.array) -> mx.array:
        return mx.sigmoid(self.scores(y) - GATE_OFFSET)


@dataclass
class CrossAttentionInput:
    """What the layers need to attend to an image: the shared module and the image's K/V.

    The layers leave what `mean_gate` needs to tell how much each step looked at the image
    (the paper's Figure 7): either `scores`, each layer's gate before its sigmoid
    ([B, 1, D], a streaming step), or `averaged`, each layer's gate already averaged over
    the channels ([B, T, 1]: whole sequences, forced gates); one call fills one of them.
    A step's average is taken once for the whole stack: a few kernels, where averaging each
    layer's gate as it goes would take three per layer and keep the gate from fusing into
    the residual update. `force_gate` replaces every gate by a
    constant (0 turns the image off exactly).
    """

    attention: CrossAttention
    keys: mx.array
    values: mx.array
    force_gate: float | None = None
    scores: list[mx.array] = field(default_factory=list)
    averaged: list[mx.array] = field(default_factory=list)

    def mean_gate(self) -> mx.array:
        """The gate averaged over the layers and the channels, [B, T] (float32)."""
        if self.scores:
            gates = mx.sigmoid(mx.stack(self.scores).astype(mx.float32) - GATE_OFFSET)
            return mx.mean(gates, axis=(0, -1))
        return mx.mean(mx.stack(self.averaged), axis=(0, -1))


class TransformerLayer(nn.Module):
    """x += attn(norm1 x); [x += g * xa(norm_cross x)]; x += ffn(norm2 x).

    With weights per step (the depth transformer), sub-step k uses weight set k: either one
    sub-step at a time (`step=k`, streaming), or a whole sequence of sub-steps at once
    (`step=None`, training: position k goes through weight set k).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        n = cfg.weights_per_step
        if n > 0:
            self.self_attn = [Attention(cfg) for _ in range(n)]
            self.ffn = [FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.ffn, cfg.bias)
                        for _ in range(n)]
        else:
            self.self_attn = Attention(cfg)
            self.ffn = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.ffn, cfg.bias)
        if cfg.layer_scale:
            self.layer_scale_1 = LayerScale(cfg.d_model)
            self.layer_scale_2 = LayerScale(cfg.d_model)
        self.has_layer_scale = cfg.layer_scale
        if cfg.cross_attention:
            self.norm_cross = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.xa_gate = CrossAttentionGate(cfg.d_model, cfg.xa_gate_hidden)

    def __call__(
        self,
        x: mx.array,
        cache: RingKVCache | None,
        mask: mx.array | str | None,
        offset: int | mx.array,
        step: int | None = 0,
        cross: CrossAttentionInput | None = None,
        slot: mx.array | None = None,
        span: int | None = None,
    ) -> mx.array:
        h = self.norm1(x)
        if not isinstance(self.self_attn, list):
            y = self.self_attn(h, cache, mask, offset, slot, span)
        elif step is not None:
            y = self.self_attn[step](h, cache, mask, offset, slot, span)
        else:
            attn = self.self_attn[: h.shape[1]]  # the first sub-steps only, if fewer
            qkv = mx.concatenate([a.qkv(h[:, k: k + 1]) for k, a in enumerate(attn)], axis=2)
            y = attn[0].attend(qkv, cache, mask, offset, slot)
            y = mx.concatenate([a.out_proj(y[:, k: k + 1]) for k, a in enumerate(attn)], axis=1)
        x = x + (self.layer_scale_1(y) if self.has_layer_scale else y)
        if cross is not None:
            x = self.cross_attention_block(x, cross)
        h = self.norm2(x)
        if not isinstance(self.ffn, list):
            y = self.ffn(h)
        elif step is not None:
            y = self.ffn[step](h)
        else:
            y = mx.concatenate([f(h[:, k: k + 1]) for k, f in enumerate(self.ffn[: h.shape[1]])],
                               axis=1)
        return x + (self.layer_scale_2(y) if self.has_layer_scale else y)

    def cross_attention_block(self, x: mx.array, cross: CrossAttentionInput) -> mx.array:
        """x + g * y with y = xa(norm_cross x) and g this layer's gate of y."""
        y = cross.attention(self.norm_cross(x), cross.keys, cross.values)
        if cross.force_gate is None:
            scores = self.xa_gate.scores(y)
            gate = mx.sigmoid(scores - GATE_OFFSET)  # one kernel with the update below
            if x.shape[1] == 1:  # a streaming step: averaged once for the whole stack
                cross.scores.append(scores)
            else:  # a whole sequence: averaged here, [B, T, 1] kept, not [B, T, D]
                cross.averaged.append(gate.astype(mx.float32).mean(axis=-1, keepdims=True))
        else:
            gate = mx.full(y.shape, cross.force_gate, dtype=y.dtype)
            cross.averaged.append(mx.full((*y.shape[:-1], 1), cross.force_gate, mx.float32))
        # Adapters kept in float32 while training must not turn a bfloat16 residual
        # stream into float32 (a no-op when they share its dtype, as at inference).
        return x + (gate * y).astype(x.dtype)


class Transformer(nn.Module):
    """A stack of `TransformerLayer`s.

    Called with `caches` (one `RingKVCache` per layer) it streams: positions continue
    from the caches' position. Without caches it processes a whole sequence at once.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]
        self.checkpoint = False
        """Gradient checkpointing of a whole sequence (training): each layer's activations
        are recomputed in the backward pass instead of kept, only its input is."""

    def make_cache(self, batch: int = 1, chunk: int = 1, dtype: mx.Dtype = mx.float32,
                   context: int | None = None, kv_bits: int | None = None
                   ) -> list[RingKVCache]:
        """One cache per layer; `kv_bits` (8 or 4) stores keys and values quantized."""
        context = context or self.cfg.context or self.cfg.weights_per_step
        if not context:
            raise ValueError("a streaming cache needs a context (window) size")
        shape = (batch, self.cfg.num_heads, self.cfg.head_dim, context, chunk, dtype)
        if kv_bits:
            return [QuantizedRingKVCache(*shape, bits=kv_bits) for _ in self.layers]
        return [RingKVCache(*shape) for _ in self.layers]

    def __call__(
        self,
        x: mx.array,
        caches: list[RingKVCache] | None = None,
        cross: CrossAttentionInput | None = None,
        step: int | None = None,
        window_full: bool = False,
        span: int | None = None,
    ) -> mx.array:
        """x [B, T, D]. With weights per step, `step` is the sub-step of a streamed call
        (None: x is a whole sequence of sub-steps, position k using weight set k).

        `window_full` (streaming, one position per call): the caches have wrapped, so every
        slot holds a position the query sees and attention needs no mask. The caller knows
        it on the host (it counts the steps); GPU builds have a fused kernel for a single
        query without a mask only (MLX's CUDA backend).

        `span` (streaming, before the caches wrap): attend to their first `span` slots only,
        which then hold every position written (slot p holds position p). Early in a
        conversation a step reads the few positions it has, not the whole window: the 7B
        model's window is 1.6 GB of keys and values to read every step."""
        t = x.shape[1]
        if caches is None:
            offset, mask, slot = 0, window_mask(t, self.cfg.causal, self.cfg.context), None
        else:
            # Every layer's cache is at the same position: one mask, one slot, one new
            # position for the whole stack.
            offset, slot = caches[0].position, caches[0].slot(t)
            mask = None if window_full and t == 1 else caches[0].mask(t)
            if span is not None and mask is not None:
                mask = mask[:, :span]
        if not self.cfg.weights_per_step:
            step = 0
        for i, layer in enumerate(self.layers):
            if self.checkpoint and caches is None:
                x = checkpointed(layer, x, mask, step, cross)
            else:
                cache = None if caches is None else caches[i]
                x = layer(x, cache, mask, offset, step, cross, slot, span)
        if caches is not None:
            end = offset + t
            for cache in caches:
                cache.advance(end)
        return x


def checkpointed(layer: TransformerLayer, x: mx.array, mask: mx.array | str | None,
                 step: int | None, cross: CrossAttentionInput | None) -> mx.array:
    """`layer` on a whole sequence under `mx.checkpoint`. Gradients only reach what the
    checkpointed function takes as arguments, so the trainable parameters of the layer and
    of the shared cross-attention, and the image's keys and values, are passed explicitly."""
    xa = cross.attention if cross is not None else None
    params = {"layer": layer.trainable_parameters(),
              "xa": xa.trainable_parameters() if xa is not None else {}}
    kv = [cross.keys, cross.values] if cross is not None else []

    def run(params, x, *kv):
        layer.update(params["layer"])
        inner = None
        if xa is not None:
            xa.update(params["xa"])
            inner = CrossAttentionInput(xa, kv[0], kv[1], cross.force_gate)
        y = layer(x, None, mask, 0, step, inner)
        # Each gate averaged here: the checkpoint keeps [B, T, 1] per layer, not [B, T, D].
        if inner is None:
            return [y]
        return [y, inner.mean_gate()[..., None]]

    out = mx.checkpoint(run)(params, x, *kv)
    if cross is not None:
        cross.averaged.append(out[1])
    return out[0]
