"""The teacher-forced forward over a whole sequence (the seam of training and scoring):
against Kyutai's `LMModel.forward`, against our own streaming generator step by step, with
and without an image; and a batch of conversations against the same conversations alone."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshivis_mlx import LM, Generator, Sampler
from moshivis_mlx.models.lm import tiny

TOL = 1e-4


def random_lm(cross_attention: bool, seed: int = 0, context: int = 24) -> LM:
    """A tiny LM with every weight random (norm gains too, so that every weight matters)."""
    mx.random.seed(seed)
    cfg = tiny(cross_attention=cross_attention)
    cfg.context = context
    lm = LM(cfg)
    lm.load_weights([(k, 1.0 + 0.3 * mx.random.normal(v.shape) if "norm" in k else v)
                     for k, v in tree_flatten(lm.parameters())])
    mx.eval(lm.parameters())
    return lm


def greedy(lm: LM, **kw) -> Generator:
    return Generator(lm, Sampler(0.0), Sampler(0.0), keep_logits=True, **kw)


def image_tokens(lm: LM, n: int = 6, seed: int = 3, batch: int = 1) -> mx.array:
    return mx.random.normal((batch, n, lm.cfg.image_dim), key=mx.random.key(seed))


def teacher_forced_run(gen: Generator, steps: int, seed: int = 1):
    """Streams `steps` frames of random user codes with random forced model tokens; returns
    the tokens fed ([steps, 9] forced, [steps, 8] user), the logits and outputs per step."""
    cfg = gen.lm.cfg
    rng = np.random.default_rng(seed)
    user = rng.integers(0, cfg.card, size=(steps, gen.num_user_codes))
    forced = np.concatenate([rng.integers(0, cfg.text_card, size=(steps, 1)),
                             rng.integers(0, cfg.card, size=(steps, cfg.dep_q))], axis=1)
    text_logits, audio_logits, outputs = [], [], []
    for s in range(steps):
        outputs.append(gen.step(user[s], force_text=forced[s, 0], force_audio=forced[s, 1:]))
        text_logits.append(np.array(gen.last_text_logits[0]))
        audio_logits.append(np.array(gen.last_audio_logits[0]))
    return forced, user, np.array(text_logits), np.array(audio_logits), outputs


def training_codes(cfg, forced: np.ndarray, user: np.ndarray) -> np.ndarray:
    """The same conversation in Kyutai's training layout [1, 17, T], T = steps - 1: model
    row r at time t is what was generated at step t + delay[r]; the user's codes at time t
    are the frame given at step t + 1."""
    steps = forced.shape[0]
    t_len = steps - 1
    codes = np.zeros((1, 1 + cfg.n_q, t_len), dtype=np.int32)
    n_model = 1 + cfg.dep_q
    for r in range(n_model):
        d = cfg.delays[r]
        for t in range(t_len):
            codes[0, r, t] = forced[t + d, r] if t + d < steps else -1
    codes[0, n_model:, :] = user[1:steps].T
    return codes


@pytest.mark.parametrize("with_image", [False, True], ids=["moshi", "moshivis"])
def test_forward_equals_the_streaming_generator_step_by_step(with_image):
    lm = random_lm(cross_attention=True, seed=2)
    gen = greedy(lm, xa_start=0)
    image = image_tokens(lm) if with_image else None
    gen.set_image(image)
    steps = 14
    forced, user, text_logits, audio_logits, outputs = teacher_forced_run(gen, steps)
    codes = training_codes(lm.cfg, forced, user)
    out = lm.forward(mx.array(codes), image_tokens=image)
    t_len = codes.shape[-1]
    assert out.text_logits.shape == (1, 1, t_len, lm.cfg.text_card)
    assert out.audio_logits.shape == (1, lm.cfg.dep_q, t_len, lm.cfg.card)
    # Text: position t is streaming step t.
    np.testing.assert_allclose(np.array(out.text_logits[0, 0]), text_logits[:t_len], atol=TOL)
    # Audio codebook k (delay d): position t is streaming step t + d; the last d are NaN.
    audio = np.array(out.audio_logits[0])
    mask = np.array(out.audio_mask[0])
    for k in range(lm.cfg.dep_q):
        d = lm.cfg.delays[1 + k]
        np.testing.assert_allclose(audio[k, : t_len - d], audio_logits[d:t_len, k], atol=TOL)
        assert np.isnan(audio[k, t_len - d:]).all() and not mask[k, t_len - d:].any()
        assert mask[k, : t_len - d].all()
    assert np.array(out.text_mask).all()
    if with_image:
        # The gate of step t is what the stream reports with the frame it completes (t + 1).
        streamed = np.array([o.gate for o in outputs[1: t_len + 1]])
        np.testing.assert_allclose(np.array(out.gates[0]), streamed, atol=1e-6)
        assert (streamed > 0).all() and (streamed < 1).all()
    else:
        assert out.gates is None and all(o is None or o.gate is None for o in outputs)


def test_forward_window_slides_like_the_stream():
    """A sequence longer than the attention window: the forward's sliding-window mask is
    the streaming ring cache's."""
    lm = random_lm(cross_attention=False, seed=4, context=5)
    gen = greedy(lm)
    forced, user, text_logits, _, _ = teacher_forced_run(gen, 16, seed=7)
    out = lm.forward(mx.array(training_codes(lm.cfg, forced, user)))
    np.testing.assert_allclose(np.array(out.text_logits[0, 0]), text_logits[:15], atol=TOL)


def test_zero_tokens_are_masked_and_embed_nothing():
    lm = random_lm(cross_attention=False, seed=5)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, lm.cfg.card, size=(2, 17, 9)).astype(np.int32)
    codes[:, 0] = rng.integers(0, lm.cfg.text_card, size=(2, 9))
    codes[0, 0, 3] = -1
    codes[1, 2, 5] = -1
    out = lm.forward(mx.array(codes))
    text_mask, audio_mask = np.array(out.text_mask), np.array(out.audio_mask)
    assert not text_mask[0, 0, 3] and text_mask[0, 0, :3].all() and text_mask[1, 0].all()
    assert not audio_mask[1, 1, 5] and audio_mask[0, 1, :-1].all()


def test_a_batch_of_two_conversations_equals_each_alone():
    """Batch 2, each conversation with its own image and user codes, greedy: the same
    tokens, gates and logits as two batch-1 generators."""
    lm = random_lm(cross_attention=True, seed=6)
    images = image_tokens(lm, batch=2, seed=9)
    rng = np.random.default_rng(3)
    user = rng.integers(0, lm.cfg.card, size=(12, 2, 8))
    both = greedy(lm, xa_start=3, batch_size=2)
    both.set_image(images)
    alone = [greedy(lm, xa_start=3) for _ in range(2)]
    for i, g in enumerate(alone):
        g.set_image(images[i])
    for s in range(12):
        out = both.step(user[s])
        outs = [g.step(user[s, i]) for i, g in enumerate(alone)]
        if s == 0:
            assert out is None and outs == [None, None]
            continue
        for i, o in enumerate(outs):
            assert out.text[i] == o.text_token and out.audio[i].tolist() == o.audio_codes
            assert (out.gates is None) == (o.gate is None)
            if o.gate is not None:
                assert abs(out.gates[i] - o.gate) < 1e-6
            np.testing.assert_allclose(np.array(both.last_text_logits[i]),
                                       np.array(alone[i].last_text_logits[0]), atol=1e-5)
    # The two conversations really differ (a batch that copied row 0 would fail above, but
    # only if they do).
    assert not np.array_equal(np.array(both.last_text_logits[0]),
                              np.array(both.last_text_logits[1]))
    with pytest.raises(ValueError, match="batch of 2"):
        out.text_token  # noqa: B018


@pytest.mark.torch
def test_forward_matches_kyutais_lmmodel_forward(tmp_path):
    """Kyutai's LMModel.forward (moshi 0.2.13, fp32) on random codes with zero tokens, batch
    2: logits within 1e-4, the same masks, NaN in the same places."""
    import torch
    from moshivis_mlx.weights_convert.convert import ConvertOptions, convert
    from reference import build_moshi_lm, save_released, tiny_lm_kwargs

    from moshivis_mlx import load_lm

    kwargs = tiny_lm_kwargs(context=7)
    pt = build_moshi_lm(kwargs, seed=3)
    weights = save_released(pt, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(kwargs))
    bundle = convert(ConvertOptions(out=tmp_path / "bundle", moshi_weights=weights,
                                    kyutai_config=tmp_path / "config.json", dtype="float32",
                                    quantization=None))
    ours = load_lm(bundle)

    rng = np.random.default_rng(11)
    b, t = 2, 12  # longer than the 7-step window
    codes = rng.integers(0, 64, size=(b, 17, t))
    codes[:, 0] = rng.integers(0, 96, size=(b, t))
    codes[0, 0, 4] = -1
    codes[1, 3, 2] = -1
    codes[0, 12, 7] = -1
    with torch.no_grad():
        ref = pt(torch.from_numpy(codes.astype(np.int64)))
    out = ours.forward(mx.array(codes.astype(np.int32)))

    for mine, theirs in ((out.text_logits, ref.text_logits), (out.audio_logits, ref.logits)):
        mine, theirs = np.array(mine), theirs.numpy()
        assert mine.shape == theirs.shape
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        valid = ~np.isnan(theirs)
        assert valid.mean() > 0.8
        np.testing.assert_allclose(mine[valid], theirs[valid], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.array(out.text_mask), ref.text_mask.numpy())
    np.testing.assert_array_equal(np.array(out.audio_mask), ref.mask.numpy())
