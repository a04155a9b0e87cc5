"""A conversation has no step limit and its memory stays flat."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moshivis_mlx import LM, Generator, Sampler
from moshivis_mlx.models.lm import DepformerConfig, tiny

pytestmark = pytest.mark.slow

STEPS = 20_000


def test_caches_do_not_grow_over_20000_steps():
    cfg = tiny(cross_attention=True)
    cfg.num_layers = 1
    cfg.context = 50  # the ring buffer wraps 400 times
    cfg.depformer = DepformerConfig(dim=64, num_heads=2, num_layers=1, ffn_hidden=128)
    lm = LM(cfg)
    mx.eval(lm.parameters())
    gen = Generator(lm, Sampler(temperature=0.9, seed=1), Sampler(temperature=0.9, seed=2),
                    xa_start=0)
    gen.set_image(mx.random.normal((16, cfg.image_dim)))
    codes = np.random.default_rng(0).integers(0, cfg.card, size=(64, 8))

    def footprint():
        return ([(c.keys.shape, c.values.shape, c.nbytes) for c in gen.caches],
                len(gen._generated), len(gen._user), len(gen._gates))

    for t in range(1000):
        gen.step(codes[t % 64])
    before = footprint()
    mx.clear_cache()
    active_before = mx.get_active_memory()
    for t in range(1000, STEPS):
        out = gen.step(codes[t % 64])
    assert gen.step_index == STEPS
    assert out is not None and len(out.audio_codes) == 8
    assert footprint() == before
    mx.clear_cache()
    assert mx.get_active_memory() <= active_before + 64 * 1024
