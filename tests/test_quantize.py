"""Blockwise quantization: q8 against float, quantized bundles loading directly."""

from __future__ import annotations

import gc
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lanes import reference_wanted
from moshivis_mlx.cli.convert import main as convert_main

from moshivis_mlx import LM, Generator, LmConfig, Sampler, load_lm
from moshivis_mlx.bundle import save_lm
from moshivis_mlx.models.lm import DepformerConfig
from moshivis_mlx.quant import QuantSpec, quantize_model

if reference_wanted():  # Kyutai's PyTorch reference, for the tests marked torch
    from reference import build_moshi_lm, save_released, tiny_lm_kwargs

# Teacher-forced greedy agreement of the q8 tiny model with its float version over 50 steps
# (measured 0.953 for this seed; random tiny models have small logit margins, so this is a
# worst case for quantization).
Q8_MIN_AGREEMENT = 0.90


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Kyutai's PyTorch Moshi (tiny, random; the tests using it are marked torch) converted
    to float, q8 and q4."""
    d = tmp_path_factory.mktemp("q")
    kw = tiny_lm_kwargs(context=100)
    save_released(build_moshi_lm(kw), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(kw))
    out = {}
    for name, args in {"float": ["-q", "bf16"], "q8": ["-q", "q8"], "q4": ["-q", "q4"]}.items():
        out[name] = d / name
        assert convert_main(["--moshi-weights", str(d / "model.safetensors"), "--config",
                             str(d / "config.json"), "--out", str(out[name]), "--dtype", "float32",
                             *args]) == 0
    return out


def teacher_forced_agreement(reference: Generator, other: Generator, steps: int) -> np.ndarray:
    """Per step and stream: does `other`'s argmax equal `reference`'s token, both fed the
    reference's tokens (so one flip does not derail everything after it)."""
    codes = np.random.default_rng(0).integers(0, 64, size=(8, steps))
    agree = []
    for t in range(steps):
        reference.step(codes[:, t])
        tokens = reference.last_tokens[0]
        other.step(codes[:, t], force_text=tokens[0], force_audio=tokens[1:])
        mine = [int(mx.argmax(other.last_text_logits))]
        mine += np.array(mx.argmax(other.last_audio_logits[0], axis=-1)).tolist()
        agree.append(np.array(mine) == np.array(tokens))
    return np.array(agree)


def greedy(bundle):
    return Generator(load_lm(bundle), Sampler(0.0), Sampler(0.0), keep_logits=True)


@pytest.mark.torch
def test_q8_agrees_with_float(bundles):
    agree = teacher_forced_agreement(greedy(bundles["float"]), greedy(bundles["q8"]), 50)
    assert agree.mean() >= Q8_MIN_AGREEMENT, agree.mean()


@pytest.mark.torch
def test_forced_float_agrees_with_itself(bundles):
    """The measure is sound: a model agrees with itself everywhere."""
    agree = teacher_forced_agreement(greedy(bundles["float"]), greedy(bundles["float"]), 10)
    assert agree.all()


@pytest.mark.torch
def test_q4_is_worse_than_q8(bundles):
    q8 = teacher_forced_agreement(greedy(bundles["float"]), greedy(bundles["q8"]), 30).mean()
    q4 = teacher_forced_agreement(greedy(bundles["float"]), greedy(bundles["q4"]), 30).mean()
    assert q4 < q8


@pytest.mark.torch
def test_quantized_bundle_has_quantized_layers(bundles):
    lm = load_lm(bundles["q8"])
    assert isinstance(lm.text_linear, nn.QuantizedLinear)
    assert isinstance(lm.text_emb, nn.QuantizedEmbedding)
    assert isinstance(lm.depformer.transformer.layers[0].self_attn[3].in_proj, nn.QuantizedLinear)
    assert lm.text_linear.bits == 8 and lm.text_linear.group_size == 64
    assert lm.out_norm.weight.dtype == mx.float32  # norms stay float
    assert json.loads((bundles["q8"] / "config.json").read_text())["quantization"] == \
        {"bits": 8, "group_size": 64}
    size = {k: (v / "model.safetensors").stat().st_size for k, v in bundles.items()}
    assert size["q4"] < size["q8"] < size["float"]


def test_quantized_bundle_loads_without_the_float_model(tmp_path):
    """Peak memory while loading a q8 bundle stays well under the float model's size."""
    cfg = LmConfig(dim=512, num_heads=8, num_layers=4, ffn_hidden=1408, context=64,
                   depformer=DepformerConfig(dim=256, num_heads=4, num_layers=2, ffn_hidden=512))
    lm = LM(cfg)
    float_bytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(lm.parameters()))
    quantize_model(lm, QuantSpec(8, 64))
    save_lm(lm, tmp_path, quantization={"bits": 8, "group_size": 64})
    del lm
    gc.collect()  # what earlier tests left for the collector is not this load's
    mx.clear_cache()
    mx.reset_peak_memory()
    loaded = load_lm(tmp_path)
    peak = mx.get_peak_memory()
    q_bytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(loaded.parameters()))
    assert q_bytes < 0.35 * float_bytes
    assert peak < 0.5 * float_bytes, (peak, float_bytes, q_bytes)
