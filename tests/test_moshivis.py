"""MoshiVis' gated cross-attention: exactness against plain Moshi, a NumPy reference of the
cross-attention + gate block, image K/V computed once, shared projections stored once."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from moshivis_mlx.weights_convert.convert import ConvertOptions, convert

from moshivis_mlx import LM, Generator, Sampler, load_lm
from moshivis_mlx.models.lm import tiny
from moshivis_mlx.models.transformer import CrossAttention, CrossAttentionInput

VISION_ONLY = ("xa.", "image_prefix.", "norm_cross.", "xa_gate.")


def random_vis_lm(seed: int = 0) -> LM:
    mx.random.seed(seed)
    lm = LM(tiny(cross_attention=True))
    # Random norm gains too, so that every weight matters.
    params = tree_flatten(lm.parameters())
    lm.load_weights([(k, 1.0 + 0.3 * mx.random.normal(v.shape) if k.endswith("norm1.weight")
                      or "norm" in k.split(".")[-2] else v) for k, v in params])
    mx.eval(lm.parameters())
    return lm


def backbone_of(vis: LM) -> LM:
    """Plain Moshi with exactly the backbone weights of `vis`."""
    plain = LM(tiny(cross_attention=False))
    weights = [(k, v) for k, v in tree_flatten(vis.parameters())
               if not any(part in k for part in VISION_ONLY)]
    plain.load_weights(weights, strict=True)
    mx.eval(plain.parameters())
    return plain


def greedy(lm: LM, **kw) -> Generator:
    return Generator(lm, Sampler(temperature=0.0), Sampler(temperature=0.0), keep_logits=True, **kw)


def image_tokens(seed: int = 1, n: int = 10) -> mx.array:
    return mx.random.normal((n, tiny().image_dim), key=mx.random.key(seed))


def run(gen: Generator, steps: int = 24, seed: int = 5):
    codes = np.random.default_rng(seed).integers(0, gen.lm.cfg.card, size=(8, steps))
    outs, logits = [], []
    for t in range(steps):
        out = gen.step(codes[:, t])
        outs.append(None if out is None else (out.text_token, tuple(out.audio_codes), out.gate))
        logits.append((np.array(gen.last_text_logits), np.array(gen.last_audio_logits)))
    return outs, logits


def tokens_only(outs):
    return [None if o is None else o[:2] for o in outs]


def assert_bit_exact(a, b):
    (outs_a, logits_a), (outs_b, logits_b) = a, b
    assert tokens_only(outs_a) == tokens_only(outs_b)
    for (ta, aa), (tb, ab) in zip(logits_a, logits_b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(aa, ab)


def test_no_image_is_exactly_plain_moshi():
    vis = random_vis_lm()
    a = run(greedy(vis, xa_start=0))
    b = run(greedy(backbone_of(vis)))
    assert_bit_exact(a, b)
    assert all(o is None or o[2] is None for o in a[0])


def test_zero_gates_are_exactly_plain_moshi():
    vis = random_vis_lm()
    gen = greedy(vis, xa_start=0)
    gen.set_image(image_tokens())
    gen.gate_override = 0.0
    a = run(gen)
    b = run(greedy(backbone_of(vis)))
    assert_bit_exact(a, b)


def test_image_changes_the_output():
    """Guards the two exactness tests above: with real gates the image does matter."""
    vis = random_vis_lm()
    gen = greedy(vis, xa_start=0)
    gen.set_image(image_tokens())
    with_image = run(gen)
    plain = run(greedy(backbone_of(vis)))
    diff = max(float(np.abs(x[0] - y[0]).max()) for x, y in zip(with_image[1], plain[1]))
    assert diff > 1e-4
    gates = [o[2] for o in with_image[0] if o is not None]
    assert all(g is not None and 0.0 < g < 1.0 for g in gates)


def test_xa_start_delays_the_image():
    vis = random_vis_lm()
    xa_start = 6
    gen = greedy(vis, xa_start=xa_start)
    gen.set_image(image_tokens())
    outs, logits = run(gen, steps=12)
    plain_outs, plain_logits = run(greedy(backbone_of(vis)), steps=12)
    for t in range(xa_start):  # identical before xa_start
        np.testing.assert_array_equal(logits[t][0], plain_logits[t][0])
    assert np.abs(logits[xa_start][0] - plain_logits[xa_start][0]).max() > 0
    # The gate travels with the text token it produced (text is delayed by one step).
    assert [o[2] is None for o in outs[1:]] == [t - 1 < xa_start for t in range(1, 12)]


def test_image_kv_computed_once_per_image(monkeypatch):
    vis = random_vis_lm()
    calls = []
    original = CrossAttention.image_kv
    monkeypatch.setattr(CrossAttention, "image_kv",
                        lambda self, x: calls.append(x.shape) or original(self, x))
    gen = greedy(vis, xa_start=0)
    gen.set_image(image_tokens(1))
    run(gen, steps=10)
    assert len(calls) == 1
    gen.set_image(image_tokens(2))
    assert gen.step_index == 10  # the conversation goes on
    run(gen, steps=5)
    assert len(calls) == 2
    gen.set_image(image_tokens(3), reset=True)
    assert gen.step_index == 0


def test_every_layer_uses_the_one_shared_cross_attention(monkeypatch):
    vis = random_vis_lm()
    assert not any("xa." in k and "layers." in k and "xa_gate" not in k
                   for k, _ in tree_flatten(vis.parameters()))
    used = []
    original = CrossAttention.__call__
    monkeypatch.setattr(CrossAttention, "__call__",
                        lambda self, *a: used.append(id(self)) or original(self, *a))
    gen = greedy(vis, xa_start=0)
    gen.set_image(image_tokens())
    gen.step([0] * 8)
    assert used == [id(vis.xa)] * vis.cfg.num_layers


def _np_rms(x, w, eps=1e-8):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_cross_attention_block_matches_numpy():
    """x + sigmoid(W2 relu(W1 y) - 4) * y, y = out(softmax(q k^T / sqrt(hd)) v), against NumPy."""
    vis = random_vis_lm(seed=3)
    layer = vis.transformer.layers[1]
    cfg = vis.cfg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, cfg.dim)).astype(np.float32)  # 3 query steps
    img = rng.standard_normal((1, 7, cfg.image_dim)).astype(np.float32)

    prefix = vis.image_prefix(mx.array(img))
    keys, values = vis.xa.image_kv(prefix)
    cross = CrossAttentionInput(vis.xa, keys, values)
    ours = np.array(layer.cross_attention_block(mx.array(x), cross))

    w = {k: np.array(v) for k, v in tree_flatten(vis.parameters())}
    h, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    p = img @ w["image_prefix.proj_xa.weight"].T + w["image_prefix.proj_xa.bias"]
    p = _np_rms(p, w["image_prefix.norm_xa.weight"])
    k = (p @ w["xa.kv_proj.weight"][: cfg.dim].T).reshape(1, 7, h, hd).transpose(0, 2, 1, 3)
    v = (p @ w["xa.kv_proj.weight"][cfg.dim:].T).reshape(1, 7, h, hd).transpose(0, 2, 1, 3)
    xn = _np_rms(x, w["transformer.layers.1.norm_cross.weight"])
    q = (xn @ w["xa.q_proj.weight"].T).reshape(1, 3, h, hd).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(1, 3, cfg.dim) @ w["xa.out_proj.weight"].T
    g1 = np.maximum(y @ w["transformer.layers.1.xa_gate.linear_in.weight"].T, 0)
    gate = 1 / (1 + np.exp(-(g1 @ w["transformer.layers.1.xa_gate.linear_out.weight"].T - 4)))
    expected = x + gate * y
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(cross.mean_gate()), gate.mean(-1), rtol=1e-5)
    # A streaming step (one position) keeps the gate's scores, averaged once for the stack.
    step = CrossAttentionInput(vis.xa, keys, values)
    layer.cross_attention_block(mx.array(x[:, :1]), step)
    np.testing.assert_allclose(np.array(mx.sigmoid(step.scores[0] - 4)), gate[:, :1], rtol=1e-5)
    np.testing.assert_allclose(np.array(step.mean_gate()), gate[:, :1].mean(-1), rtol=1e-5)


def test_shared_projections_stored_once_in_the_bundle(tmp_path):
    """Converting a MoshiVis checkpoint whose shared module appears under every layer keeps
    one copy: one q/kv/out projection in the bundle, per-layer gates and norms."""
    from safetensors.numpy import save_file
    from synthetic import TINY_LM_CONFIG, tiny_moshivis_pt_tensors

    tensors = tiny_moshivis_pt_tensors(duplicate_shared=True)
    path = tmp_path / "moshivis.safetensors"
    save_file(tensors, str(path))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LM_CONFIG))
    out = convert(ConvertOptions(out=tmp_path / "b", moshi_weights=path, kyutai_config=cfg,
                                 dtype="float32", quantization=None))
    stored = mx.load(str(out / "model.safetensors"))
    shared = [k for k in stored if k.startswith("xa.")]
    assert sorted(shared) == ["xa.kv_proj.weight", "xa.out_proj.weight", "xa.q_proj.weight"]
    assert len([k for k in stored if k.endswith("xa_gate.linear_in.weight")]) == 2
    lm = load_lm(out)
    d = lm.cfg.dim
    fused = tensors["llm.transformer.layers.0.cross_attention.mha.in_proj_weight"]
    np.testing.assert_array_equal(np.array(lm.xa.q_proj.weight), fused[:d])
    np.testing.assert_array_equal(np.array(lm.xa.kv_proj.weight), fused[d:])
    # The config says what was stored: a MoshiVis LM from Kyutai's PyTorch layout, with the
    # two layers loaded above, in float32 as asked.
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moshivis" and cfg["lm"]["cross_attention"] is True
    assert cfg["source"]["layout"] == "moshivis-pytorch"
    assert cfg["lm"]["num_layers"] == len(lm.transformer.layers) == 2
    assert cfg["dtype"] == "float32" and cfg["quantization"] is None
