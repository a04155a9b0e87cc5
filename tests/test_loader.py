"""moshivis_mlx.load: the one opener every tool uses; what it loads, and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from app_support import demo_bundle

import moshivis_mlx
from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.errors import UsageError, WeightsError
from moshivis_mlx.loader import Loaded


def copy_without_vision(tmp_path):
    """The demo bundle with its image encoder taken out (a plain LM + Mimi bundle)."""
    out = tmp_path / "novision"
    shutil.copytree(demo_bundle(), out)
    (out / "vision.safetensors").unlink()
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("vision")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_a_bundle_opens_whole_and_talks():
    model = moshivis_mlx.load(demo_bundle())
    assert isinstance(model, Loaded) and model.bundle == demo_bundle()
    assert model.mimi is not None and model.vision is not None and model.tokenizer is not None
    assert model.lm.cfg.cross_attention and model.generation.xa_start == 2
    assert model.quantization == "float32"  # the demo's weights are not quantized
    stream = model.stream(model.generator(seed=0))
    stream.set_image(model.vision.encode_image(SAMPLE_IMAGE))
    frame = stream.step(np.zeros(stream.geometry.frame_size, dtype=np.float32))
    assert frame.pcm.shape == (stream.geometry.frame_size,)


def test_parts_not_asked_for_are_not_loaded():
    model = moshivis_mlx.load(demo_bundle(), vision=False, codec=False, tokenizer=False)
    assert model.mimi is None and model.vision is None and model.tokenizer is None
    assert moshivis_mlx.load(demo_bundle(), vision=None).vision is not None  # if present


def test_greedy_and_seeded_generators_differ_only_in_sampling():
    model = moshivis_mlx.load(demo_bundle(), codec=False, vision=False)
    greedy = model.generator(greedy=True)
    assert greedy.text_sampler.temperature == 0 and greedy.audio_sampler.temperature == 0
    sampled = model.generator(seed=3)
    assert sampled.text_sampler.temperature == model.generation.text_temperature
    assert sampled.xa_start == model.generation.xa_start
    with pytest.raises(UsageError, match="--kv-bits 8") as e:
        model.generator(kv_bits=8)  # the demo's 16-wide heads cannot take it
    assert e.value.fix == "leave --kv-bits out"


def test_a_bundle_without_an_image_encoder_is_refused_where_one_is_needed(tmp_path):
    bundle = copy_without_vision(tmp_path)
    with pytest.raises(WeightsError) as e:
        moshivis_mlx.load(bundle, no_vision_flag="--no-image")
    assert e.value.message == f"{bundle} has no image encoder"
    assert e.value.fix == "use a MoshiVis bundle, or run with --no-image"
    assert moshivis_mlx.load(bundle, vision=None).vision is None  # optional: fine


def test_plain_moshi_is_refused_once_for_every_tool(tmp_path):
    from moshivis_mlx.bundle import save_lm
    from moshivis_mlx.models.lm import LM, tiny

    moshi = tmp_path / "moshi"
    save_lm(LM(tiny(cross_attention=False)), moshi)
    cfg = json.loads((moshi / "config.json").read_text())
    cfg["vision"] = {"siglip": {}}  # claims an encoder: the model itself must be refused
    (moshi / "config.json").write_text(json.dumps(cfg))
    for kwargs in ({"vision": True}, {"vision": False, "codec": False, "cross_attention": True}):
        with pytest.raises(WeightsError, match=r"is plain Moshi \(no cross-attention\)"):
            moshivis_mlx.load(moshi, tokenizer=False, **kwargs)


def test_bad_adapters_fail_before_the_model_loads(tmp_path, monkeypatch):
    from moshivis_mlx import loader

    def never(*args, **kwargs):
        raise AssertionError("the bundle was opened before the adapters were read")

    monkeypatch.setattr(loader, "resolve", never)
    with pytest.raises(WeightsError, match="adapters"):
        moshivis_mlx.load(demo_bundle(), adapters=tmp_path / "missing")


def test_a_missing_bundle_is_one_line(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as e:
        moshivis_mlx.load(tmp_path / "nothing")
    assert "moshivis-convert" in e.value.fix


def test_a_broken_bundle_says_what_to_do(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle(), bundle)
    (bundle / "mimi.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError) as e:
        moshivis_mlx.load(bundle)
    assert "mimi.safetensors" in str(e.value) and e.value.fix
