"""The public generation API: Generator semantics, input checks and samplers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moshivis_mlx import LM, Generator, Sampler, StepOutput
from moshivis_mlx.models.lm import tiny


@pytest.fixture(scope="module")
def lm():
    mx.random.seed(7)
    model = LM(tiny(cross_attention=True))
    mx.eval(model.parameters())
    return model


def test_step_outputs(lm):
    gen = Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0))
    assert gen.step([1] * 8) is None
    out = gen.step(np.arange(8))
    assert isinstance(out, StepOutput)
    assert isinstance(out.text_token, int) and 0 <= out.text_token < lm.cfg.text_card
    assert len(out.audio_codes) == 8 and all(isinstance(c, int) for c in out.audio_codes)
    assert all(0 <= c < lm.cfg.card for c in out.audio_codes)
    assert out.gate is None
    assert gen.step_index == 2


def test_model_frame_is_undelayed(lm):
    """Output of step s = text and codebook 0 generated at s-1, codebooks 1..7 at s."""
    gen = Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0))
    raw = []
    for t in range(6):
        out = gen.step([t] * 8)
        raw.append(gen.last_tokens[0].tolist())
        if t:
            assert out.text_token == raw[t - 1][0]
            assert out.audio_codes[0] == raw[t - 1][1]
            assert out.audio_codes[1:] == raw[t][2:]


def test_default_samplers_are_kyutais(lm):
    gen = Generator(lm)
    assert (gen.text_sampler.temperature, gen.text_sampler.top_k) == (0.7, 25)
    assert (gen.audio_sampler.temperature, gen.audio_sampler.top_k) == (0.8, 250)


def test_reset_replays_a_seeded_conversation(lm):
    gen = Generator(lm, Sampler(temperature=1.0, seed=3), Sampler(temperature=1.0, seed=4))
    codes = np.random.default_rng(0).integers(0, lm.cfg.card, size=(10, 8))
    first = [gen.step(c) for c in codes]
    gen.reset()
    second = [gen.step(c) for c in codes]
    assert first == second
    assert len({o.text_token for o in first[1:]}) > 1  # sampling really happened


@pytest.mark.parametrize("codes,match", [
    ([1] * 7, "expected 8 user codes"),
    ([1] * 7 + [64], r"in \[0, 64\)"),
    ([1] * 7 + [-2], r"in \[0, 64\)"),
    ([0.5] * 8, "integers"),
])
def test_bad_user_codes(lm, codes, match):
    gen = Generator(lm)
    with pytest.raises(ValueError, match=match):
        gen.step(codes)


def test_bad_images(lm):
    gen = Generator(lm)
    with pytest.raises(ValueError, match="width"):
        gen.set_image(mx.zeros((4, lm.cfg.image_dim + 1)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        gen.set_image(mx.zeros((2, 4, lm.cfg.image_dim)))
    plain = LM(tiny(cross_attention=False))
    with pytest.raises(ValueError, match="plain Moshi"):
        Generator(plain).set_image(mx.zeros((4, 48)))


def test_image_accepts_batched_and_numpy(lm):
    gen = Generator(lm, xa_start=0)
    tokens = np.random.default_rng(0).standard_normal((1, 5, lm.cfg.image_dim)).astype(np.float32)
    gen.set_image(tokens)
    gen.step([0] * 8)
    assert gen.step([0] * 8).gate is not None
    gen.set_image(None)
    gen.step([0] * 8)
    assert gen.step([0] * 8).gate is None


# -- samplers -------------------------------------------------------------------------------

LOGITS = mx.array([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])


def test_greedy_is_argmax():
    assert Sampler(temperature=0.0)(LOGITS).tolist() == [1]


def test_top_k_restricts_the_support():
    s = Sampler(temperature=5.0, top_k=3, seed=0)
    drawn = {s(LOGITS).item() for _ in range(300)}
    assert drawn == {1, 3, 5}


@pytest.mark.parametrize("noise", [False, True])
def test_top_k_draws_follow_the_tempered_distribution_of_the_k_best(noise):
    """Top-k draws among the k best with the softmax of their tempered logits (the draw's
    index mapped back to the vocabulary), whether the noise comes per draw or at once."""
    logits = mx.array([[0.3, 2.0, -1.0, 1.2, 0.1, 1.6, -0.4]])
    s = Sampler(temperature=0.8, top_k=4, seed=0)
    if noise:
        n = s.noise(mx.random.key(9), (4000, 1), logits.shape[-1])
        draws = np.array([s.sample(logits, noise=n[i]).item() for i in range(4000)])
    else:
        draws = np.array([s(logits).item() for _ in range(4000)])
    best = np.argsort(-np.array(logits[0]))[:4]
    p = np.zeros(7)
    p[best] = np.exp(np.array(logits[0])[best] / 0.8)
    p /= p.sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=7) / len(draws), p, atol=0.03)


def test_top_p_restricts_the_support():
    s = Sampler(temperature=1.0, top_p=0.05, seed=0)
    assert {s(LOGITS).item() for _ in range(100)} == {1}
    wide = Sampler(temperature=1.0, top_p=0.9, seed=0)
    assert len({wide(LOGITS).item() for _ in range(300)}) >= 3


def test_temperature_follows_the_distribution():
    s = Sampler(temperature=1.0, seed=0)
    draws = np.array([s(LOGITS).item() for _ in range(4000)])
    p = np.exp(np.array(LOGITS[0]))
    p /= p.sum()
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_seeds_are_reproducible_and_independent():
    a, b = Sampler(temperature=1.0, seed=11), Sampler(temperature=1.0, seed=11)
    seq_a = [a(LOGITS).item() for _ in range(20)]
    mx.random.seed(123)  # the global stream does not matter to a seeded sampler
    assert seq_a == [b(LOGITS).item() for _ in range(20)]
    a.reset()
    assert seq_a == [a(LOGITS).item() for _ in range(20)]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 1.5}])
def test_bad_sampler_args(kwargs):
    with pytest.raises(ValueError):
        Sampler(**kwargs)


def test_async_steps_match_synchronous_ones(lm):
    codes = np.random.default_rng(1).integers(0, lm.cfg.card, size=(12, 8))

    def make():
        g = Generator(lm, Sampler(temperature=1.0, seed=5), Sampler(temperature=1.0, seed=6),
                      xa_start=2)
        g.set_image(mx.ones((3, lm.cfg.image_dim)))
        return g

    g = make()
    sync = [g.step(c) for c in codes]
    g = make()
    pending = [g.step_async(codes[0])]
    outs = []
    for c in codes[1:]:  # submit step n+1 before collecting step n
        pending.append(g.step_async(c))
        outs.append(pending[-2].result())
    outs.append(pending[-1].result())
    assert outs == sync
    g = make()
    handles = [g.step_async(c) for c in codes]
    assert [h.result() for h in reversed(handles)][::-1] == sync  # any collection order


def test_reset_discards_pending_steps(lm):
    g = Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0))
    h = g.step_async([0] * 8)
    g.reset()
    with pytest.raises(RuntimeError, match="reset"):
        h.result()
    assert g.step([0] * 8) is None


def test_warm_up_compiles_every_variant_and_starts_afresh(lm):
    def make():
        return Generator(lm, Sampler(temperature=1.0, seed=2), Sampler(temperature=1.0, seed=3),
                         xa_start=3)

    codes = np.random.default_rng(2).integers(0, lm.cfg.card, size=(6, 8))
    image = mx.random.normal((5, lm.cfg.image_dim), key=mx.random.key(4))
    cold = make()
    cold.set_image(image)
    expected = [cold.step(c) for c in codes]

    warm = make()
    warm.warm_up(image_tokens=5)  # no image yet: one may come later
    # Without and with the image, each before and after the window is full.
    assert len(warm._step_fns) == 4 and warm.step_index == 0 and warm.image_kv is None
    warm.set_image(image)
    variants = dict(warm._step_fns)
    assert [warm.step(c) for c in codes] == expected
    assert warm._step_fns == variants  # nothing compiled during the conversation


def test_a_full_window_attends_without_a_mask_to_the_same_tokens(lm):
    """Once the ring buffer has wrapped every slot is in the window: the step drops the
    mask (a GPU build then has a fused kernel for it) and nothing else changes."""
    codes = np.random.default_rng(5).integers(0, lm.cfg.card, size=(3 * lm.cfg.context, 8))
    image = mx.random.normal((5, lm.cfg.image_dim), key=mx.random.key(6))

    def run(unmasked: bool) -> list:
        g = Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0), xa_start=4)
        g.set_image(image)
        if not unmasked:
            g.window_full_at = 10**9
        out = [g.step(c) for c in codes]
        fulls = {key[2] for key in g._step_fns}
        assert fulls == ({False, True} if unmasked else {False})
        return out

    assert run(unmasked=True) == run(unmasked=False)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_early_steps_read_only_the_written_slots_to_the_same_tokens(kv_bits):
    """Before the ring buffer wraps, a step attends to the written slots only (rounded up to
    `span_step`): the same tokens and logits as attending to the whole buffer under the
    mask, through every span and past the wrap; warm_up compiles each span beforehand."""
    cfg = tiny()
    cfg.num_heads = 2  # 32-wide heads: an 8-bit cache can quantize them
    cfg.context = 40
    mx.random.seed(7)
    model = LM(cfg)
    mx.eval(model.parameters())
    codes = np.random.default_rng(8).integers(0, cfg.card, size=(2 * cfg.context + 5, 8))

    def run(span_step: int) -> tuple[list, list]:
        g = Generator(model, Sampler(temperature=0.0), Sampler(temperature=0.0),
                      keep_logits=True, kv_bits=kv_bits)
        g.span_step = span_step
        g.warm_up()
        compiled = dict(g._step_fns)
        out, logits = [], []
        for c in codes:
            out.append(g.step(c))
            logits.append(np.array(g.last_text_logits))
        assert g._step_fns == compiled  # nothing compiled mid-conversation
        spans = {key[3] for key in compiled}
        return out, logits, spans

    spanned, spanned_logits, spans = run(span_step=8)
    assert spans == {8, 16, 24, 32, None}
    whole, whole_logits, spans = run(span_step=10**6)
    assert spans == {None}
    assert spanned == whole
    for a, b in zip(spanned_logits, whole_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_top_k_keeps_exactly_the_k_most_likely():
    from moshivis_mlx.sampling import keep_top_k

    logprobs = mx.random.normal((3, 50), key=mx.random.key(7))
    kept = np.array(keep_top_k(logprobs, 5))
    want = np.argsort(-np.array(logprobs), axis=-1)[:, :5]
    for row, top in zip(kept, want):
        assert set(np.flatnonzero(np.isfinite(row))) == set(top)
    np.testing.assert_array_equal(kept[np.isfinite(kept)],
                                  np.array(logprobs)[np.isfinite(kept)])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_is_kyutais_nucleus(p):
    """Kyutai's rule (moshi's sampling): sort descending, drop a token when the mass of
    those before it exceeds p."""
    from moshivis_mlx.sampling import keep_top_p

    logits = 2.0 * mx.random.normal((4, 40), key=mx.random.key(3))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    got = np.isfinite(np.array(keep_top_p(logprobs, p)))
    probs = np.exp(np.array(logprobs, dtype=np.float64))
    for row, prob in zip(got, probs):
        order = np.argsort(-prob)
        before = np.cumsum(prob[order]) - prob[order]
        want = np.zeros_like(row)
        want[order[before <= p]] = True
        np.testing.assert_array_equal(row, want)
        assert row.sum() >= 1


def test_limit_compiled_forgets_variants_beyond_the_bound(lm):
    """A server whose clients choose their sampling compiles a variant per setting; beyond
    the bound they are forgotten (and compile again when used), not kept forever."""
    gen = Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0))
    codes = np.zeros(gen.num_user_codes, dtype=np.int32)
    for t in (0.5, 0.6, 0.7):
        gen.text_sampler = Sampler(temperature=t, seed=0)
        gen.step(codes)
    count = len(gen._step_fns)
    assert count >= 3
    gen.limit_compiled(count)
    assert len(gen._step_fns) == count
    gen.limit_compiled(count - 1)
    assert len(gen._step_fns) == 0
    gen.step(codes)  # compiles again
    assert len(gen._step_fns) == 1
