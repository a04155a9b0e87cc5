"""How many device kernels a lazily built graph launches, on the CPU, the GPU or a Mac.

On a GPU or an M4 Pro each launched kernel costs a few microseconds whatever its size, so
past the bandwidth floor a streaming step is as fast as it launches few kernels. The count
is exact here, without the device: build the step lazily (after everything before it is
evaluated), write its graph with `mx.export_to_dot`, and count the primitive nodes that
are not views. A fused `Compiled` node is one kernel.

One thing differs between builds: the CPU build decomposes `mx.fast.rms_norm`,
`layer_norm`, `rope`, `scaled_dot_product_attention` and `mx.dequantize` (a quantized
embedding's lookup) into their fallback graphs when the graph is built, where a GPU build
runs each as one kernel, except where that backend
has no kernel for the case (MLX's CUDA backend: attention of a single query under an
array mask; Metal: head widths other than 64, 96, 128 or 256). `device_graph("cuda")` or
`("metal")` builds the graph as that build would: each fused operation becomes one
stand-in node of the same shape (`FAST_MARKERS`), depending on all its inputs, and the
cases without a kernel keep their fallback graph.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mlx.core as mx

DEVICES = ("cuda", "metal", "cpu")
"""The builds a graph can be counted as: MLX's CUDA backend, Metal (a Mac), and the CPU."""

VIEWS = frozenset({
    "Reshape", "Broadcast", "Slice", "Transpose", "ExpandDims", "Squeeze", "Split", "Flatten",
    "Unflatten", "AsStrided", "Depends", "StopGradient",
})
"""Primitives that launch no kernel on contiguous input (they share their input's buffer)."""

FAST_MARKERS = {"CumMax": "RMSNorm", "CumMin": "RoPE", "CumProd": "ScaledDotProductAttention",
                "CumLogAddExp": "LayerNorm", "Hadamard": "Dequantize"}
"""The stand-in primitive of each fused operation in a graph built by `device_graph`; no
step of ours uses these scans otherwise."""

_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def primitives(outputs: Sequence[mx.array]) -> Counter[str]:
    """The primitive nodes of the unevaluated graph behind `outputs`, by name (fused
    elementwise nodes as 'Compiled'; the stand-ins of `device_graph` by what they stand
    for)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *[a for a in outputs if isinstance(a, mx.array)])
    names: Counter[str] = Counter()
    for name in _NODE.findall(dot.getvalue()):
        if name.startswith("Compiled"):
            name = "Compiled"
        names[FAST_MARKERS.get(name, name)] += 1
    return names


def kernels(names: Counter[str]) -> Counter[str]:
    """The primitives of `names` that launch a kernel (views left out)."""
    return Counter({k: n for k, n in names.items() if k not in VIEWS})


def count(outputs: Sequence[mx.array]) -> int:
    """Kernels launched to evaluate `outputs` (their inputs already evaluated)."""
    return sum(kernels(primitives(outputs)).values())


def _after(x: mx.array, *others: object) -> mx.array:
    """`x`, depending on every array in `others` (no kernel: a stand-in needs all the
    inputs of what it stands for, so that what computes them is counted)."""
    deps = [o for o in others if isinstance(o, mx.array)]
    return mx.depends([x], deps)[0] if deps else x


def _head_dim_ok(q: mx.array, v: mx.array) -> bool:
    return q.shape[-1] == v.shape[-1] and q.shape[-1] in (64, 96, 128, 256)


def sdpa_is_fused(device: str, q: mx.array, k: mx.array, v: mx.array,
                  mask: object) -> bool:
    """Whether that device's build runs this attention as one kernel (MLX's own rules:
    Metal's vector kernel takes up to 8 queries under any mask; CUDA's vector kernel takes
    fewer than 4 queries without an array mask, cuDNN several half-precision queries)."""
    t_q = q.shape[2]
    array_mask = isinstance(mask, mx.array)
    if device == "metal":
        full = t_q > 8 and q.shape[-1] in (64, 80, 128)
        return full or (t_q <= 8 and t_q <= k.shape[2] and _head_dim_ok(q, v))
    if device == "cuda":
        vector = t_q < 4 and not array_mask and _head_dim_ok(q, v)
        cudnn = (t_q > 1 and q.dtype in (mx.float16, mx.bfloat16)
                 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
        return vector or cudnn
    return False


@contextmanager
def device_graph(device: str) -> Iterator[None]:
    """Graphs built (and steps compiled) inside are those `device`'s build would run.

    For "cuda" and "metal" the fused operations become stand-ins of the right shape: such a
    graph is for counting only, its values are meaningless. "cpu" changes nothing.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    if device == "cpu":
        yield
        return
    fast = mx.fast
    saved = {name: getattr(fast, name) for name in
             ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")}
    saved_dequantize = mx.dequantize

    def rms_norm(x, weight, eps, **_):
        return mx.cummax(_after(x, weight), axis=-1)

    def layer_norm(x, weight, bias, eps, **_):
        return mx.logcumsumexp(_after(x, weight, bias), axis=-1)

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, **_):
        return mx.cummin(_after(x, offset, freqs), axis=-1)

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
        if not sdpa_is_fused(device, q, k, v, mask):
            return saved["scaled_dot_product_attention"](
                q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
        out = q if q.shape[-1] == v.shape[-1] else q[..., :1] * v[..., :1, :]
        return mx.cumprod(_after(out, k, v, mask, sinks), axis=-1)

    def dequantize(w, scales, biases=None, group_size=64, bits=8, **_):
        group = w.shape[-1] * 32 // bits // scales.shape[-1]
        full = mx.broadcast_to(scales[..., None], (*scales.shape, group))
        return mx.hadamard_transform(_after(full.reshape(*scales.shape[:-1], -1), w, biases))

    stand_ins = {"rms_norm": rms_norm, "layer_norm": layer_norm, "rope": rope,
                 "scaled_dot_product_attention": sdpa}
    try:
        for name, fn in stand_ins.items():
            setattr(fast, name, fn)
        mx.dequantize = dequantize
        yield
    finally:
        for name, fn in saved.items():
            setattr(fast, name, fn)
        mx.dequantize = saved_dequantize


# -- the step and the frame of MoshiVis ---------------------------------------------------------

PARTS = ("temporal", "cross-attention", "depformer", "sampling")
"""A step's kernels by part: the temporal transformer without the image (embeddings to
text logits), what the image adds to it, the samplers alone (one text draw and one audio
draw per codebook), and the rest: the depth transformer and the step's bookkeeping (so the
parts add up to the step; fusion across the parts' borders lands there too)."""


def counting_lm_config(cross_attention: bool = True):
    """The 7B's structure at tiny widths: 32 temporal layers (heads 128 wide) with gated
    cross-attention, the 6-layer depformer (heads 64 wide) over 8 codebooks, the real
    vocabularies and window. A step's kernels depend on the structure and on the head
    widths (they decide which attention kernels exist), not on the model's width."""
    from .models.lm import DepformerConfig, LmConfig

    return LmConfig(dim=256, num_heads=2, num_layers=32, ffn_hidden=64, context=3000,
                    depformer=DepformerConfig(dim=128, num_heads=2, num_layers=6, ffn_hidden=64),
                    cross_attention=cross_attention, image_dim=64, xa_gate_hidden=64)


def counting_mimi_config():
    """Mimi's structure (SEANet, 8-layer transformers with 64-wide heads, split RVQ of
    32 codebooks of 2048) at tiny widths."""
    from .models.mimi import MimiConfig
    from .models.quantizer import QuantizerConfig
    from .models.seanet import SeanetConfig
    from .models.transformer import TransformerConfig

    released = MimiConfig()
    t = released.transformer
    return MimiConfig(
        seanet=SeanetConfig(dimension=128, n_filters=8),
        quantizer=QuantizerConfig(dimension=16, n_q=32, bins=2048, input_dimension=128,
                                  output_dimension=128),
        transformer=TransformerConfig(
            d_model=128, num_heads=2, num_layers=t.num_layers, ffn_hidden=64, ffn=t.ffn,
            norm=t.norm, norm_eps=t.norm_eps, causal=True, context=t.context, rope=True,
            layer_scale=True))


def _settled(arrays: Sequence[object]) -> None:
    mx.eval([a for a in arrays if isinstance(a, (mx.array, list, tuple))])


def _generator_state(gen) -> list:
    return [list(gen._generated), list(gen._gates), list(gen._user), gen._use_initial,
            gen._initial, [c.state for c in gen.caches], gen.text_sampler._key,
            gen.audio_sampler._key, list(gen.image_kv or ())]


def step_graph(gen, codes: mx.array, forced: bool = False) -> list[mx.array]:
    """One step of `gen` built lazily after everything before it is evaluated: its
    outputs and the caches it writes (`forced`: the tokens given, nothing sampled)."""
    _settled(_generator_state(gen))
    force = dict(force_text=0, force_audio=[0] * gen.lm.cfg.dep_q) if forced else {}
    pending = gen.step_async(codes, evaluate=False, **force)
    return pending.outputs + [a for c in gen.caches for a in c.state]


def temporal_graph(lm, image_kv: tuple | None) -> list[mx.array]:
    """The temporal transformer alone (compiled as the step is): embeddings to text
    logits, with the gates' mean when it attends to the image."""
    from .models.transformer import CrossAttentionInput

    caches = lm.make_cache()

    def fn(tokens):
        xa = CrossAttentionInput(lm.xa, *image_kv) if image_kv else None
        h, logits = lm.forward_text(tokens, caches, xa)
        return [h, logits] + ([xa.mean_gate()] if xa else [])

    state = [c.state for c in caches]
    _settled([state, list(image_kv or ())])
    tokens = mx.array(lm.initial_tokens().tolist(), dtype=mx.int32)[None, :, None]
    out = mx.compile(fn, inputs=state, outputs=state)(tokens)
    return out + [a for c in caches for a in c.state]


def count_step(lm, device: str, image: bool, text_sampler, audio_sampler,
               kv_bits: int | None = None, window_full: bool = False) -> dict:
    """The kernels of one streaming step of `lm` as `device`'s build launches them: the
    total, by part (`PARTS`) and by primitive. `window_full`: the step of a conversation
    past its attention window (the caches have wrapped)."""
    from .generate import Generator

    def generator():
        gen = Generator(lm, text_sampler, audio_sampler, xa_start=0, kv_bits=kv_bits)
        if image:
            gen.set_image(mx.zeros((16, lm.cfg.image_dim)))
        if window_full:
            gen._step = gen.window_full_at
        return gen

    codes = mx.zeros((lm.cfg.n_q - lm.cfg.dep_q,), dtype=mx.int32)
    with device_graph(device):
        by_primitive = kernels(primitives(step_graph(generator(), codes)))
        plain = count(temporal_graph(lm, None))
        parts = {"temporal": plain}
        if image:
            kv = generator().image_kv
            parts["cross-attention"] = count(temporal_graph(lm, kv)) - plain
        parts["sampling"] = (sampler_kernels(text_sampler, lm.cfg.text_card)
                             + lm.cfg.dep_q * sampler_kernels(audio_sampler, lm.cfg.card))
    total = sum(by_primitive.values())
    parts["depformer"] = total - sum(parts.values())
    return {"total": total, "parts": parts, "primitives": dict(by_primitive.most_common())}


def sampler_kernels(sampler, vocab: int) -> int:
    """One draw of `sampler` from [1, vocab] bfloat16 logits, compiled as in the step."""
    logits = mx.zeros((1, vocab), dtype=mx.bfloat16)
    key = mx.random.key(0)
    _settled([logits, key])
    return count([mx.compile(sampler.sample)(logits, key)])


def count_frame(lm, mimi, device: str, image: bool, text_sampler, audio_sampler) -> dict:
    """The kernels of one whole frame (Mimi encode, the step, Mimi decode: `Stream.build`)
    and of each codec direction alone."""
    from .generate import Generator
    from .stream import Stream

    gen = Generator(lm, text_sampler, audio_sampler, xa_start=0)
    if image:
        gen.set_image(mx.zeros((16, lm.cfg.image_dim)))
    silence = [0] * (lm.cfg.n_q - lm.cfg.dep_q)
    for _ in range(gen.max_delay + 1):  # past the acoustic delay: the frame has a voice
        gen.step(silence, force_text=0, force_audio=[0] * lm.cfg.dep_q)
    pcm = mx.zeros((mimi.frame_size,))
    with device_graph(device):
        stream = Stream(mimi, gen)
        _settled(stream.encoder.state_arrays() + stream.decoder.state_arrays())
        _settled(_generator_state(gen))
        step, voice, state = stream.build(pcm)
        frame = kernels(primitives(step.outputs + [voice] + state
                                   + [a for c in gen.caches for a in c.state]))
        # Each direction alone, on a stream of its own (the frame's moved on lazily).
        encoder, decoder = mimi.streaming_encoder(gen.num_user_codes), mimi.streaming_decoder()
        _settled(encoder.state_arrays() + decoder.state_arrays())
        encode = count([encoder(pcm)] + encoder.state_arrays())
        decode = count([decoder(mx.zeros((lm.cfg.dep_q,), dtype=mx.int32))]
                       + decoder.state_arrays())
    return {"total": sum(frame.values()), "mimi_encode": encode, "mimi_decode": decode,
            "primitives": dict(frame.most_common())}
