"""The memory accounting of moshivis-train --estimate against the peak MLX measures for a
real training step of small models (q8 backbone, bfloat16 activations, float32 adapters,
AdamW): the total, and what each more layer adds."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from moshivis_mlx.models.lm import LM, DepformerConfig, LmConfig
from moshivis_mlx.quant import QuantSpec, quantize_model
from moshivis_mlx.train.estimate import estimate, estimate_report
from moshivis_mlx.train.loss import LossConfig, LossScale, batch_loss, loss_weights
from moshivis_mlx.train.model import prepare_for_training

Q8 = QuantSpec(8, 64)
T, N = 375, 512


def small(layers: int) -> LmConfig:
    return LmConfig(dim=256, num_heads=4, num_layers=layers, ffn_hidden=704, text_card=1000,
                    cross_attention=True, image_dim=128, xa_gate_hidden=32,
                    depformer=DepformerConfig(dim=64, num_heads=2, num_layers=2, ffn_hidden=176))


def measured_peak(cfg: LmConfig, checkpoint: bool) -> int:
    """Peak bytes of one optimizer step, the model and optimizer state included."""
    mx.random.seed(0)
    lm = LM(cfg)
    lm.set_dtype(mx.bfloat16)
    quantize_model(lm, Q8)
    prepare_for_training(lm, checkpoint)
    opt = optim.AdamW(1e-4)
    opt.init(lm.trainable_parameters())
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, T)),
                            rng.integers(0, cfg.card, (1, cfg.n_q, T))], axis=1).astype(np.int32)
    images = mx.random.normal((1, N, cfg.image_dim)).astype(mx.bfloat16)
    loss = LossConfig()
    w_text, w_audio = loss_weights(codes, cfg, loss)
    factors = LossScale(w_text.sum(), w_audio.sum(), loss).factors()

    def fn(model):
        out = model.forward(mx.array(codes), images, audio_codebooks=2)
        return batch_loss(out, mx.array(codes), mx.array(w_text), mx.array(w_audio),
                          factors)[0]

    mx.eval(lm.parameters(), opt.state)
    mx.synchronize()
    gc.collect()  # what earlier tests left for the collector is not this step's
    mx.clear_cache()
    mx.reset_peak_memory()
    value, grads = nn.value_and_grad(lm, fn)(lm)
    opt.update(lm, grads)
    mx.eval(value, lm.parameters(), opt.state)
    return mx.get_peak_memory()


@pytest.mark.slow
def test_the_estimate_bounds_the_measured_peak():
    rows = []
    for layers in (2, 6):
        cfg = small(layers)
        peak = measured_peak(cfg, checkpoint=True)
        est = estimate(cfg, Q8, batch=1, frames=T, audio_codebooks=2, image_tokens=N).total_bytes
        rows.append((layers, peak, est))
    print("\n" + "\n".join(f"{n} layers: measured {p / 1e6:.1f} MB, estimated {e / 1e6:.1f} MB"
                           for n, p, e in rows))
    for _, peak, est in rows:
        assert 0.9 * peak <= est <= 1.8 * peak  # conservative: the fixed part is over-counted
    (_, p2, e2), (_, p6, e6) = rows
    slope_measured, slope_estimated = (p6 - p2) / 4, (e6 - e2) / 4
    assert 0.7 <= slope_estimated / slope_measured <= 1.5  # what each layer adds


def test_the_full_size_report_fits_a_32_gb_mac():
    e = estimate()  # MoshiVis 7B, q8, batch 1, 30 s, 2 codebooks, checkpointing
    assert 190e6 < e.adapter_params < 220e6
    assert 7e9 < e.backbone_bytes < 8.5e9
    assert e.total_bytes < 22e9
    no_ckpt = estimate(grad_checkpoint=False)
    assert e.total_bytes < no_ckpt.total_bytes < 22e9
    text = estimate_report()
    assert "total" in text and "s a step" in text and "q8" in text
