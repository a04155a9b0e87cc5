"""The kernel counter (a graph's kernels as each device's build launches them) and what the
lean step keeps exact: norms, one lookup for the input tables, one projection for the
depth transformer, the Mimi codebooks' norms computed once. Counts are exact, not timings.
"""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from moshivis_mlx.cli.bench import main as bench_main

from moshivis_mlx import kernels
from moshivis_mlx.bench import random_lm
from moshivis_mlx.generate import Generator
from moshivis_mlx.models.lm import LM, DepformerConfig, tiny
from moshivis_mlx.models.mimi import Mimi, MimiConfig
from moshivis_mlx.models.stacked import RowStack
from moshivis_mlx.models.transformer import RMSNorm
from moshivis_mlx.quant import PRESETS, quantize_model
from moshivis_mlx.sampling import KYUTAI_GENERATION, Sampler


def evaluated(*arrays):
    mx.eval(*arrays)
    return arrays


def test_views_launch_nothing_and_a_compiled_chain_is_one_kernel():
    x, w = evaluated(mx.random.normal((2, 8, 16)), mx.random.normal((16, 32)))
    y = (x @ w).reshape(16, 32).T[None]
    assert kernels.count([y]) == 1  # the matmul; reshape, transpose, expand are views
    f = mx.compile(lambda a: mx.exp(a) * 2.0 + a)
    assert kernels.primitives([f(x)]) == Counter({"Compiled": 1})


def test_fused_operations_are_one_kernel_on_a_gpu_and_their_fallback_on_the_cpu():
    x, w = evaluated(mx.random.normal((1, 1, 256)).astype(mx.bfloat16),
                     mx.ones((256,), dtype=mx.bfloat16))
    for device in ("metal", "cuda"):
        with kernels.device_graph(device):
            y = mx.fast.rms_norm(x, w, 1e-5)
            assert kernels.kernels(kernels.primitives([y])) == {"RMSNorm": 1}
            rope = mx.fast.rope(x, 256, traditional=True, base=1e4, scale=1.0, offset=3)
            assert kernels.kernels(kernels.primitives([rope])) == {"RoPE": 1}
    with kernels.device_graph("cpu"):
        assert kernels.count([mx.fast.rms_norm(x, w, 1e-5)]) > 1
    # The stand-ins are gone afterwards: values are real again.
    np.testing.assert_allclose(
        np.array(mx.fast.rms_norm(x, w, 1e-5).astype(mx.float32)),
        np.array(x.astype(mx.float32) / mx.sqrt(mx.mean(x.astype(mx.float32) ** 2) + 1e-5)),
        rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mask_kind", ["array", None])
def test_single_query_attention_under_an_array_mask_falls_back_on_cuda_only(mask_kind):
    q, k, v = evaluated(*(mx.random.normal((1, 2, n, 128)).astype(mx.bfloat16)
                          for n in (1, 40, 40)))
    mask = mx.array(np.arange(40) < 30)[None] if mask_kind == "array" else None
    counts = {}
    for device in ("metal", "cuda"):
        with kernels.device_graph(device):
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1, mask=mask)
            counts[device] = kernels.count([y])
    assert counts["metal"] == 1
    assert counts["cuda"] > 1 if mask_kind == "array" else counts["cuda"] == 1


def test_a_quantized_lookup_dequantizes_in_one_kernel_on_a_gpu():
    table = nn.QuantizedEmbedding(64, 128, group_size=64, bits=8)
    mx.eval(table.parameters())
    ids = mx.array([3, 5])
    with kernels.device_graph("metal"):
        assert kernels.kernels(kernels.primitives([table(ids)])) == {"Gather": 3,
                                                                     "Dequantize": 1}


@pytest.fixture(scope="module")
def counting_lm():
    mx.random.seed(0)
    return random_lm(kernels.counting_lm_config(), "q8")


def kyutai():
    return KYUTAI_GENERATION.text_sampler(0), KYUTAI_GENERATION.audio_sampler(0)


def test_the_step_launches_no_casts_and_one_kernel_per_norm(counting_lm):
    step = kernels.count_step(counting_lm, "metal", True, *kyutai())
    prims = step["primitives"]
    layers = 32 * 3 + 1 + 6 * 2 * 8  # norm1, cross, norm2; out_norm; the depformer's
    assert prims["RMSNorm"] == layers
    assert prims.get("AsType", 0) <= 1  # the gates' mean only
    assert sum(step["parts"].values()) == step["total"]


def test_each_layer_costs_what_it_needs():
    """The step's kernels grow by a fixed, small amount per layer: a temporal layer with
    cross-attention is 4 quantized matmuls, 2 norms, RoPE, 2 cache writes, attention, 2
    residual adds, the FFN's gate, and the cross-attention's norm, 4 matmuls, attention,
    ReLU and the fused gate update; a depth-transformer layer (per sub-step) likewise."""
    def step(layers, dep_layers):
        cfg = kernels.counting_lm_config()
        cfg.num_layers = layers
        cfg.depformer = DepformerConfig(dim=128, num_heads=2, num_layers=dep_layers,
                                        ffn_hidden=64)
        mx.random.seed(0)
        return kernels.count_step(random_lm(cfg, "q8"), "metal", True, *kyutai())["total"]

    base = step(2, 1)  # two layers: their gates' scores already go through one stack
    assert step(3, 1) - base <= 21
    assert step(2, 2) - base <= 8 * 11


def test_parts_and_frame_add_up(counting_lm):
    mimi = Mimi(kernels.counting_mimi_config())
    frame = kernels.count_frame(counting_lm, mimi, "cuda", True, *kyutai())
    step = kernels.count_step(counting_lm, "cuda", True, *kyutai())
    assert abs(frame["total"] - step["total"] - frame["mimi_encode"]
               - frame["mimi_decode"]) <= 2
    steady = kernels.count_step(counting_lm, "cuda", True, *kyutai(), window_full=True)
    # Past the window no mask: CUDA runs each layer's attention as one kernel.
    assert step["primitives"].get("Softmax", 0) == 32 and "Softmax" not in steady["primitives"]


def test_rms_norm_in_bfloat16_stays_within_a_rounding_of_float32():
    """The norm takes bfloat16 activations as they are (the kernel accumulates in float32):
    it rounds x / rms to bfloat16 before the weight, one rounding more than computing in
    float32 throughout (Kyutai's rms_norm_f32). Bounded here: at most a few bfloat16 steps."""
    x = (3.0 * mx.random.normal((4, 7, 512), key=mx.random.key(1))).astype(mx.bfloat16)
    norm = RMSNorm(512, eps=1e-8)
    norm.weight = (1.0 + 0.3 * mx.random.normal((512,), key=mx.random.key(2))).astype(
        mx.bfloat16)
    got = np.array(norm(x).astype(mx.float32))
    xf, wf = np.array(x.astype(mx.float32)), np.array(norm.weight.astype(mx.float32))
    want = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-8) * wf
    assert norm(x).dtype == mx.bfloat16
    ulp = 2.0 ** -7  # bfloat16's relative step
    assert np.max(np.abs(got - want) / (np.abs(want) + 1e-3)) <= 2 * ulp
    # In float32 it is the float32 computation.
    x32 = x.astype(mx.float32)
    norm.weight = norm.weight.astype(mx.float32)
    np.testing.assert_allclose(np.array(norm(x32)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", ["bf16", "q8"])
def test_stacked_tables_and_projections_give_the_same_values(quant):
    mx.random.seed(3)
    lm = LM(tiny())
    lm.set_dtype(mx.bfloat16)
    if PRESETS[quant]:
        quantize_model(lm, PRESETS[quant])
    mx.eval(lm.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(-1, 64, size=(2, 17, 5)),
                      dtype=mx.int32)
    tokens = mx.concatenate([mx.clip(tokens[:, :1], -1, 95), tokens[:, 1:]], axis=1)
    h = mx.random.normal((2, 1, lm.cfg.dim)).astype(mx.bfloat16)
    separate = lm.embed_streams(tokens)
    projections = [p(h) for p in lm.depformer.in_proj]
    before = lm.parameters()
    lm.stack()
    assert lm.input_stack is not None and lm.depformer.in_stack is not None
    assert mx.array_equal(lm.embed_streams(tokens), separate)
    stacked = mx.split(lm.depformer.in_stack.matmul(h), len(projections), axis=-1)
    for a, b in zip(stacked, projections):
        assert mx.array_equal(a, b)
    # The layers hold views of the stack: their own values, unchanged.
    for a, b in zip(lm.audio_emb, before["audio_emb"]):
        assert mx.array_equal(a.weight, b["weight"])
    # Weights loaded into a layer afterwards are read: the stack is no longer used.
    lm.audio_emb[0].update({"weight": mx.zeros_like(lm.audio_emb[0].weight)})
    assert not lm.input_stack.intact()
    assert not mx.array_equal(lm.embed_streams(tokens), separate)


def test_row_stack_refuses_layers_that_differ():
    assert not RowStack.fits([nn.Linear(4, 8, bias=False)])
    assert not RowStack.fits([nn.Linear(4, 8, bias=False), nn.Linear(4, 8)])
    assert not RowStack.fits([nn.Embedding(5, 8), nn.Embedding(5, 16)])
    assert RowStack.fits([nn.Embedding(5, 8), nn.Embedding(7, 8)])


def test_a_streaming_step_stacks_and_the_greedy_tokens_do_not_change():
    """The generator stacks the model's tables; a conversation is token for token what it
    was with the separate tables (the step reads the same values)."""
    mx.random.seed(4)
    lm = random_lm(tiny(), "q8")
    codes = np.random.default_rng(1).integers(0, lm.cfg.card, size=(12, 8))

    def run(stack: bool):
        if not stack:
            lm.stack = lambda: None  # type: ignore[method-assign]
        g = Generator(lm, Sampler(0.0), Sampler(0.0))
        return [g.step(c) for c in codes]

    separate = run(stack=False)
    del lm.stack
    assert run(stack=True) == separate


def test_mimi_codebook_norms_computed_once_give_the_same_codes():
    mx.random.seed(5)
    mimi = Mimi(MimiConfig.tiny())
    for cb in mimi.quantizer.rvq_first.codebooks + mimi.quantizer.rvq_rest.codebooks:
        cb.embedding = mx.random.normal(cb.embedding.shape)
    pcm = 0.1 * np.random.default_rng(2).standard_normal(mimi.frame_size * 4)
    before = np.array(mimi.encode(pcm.astype(np.float32)))
    mimi.quantizer.prepare()
    assert mimi.quantizer.rvq_rest.codebooks[0]._norms is not None
    np.testing.assert_array_equal(np.array(mimi.encode(pcm.astype(np.float32))), before)


@pytest.mark.slow
def test_bench_counts_kernels(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench_main(["--count-kernels", "--devices", "metal,cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "kernels" and r["quant"] == "q8" and set(r["devices"]) == {"metal", "cpu"}
    metal, cpu = r["devices"]["metal"], r["devices"]["cpu"]
    assert 0 < metal["step-no-image"] < metal["step"] < metal["frame"] < cpu["frame"]
    assert metal["step-steady"] <= metal["step"]
    assert r["host_ms"]["step"] > 0 and r["host_ms"]["frame"] > r["host_ms"]["step"] / 2
    text = capsys.readouterr().out
    assert "whole frame with Mimi" in text and "host time to build" in text
    assert bench_main(["--count-kernels", "--devices", "gpu"]) != 0
    assert "unknown device 'gpu'" in capsys.readouterr().err
