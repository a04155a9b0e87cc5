"""Our MLX LM against Kyutai's PyTorch LMModel + LMGen (fp32, greedy, streaming).

The reference is built with Kyutai's own code at a tiny size with random weights, saved in
the layout of the released files, and converted with `moshivis-convert`, exactly as a user
converts the real checkpoint.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from lanes import reference_wanted
from moshivis_mlx.cli.convert import main as convert_main

if reference_wanted():  # Kyutai's PyTorch reference, for the tests marked torch
    from reference import (
        LOGIT_TOL,
        build_moshi_lm,
        compare,
        greedy_generator,
        save_released,
        tiny_lm_kwargs,
    )

pytestmark = pytest.mark.torch


def convert_reference(tmp_path, lm_kwargs, seed=0, layout="moshi", extra_args=()):
    lm = build_moshi_lm(lm_kwargs, seed=seed)
    weights = tmp_path / "model.safetensors"
    prefix = {}
    if layout == "moshivis-backbone":
        prefix = {"transformer.": "llm.transformer.", "text_emb.": "llm.text_emb.",
                  "out_norm.": "llm.out_norm.", "text_linear.": "llm.text_linear.",
                  "emb.": "audio_emb.", "linears.": "audio_linears."}
    save_released(lm, weights, prefix)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(lm_kwargs))
    out = tmp_path / "bundle"
    rc = convert_main(["--moshi-weights", str(weights), "--config", str(config), "--out", str(out),
                       "--dtype", "float32", "--no-quantize", *extra_args])
    assert rc == 0
    return lm, out


@pytest.mark.parametrize("context,steps", [(100, 24), (7, 30)],
                         ids=["long-context", "sliding-window"])
def test_streaming_matches_pytorch(tmp_path, context, steps):
    """Identical tokens and logits within 1e-4; with context 7 the window slides 23 times."""
    pt_lm, bundle = convert_reference(tmp_path, tiny_lm_kwargs(context=context))
    gen = greedy_generator(bundle)
    worst_text, worst_audio = compare(pt_lm, gen, steps)
    assert worst_text < LOGIT_TOL
    assert worst_audio < LOGIT_TOL


def test_window_really_slides(tmp_path):
    """The sliding-window case must differ from an unbounded context (else it tests nothing)."""
    pt_lm, bundle = convert_reference(tmp_path, tiny_lm_kwargs(context=7))
    short = greedy_generator(bundle)
    long_ = greedy_generator(bundle)
    for c in long_.caches:  # same weights, window far larger than the run
        c.__init__(1, c.keys.shape[1], c.keys.shape[3], context=64, dtype=c.keys.dtype)
    codes = np.random.default_rng(3).integers(0, 64, size=(8, 20))
    diff = 0.0
    for t in range(20):
        short.step(codes[:, t])
        long_.step(codes[:, t])
        diff = max(diff, float(mx.abs(short.last_text_logits - long_.last_text_logits).max()))
    assert diff > 1e-3


def test_single_depformer_input_projection(tmp_path):
    """A depformer with one input projection for all sub-steps also converts right."""
    kw = tiny_lm_kwargs(context=50, depformer_multi_linear=False)
    pt_lm, bundle = convert_reference(tmp_path, kw, seed=2)
    worst_text, worst_audio = compare(pt_lm, greedy_generator(bundle), 12)
    assert worst_text < LOGIT_TOL and worst_audio < LOGIT_TOL


def test_moshivis_layout_backbone_matches_pytorch(tmp_path):
    """A MoshiVis-layout file (llm.* names, audio_emb, audio_linears, shared XA under layer 0)
    converts; without an image it is plain Moshi, so it must match Kyutai's Moshi exactly."""
    import torch
    from safetensors.torch import load_file, save_file

    kw = tiny_lm_kwargs(context=50)
    pt_lm = build_moshi_lm(kw, seed=4)
    weights = tmp_path / "model.safetensors"
    save_released(pt_lm, weights, {
        "transformer.": "llm.transformer.", "text_emb.": "llm.text_emb.",
        "out_norm.": "llm.out_norm.",
        "text_linear.": "llm.text_linear.", "emb.": "audio_emb.", "linears.": "audio_linears."})
    sd = load_file(str(weights))
    d, g = kw["dim"], kw["dim"] // 8
    gen = torch.Generator().manual_seed(0)
    for layer in range(kw["num_layers"]):
        p = f"llm.transformer.layers.{layer}."
        sd[p + "norm_cross.alpha"] = torch.ones(1, 1, d)
        sd[p + "cross_attention.gate.alpha.0.weight"] = torch.randn(g, d, generator=gen)
        sd[p + "cross_attention.gate.alpha.2.weight"] = torch.randn(d, g, generator=gen)
    mha = "llm.transformer.layers.0.cross_attention.mha."
    sd[mha + "in_proj_weight"] = torch.randn(3 * d, d, generator=gen)
    sd[mha + "out_proj.weight"] = torch.randn(d, d, generator=gen)
    sd["image_prefix.proj_xa.weight"] = torch.randn(d, 48, generator=gen)
    sd["image_prefix.proj_xa.bias"] = torch.randn(d, generator=gen)
    sd["image_prefix.norm_xa.alpha"] = torch.ones(1, 1, d)
    save_file(sd, str(weights))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(kw))
    out = tmp_path / "bundle"
    assert convert_main(["--moshi-weights", str(weights), "--config", str(config),
                         "--out", str(out),
                         "--dtype", "float32", "--no-quantize"]) == 0
    gen_ = greedy_generator(out)
    assert gen_.lm.cfg.cross_attention
    worst_text, worst_audio = compare(pt_lm, gen_, 12)
    assert worst_text < LOGIT_TOL and worst_audio < LOGIT_TOL
