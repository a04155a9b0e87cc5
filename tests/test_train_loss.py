"""The training loss and its gradients on a tiny model: the loss of the teacher-forced
forward against a NumPy transcription of moshi-finetune's `compute_loss_with_mask` on the
same logits; the adapters' gradients against finite differences; checkpointing, the
split of a batch into micro-batches, and a quantized backbone."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from moshivis_mlx.adapters import is_adapter
from moshivis_mlx.models.lm import LM, tiny
from moshivis_mlx.quant import QuantSpec, quantize_model
from moshivis_mlx.train.loss import LossConfig, LossScale, batch_loss, loss_weights
from moshivis_mlx.train.model import prepare_for_training

PAD, EPAD = 3, 0


def random_lm(seed: int = 0) -> LM:
    """The tiny MoshiVis, every weight random (norm gains and gates too: every adapter
    matters and its gradient is not zero)."""
    mx.random.seed(seed)
    lm = LM(tiny(cross_attention=True))
    lm.load_weights([(k, 1.0 + 0.3 * mx.random.normal(v.shape) if "norm" in k else v)
                     for k, v in tree_flatten(lm.parameters())])
    mx.eval(lm.parameters())
    return lm


def batch(lm: LM, b: int = 3, t: int = 10, seed: int = 1):
    """Codes in the training layout with padding, end-of-padding, words, zero tokens (-1)
    in every stream; sample 2 is speechless (its audio all -1)."""
    cfg = lm.cfg
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (b, 1, t)),
                            rng.integers(0, cfg.card, (b, cfg.n_q, t))], axis=1)
    codes[:, 0][rng.random((b, t)) < 0.4] = PAD
    codes[:, 0][rng.random((b, t)) < 0.15] = EPAD
    codes[rng.random(codes.shape) < 0.1] = -1
    codes[2, 1:] = -1
    codes[1, :, t - 2:] = -1  # a shorter sequence, padded
    images = mx.random.normal((b, 5, cfg.image_dim), key=mx.random.key(seed))
    return codes.astype(np.int32), images


# -- moshi-finetune's loss, in NumPy -------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compute_loss_with_mask(logits, target, target_mask, mode, first_codebook_weight_multiplier=1.0,
                           text_padding_weight=1.0, text_padding_ids=None):
    """finetune/loss.py of kyutai-labs/moshi-finetune, line for line in NumPy."""
    target = np.where(target_mask, target, np.zeros_like(target))
    weights = target_mask.astype(np.float64)
    if mode == "audio":
        weights[:, 0] *= first_codebook_weight_multiplier
    elif mode == "text":
        for i in text_padding_ids:
            weights[target == i] *= text_padding_weight
    logits = logits.reshape(-1, logits.shape[-1])
    target = target.reshape(-1)
    weights = weights.reshape(-1)
    safe = np.where(np.isfinite(logits), logits, 0.0)  # masked rows: NaN, weight 0
    mb_loss = -log_softmax(safe)[np.arange(len(target)), target]
    mb_loss = np.where(weights > 0.0, mb_loss * weights, np.zeros_like(mb_loss))
    return mb_loss.sum() / weights.sum()


def reference_loss(out, codes: np.ndarray, n: int) -> float:
    """train.py of moshi-finetune: text loss + audio loss, on the forward's own masks."""
    text = compute_loss_with_mask(np.array(out.text_logits), codes[:, :1],
                                  np.array(out.text_mask), "text", text_padding_weight=0.5,
                                  text_padding_ids={PAD, EPAD})
    audio = compute_loss_with_mask(np.array(out.audio_logits), codes[:, 1: 1 + n],
                                   np.array(out.audio_mask), "audio",
                                   first_codebook_weight_multiplier=100.0)
    return text + audio


def our_loss(lm: LM, codes: np.ndarray, images, loss: LossConfig, speech=None):
    w_text, w_audio = loss_weights(codes, lm.cfg, loss, speech)
    factors = LossScale(w_text.sum(), w_audio.sum(), loss).factors()
    out = lm.forward(mx.array(codes), images, audio_codebooks=w_audio.shape[1])
    value, _ = batch_loss(out, mx.array(codes), mx.array(w_text), mx.array(w_audio), factors)
    return value, out, (w_text, w_audio)


@pytest.mark.parametrize("n", [8, 2])
def test_loss_equals_moshi_finetune_on_the_same_logits(n):
    lm = random_lm()
    codes, images = batch(lm)
    value, out, (w_text, w_audio) = our_loss(lm, codes, images, LossConfig(audio_codebooks=n))
    assert out.audio_logits.shape[1] == n
    # The weights come from the codes alone, and mark exactly the forward's masks.
    np.testing.assert_array_equal(w_text[:, None] > 0, np.array(out.text_mask))
    np.testing.assert_array_equal(w_audio > 0, np.array(out.audio_mask))
    assert np.isnan(np.array(out.audio_logits)[:, 1:, -1]).all()  # the acoustic delay
    ref = reference_loss(out, codes, n)
    assert float(value) == pytest.approx(ref, rel=1e-5)
    assert np.isfinite(ref) and ref > 1.0


def test_speechless_samples_add_no_audio_loss():
    """A speechless sample's audio (zero tokens, or Mimi's silence) is never scored, and a
    batch without speech runs no depth transformer at all."""
    lm = random_lm()
    codes, images = batch(lm)
    silence = codes.copy()
    silence[2, 1:] = 5  # speechless with its audio streams filled
    speech = np.array([True, True, False])
    _, _, (_, w_zero) = our_loss(lm, codes, images, LossConfig(), speech)
    _, _, (_, w_silence) = our_loss(lm, silence, images, LossConfig(), speech)
    np.testing.assert_array_equal(w_zero, w_silence)
    assert not w_silence[2].any()
    w_text, w_audio = loss_weights(codes[2:], lm.cfg, LossConfig(), speech[2:])
    assert w_audio.shape == (1, 0, codes.shape[-1])
    value, out, _ = our_loss(lm, codes[2:], images[2:], LossConfig(), speech[2:])
    text = compute_loss_with_mask(np.array(out.text_logits), codes[2:, :1],
                                  np.array(out.text_mask), "text", text_padding_weight=0.5,
                                  text_padding_ids={PAD, EPAD})
    assert float(value) == pytest.approx(text, rel=1e-5)


def test_user_turns_can_be_input_only():
    lm = random_lm()
    codes, _ = batch(lm)
    user = np.zeros(codes[:, 0].shape, dtype=bool)
    user[:, :4] = True
    w, _ = loss_weights(codes, lm.cfg, LossConfig(user_text_weight=0.0), None, user)
    assert not w[:, :4].any() and w[:, 4:].any()
    w1, _ = loss_weights(codes, lm.cfg, LossConfig(), None, user)
    np.testing.assert_array_equal(w1[:, 4:], w[:, 4:])


# -- gradients ------------------------------------------------------------------------------

def trainable_lm(seed: int = 0, checkpoint: bool = False) -> LM:
    lm = random_lm(seed)
    prepare_for_training(lm, checkpoint)
    return lm


ALL_CODEBOOKS = LossConfig(audio_codebooks=8)


def loss_and_grads(lm: LM, codes, images, loss: LossConfig = ALL_CODEBOOKS):
    w_text, w_audio = loss_weights(codes, lm.cfg, loss)
    factors = LossScale(w_text.sum(), w_audio.sum(), loss).factors()

    def fn(model):
        out = model.forward(mx.array(codes), images, audio_codebooks=w_audio.shape[1])
        return batch_loss(out, mx.array(codes), mx.array(w_text), mx.array(w_audio),
                          factors)[0]

    value, grads = nn.value_and_grad(lm, fn)(lm)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads)), fn


FD_EPS = 1e-1
FD_TOL = 1e-2
"""Central differences in float32 along a random unit direction of each adapter tensor
(a step of 0.1 along a unit vector: each weight moves ~0.1/sqrt(size)): the difference
of the two losses stays far above float32's rounding of the loss (~1e-7 relative) and
the third-order term below the tolerance. Pass: |fd - <g, d>| <= 1e-2 * max(|<g, d>|,
1e-2). Measured: at most 1.5e-3 over the 12 tensors (eps 1e-2: 8e-3; 1e-3: 7e-2, float32
rounding)."""


def test_adapter_gradients_agree_with_finite_differences():
    lm = trainable_lm()
    codes, images = batch(lm)
    _, grads, fn = loss_and_grads(lm, codes, images)
    names = sorted(grads)
    assert names and all(is_adapter(k) for k in names)
    assert {"xa.q_proj.weight", "xa.kv_proj.weight", "xa.out_proj.weight",
            "image_prefix.proj_xa.weight", "image_prefix.proj_xa.bias",
            "image_prefix.norm_xa.weight", "transformer.layers.1.xa_gate.linear_in.weight",
            "transformer.layers.0.norm_cross.weight"} <= set(names)
    params = dict(tree_flatten(lm.trainable_parameters()))
    rng = np.random.default_rng(0)
    worst = 0.0
    for name in names:
        d = rng.standard_normal(params[name].shape).astype(np.float32)
        d = mx.array(d / np.linalg.norm(d))
        ad = float(mx.sum(grads[name] * d))
        values = []
        for sign in (1, -1):
            lm.load_weights([(name, params[name] + sign * FD_EPS * d)], strict=False)
            values.append(float(fn(lm)))
        lm.load_weights([(name, params[name])], strict=False)
        fd = (values[0] - values[1]) / (2 * FD_EPS)
        err = abs(fd - ad) / max(abs(ad), 1e-2)
        worst = max(worst, err)
        assert err <= FD_TOL, f"{name}: finite difference {fd:.6g}, gradient {ad:.6g}"
    assert worst < FD_TOL


def test_frozen_backbone_gets_no_gradient_and_stays_unchanged():
    lm = trainable_lm()
    before = {k: np.array(v) for k, v in tree_flatten(lm.parameters()) if not is_adapter(k)}
    codes, images = batch(lm)
    _, grads, _ = loss_and_grads(lm, codes, images)
    assert not any(not is_adapter(k) for k in grads)
    optim.AdamW(1e-2).update(lm, tree_unflatten(list(grads.items())))
    after = {k: np.array(v) for k, v in tree_flatten(lm.parameters()) if not is_adapter(k)}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_gradients():
    codes, images = batch(random_lm())
    plain = loss_and_grads(trainable_lm(), codes, images)
    ckpt = loss_and_grads(trainable_lm(checkpoint=True), codes, images)
    assert float(plain[0]) == pytest.approx(float(ckpt[0]), rel=1e-6)
    for k in plain[1]:
        np.testing.assert_allclose(np.array(ckpt[1][k]), np.array(plain[1][k]), rtol=1e-4,
                                   atol=1e-6)


def test_micro_batches_sum_to_the_whole_batch():
    """The slices of one micro-batch, each divided by the micro-batch's totals: their
    losses and gradients sum to the whole micro-batch's (what data parallelism relies
    on: the processes share each micro-batch)."""
    lm = trainable_lm()
    codes, images = batch(lm, b=4)
    loss = LossConfig()
    whole_value, whole, _ = loss_and_grads(lm, codes, images, loss)
    w_text, w_audio = loss_weights(codes, lm.cfg, loss)
    factors = LossScale(w_text.sum(), w_audio.sum(), loss).factors()
    total, summed = 0.0, {}
    for part in (slice(0, 1), slice(1, 4)):
        c = codes[part]
        wt, wa = loss_weights(c, lm.cfg, loss)

        def fn(model, c=c, wt=wt, wa=wa, part=part):
            out = model.forward(mx.array(c), images[part], audio_codebooks=wa.shape[1])
            return batch_loss(out, mx.array(c), mx.array(wt), mx.array(wa), factors)[0]

        value, grads = nn.value_and_grad(lm, fn)(lm)
        total += float(value)
        for k, g in tree_flatten(grads):
            summed[k] = summed.get(k, 0) + np.array(g)
    assert total == pytest.approx(float(whole_value), rel=1e-5)
    for k in whole:
        np.testing.assert_allclose(summed[k], np.array(whole[k]), rtol=1e-4, atol=1e-7)


def test_accumulated_step_is_the_mean_of_its_micro_batches():
    """moshi-finetune divides the accumulated loss and gradients by the number of
    micro-batches: the step's loss is the mean of the micro-batches' own losses (each
    normalised by its own weights), not the combined batch's; the compiled step of the
    trainer, accumulating two micro-batches of unequal weight, gives exactly that."""
    from moshivis_mlx.train.trainer import Batch, Steps, TrainOptions, micro_batch_factors

    lm = trainable_lm()
    codes, images = batch(lm, b=4)
    # First micro-batch: the speechless sample alone (a text loss only, where the other
    # has text and audio), so the mean and the combined batch's loss are far apart.
    order = [2, 0, 1, 3]
    codes, images = codes[order], images[mx.array(order)]
    loss = LossConfig()
    parts = (slice(0, 1), slice(1, 4))
    alone = [loss_and_grads(lm, codes[p], images[p], loss)[:2] for p in parts]
    local = []
    for p in parts:
        wt, wa = loss_weights(codes[p], lm.cfg, loss)
        local.append(Batch(mx.array(codes[p]), images[p], mx.array(wt), mx.array(wa),
                           len(codes[p]), int((wt > 0).sum() + (wa > 0).sum())))
    factors, totals = micro_batch_factors(local, loss)
    w_text, w_audio = loss_weights(codes, lm.cfg, loss)
    np.testing.assert_allclose(totals, [w_text.sum(), w_audio.sum(), 4,
                                        (w_text > 0).sum() + (w_audio > 0).sum()], rtol=1e-6)
    steps = Steps(lm, optim.AdamW(1e-3), TrainOptions(train=None, out=None, loss=loss), None)
    value, grad = 0.0, None
    for j, b in enumerate(local):
        share, _, _, grad = steps.step(b.codes, b.images, b.w_text, b.w_audio, factors[j],
                                       grad, False)
        value += float(share)
    mean = (float(alone[0][0]) + float(alone[1][0])) / 2
    assert value == pytest.approx(mean, rel=1e-5)
    combined = float(loss_and_grads(lm, codes, images, loss)[0])
    assert abs(combined - mean) > 0.1 * mean  # the two rules differ on these batches
    accumulated = dict(tree_flatten(grad))
    assert set(accumulated) == set(alone[0][1])
    for k, g in accumulated.items():
        want = (np.array(alone[0][1][k]) + np.array(alone[1][1][k])) / 2
        np.testing.assert_allclose(np.array(g), want, rtol=1e-4, atol=1e-7)


def test_quantized_backbone_passes_gradients_to_the_adapters():
    """A q8 backbone stays quantized and frozen; its adapters (quantized in the bundle like
    every layer) become float32 and get gradients through the quantized layers."""
    lm = random_lm()
    quantize_model(lm, QuantSpec(8, 32))
    assert isinstance(lm.xa.q_proj, nn.QuantizedLinear)
    prepare_for_training(lm)
    assert isinstance(lm.transformer.layers[1].self_attn.in_proj, nn.QuantizedLinear)
    assert isinstance(lm.xa.q_proj, nn.Linear) and lm.xa.q_proj.weight.dtype == mx.float32
    codes, images = batch(lm)
    value, grads, _ = loss_and_grads(lm, codes, images)
    assert np.isfinite(float(value))
    g = np.array(grads["transformer.layers.0.xa_gate.linear_in.weight"])
    assert np.isfinite(g).all() and np.abs(g).max() > 0
