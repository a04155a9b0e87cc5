"""--codec-device rust: our Mimi written back in Kyutai's layout (what Kyutai's Rust codec
reads) and run by rustymimi, frame by frame, as the stream's codec."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from moshivis_mlx.cli.convert import main as convert_main
from moshivis_mlx.weights_convert.mimi_layout import mimi_config_to_kyutai, mimi_to_kyutai

from moshivis_mlx.bench import random_lm, random_mimi
from moshivis_mlx.bundle import load_mimi
from moshivis_mlx.errors import UsageError
from moshivis_mlx.generate import Generator
from moshivis_mlx.models.lm import tiny
from moshivis_mlx.models.mimi import Mimi, MimiConfig
from moshivis_mlx.sampling import Sampler
from moshivis_mlx.stream import Stream


def test_kyutais_layout_converts_back_to_the_same_mimi(tmp_path):
    """Written in Kyutai's layout and converted again by moshivis-convert: every tensor the
    same, so the file is what Kyutai's code reads as this model."""
    mimi = random_mimi(tiny=True, seed=3)
    params = dict(tree_flatten(mimi.parameters()))
    mx.save_safetensors(str(tmp_path / "mimi.safetensors"), mimi_to_kyutai(params, mimi.cfg))
    (tmp_path / "mimi.json").write_text(json.dumps(mimi_config_to_kyutai(mimi.cfg)))
    assert convert_main(["--mimi-weights", str(tmp_path / "mimi.safetensors"),
                         "--mimi-config", str(tmp_path / "mimi.json"),
                         "--out", str(tmp_path / "bundle")]) == 0
    again = dict(tree_flatten(load_mimi(tmp_path / "bundle").parameters()))
    assert set(again) == set(params)
    for name, value in params.items():
        assert mx.array_equal(again[name], value), name


def test_the_rust_codec_runs_only_the_released_mimi():
    pytest.importorskip("rustymimi")
    from moshivis_mlx.rust_mimi import RustMimi

    with pytest.raises(UsageError, match="released Mimi"):
        RustMimi(Mimi(MimiConfig.tiny()), 8)


@pytest.mark.slow
def test_rust_mimi_streams_what_ours_does(tmp_path, monkeypatch):
    """The released Mimi's structure with random weights, run by rustymimi from the file we
    write and by us: the same codes frame by frame (within the 250-step window, where both
    streaming conventions agree), the same audio within float32 error; and a conversation
    through `Stream` feeds the model the Rust encoder's codes and plays its decoded voice."""
    pytest.importorskip("rustymimi")
    from moshivis_mlx.rust_mimi import RustMimi

    monkeypatch.setenv("MOSHIVIS_MLX_CACHE", str(tmp_path))
    mimi = random_mimi(tiny=False, seed=1)
    rust = RustMimi(mimi, 8)
    assert rust.path.parent == tmp_path / "rust-mimi"
    assert RustMimi(mimi, 8).path == rust.path  # written once, reused
    pcm = (0.1 * np.sin(np.arange(12 * mimi.frame_size) * 0.03)
           * (1 + np.random.default_rng(0).standard_normal(12 * mimi.frame_size) * 0.3))
    frames = pcm.astype(np.float32).reshape(12, -1)
    enc, dec = mimi.streaming_encoder(8), mimi.streaming_decoder()
    for f in frames:
        ours = np.array(enc.step(f))
        theirs = rust.encoder.step(f)
        np.testing.assert_array_equal(theirs, ours)
        np.testing.assert_allclose(rust.decoder.step(ours), np.array(dec.step(ours)),
                                   atol=1e-4)
    rust.encoder.reset()  # a new conversation starts from scratch
    np.testing.assert_array_equal(rust.encoder.step(frames[0]),
                                  np.array(mimi.streaming_encoder(8).step(frames[0])))

    mx.random.seed(2)
    lm = random_lm(tiny(), "bf16")

    gen = Generator(lm, Sampler(0.0), Sampler(0.0))
    stream = Stream(mimi, gen, codec_device="rust")
    out = [stream.step(f) for f in frames[:6]]
    assert all(r.pcm.shape == (mimi.frame_size,) and np.isfinite(r.pcm).all() for r in out)
    assert any(np.abs(r.pcm).max() > 0 for r in out[2:])  # the model's voice, decoded
    # The model heard the Rust encoder's codes of each frame.
    fresh = RustMimi(mimi, 8).encoder
    heard = [np.array(u)[0] for u in list(gen._user)]
    want = [fresh.step(f) for f in frames[:6]][-len(heard):]
    for a, b in zip(heard, want):
        np.testing.assert_array_equal(a, b)
