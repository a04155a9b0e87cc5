"""Mimi: our MLX codec against Kyutai's PyTorch Mimi, through the real conversion path.

A small Mimi with the released structure (24 kHz, 12.5 Hz frames, SEANet ratios 8-6-5-4,
two transformers at 25 Hz, split RVQ) is built with Kyutai's code and random weights, saved
in the released checkpoint layout, converted with `moshivis-convert` and loaded with
`load_mimi`. Inputs are a chirp and a spoken sentence made with espeak-ng.
"""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from lanes import reference_wanted
from mlx.utils import tree_flatten
from moshivis_mlx.cli.convert import main as convert_main
from moshivis_mlx.weights_convert.mimi_layout import (
    check_mimi_mapping,
    mimi_config_from_kyutai,
    mimi_config_to_kyutai,
    mimi_mapping,
)

from moshivis_mlx import Mimi, MimiConfig, load_mimi
from moshivis_mlx.bundle import BundleError, load_lm

if reference_wanted():  # Kyutai's PyTorch reference, for the tests marked torch
    import torch
    from reference import build_moshi_lm, released_state_dict, save_released, tiny_lm_kwargs
    from safetensors.torch import save_file

MANIFEST = Path(__file__).parent / "data" / "manifests" / "mimi.pt.json"
SR = 24000
FRAME = 1920
NUM_CODEBOOKS = 8
# Far below audible; tight enough to tell exact from tanh-approximated GELU (~1e-4 here).
DECODE_ATOL = 1e-5
# Every test but the manifest's compares with Kyutai's PyTorch Mimi (marked torch); those
# using the clips also speak (espeak-ng, resampled by sox).
SPEECH = pytest.mark.system("espeak-ng", "sox")


# -- Kyutai's PyTorch Mimi, small and random ----------------------------------------------

def build_torch_mimi(cfg: MimiConfig, seed: int = 0):
    """Kyutai's MimiModel for `cfg` in float32, every weight and codebook random."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    model = loaders.get_mimi(None, mimi_config=mimi_config_to_kyutai(cfg), device="cpu",
                             num_codebooks=NUM_CODEBOOKS)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * randn(*p.shape))
            elif "layer_scale" in name:
                p.copy_(0.3 + 0.4 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * randn(*p.shape))
            else:
                p.copy_(randn(*p.shape) / p[0].numel() ** 0.5)
        buffers = dict(model.named_buffers())
        for name, b in buffers.items():
            if name.endswith("cluster_usage"):
                # Non-uniform usage, one unused centroid: the fold must clamp at 1e-5.
                b.copy_(0.1 + 5.0 * torch.rand(b.shape, generator=gen))
                b[0] = 0.0
            elif name.endswith("_initialized"):
                b.fill_(1.0)
        for name, b in buffers.items():
            if name.endswith("embedding_sum"):
                # Centroids at the scale of the projected latents (norm ~3), so codes vary;
                # the unused one far away (its sum is tiny, its usage 0: centroid ~ 1e-4/1e-5).
                usage = buffers[name.replace("embedding_sum", "cluster_usage")]
                b.copy_(0.6 * randn(*b.shape) * usage[:, None])
                b[0] = 1e-4 * randn(b.shape[1])
    model.eval()
    return model


def save_released_mimi(model, cfg: MimiConfig, folder: Path) -> tuple[Path, Path]:
    """The model as Kyutai's released files: safetensors (released names) + config JSON."""
    weights, config = folder / "mimi.safetensors", folder / "mimi_config.json"
    save_file(released_state_dict(model), str(weights))
    config.write_text(json.dumps(mimi_config_to_kyutai(cfg)))
    return weights, config


def torch_encode(model, wav: np.ndarray, streaming: bool) -> np.ndarray:
    x = torch.from_numpy(wav)[None, None]
    with torch.no_grad():
        if not streaming:
            return model.encode(x)[0].numpy()
        with model.streaming(1):
            frames = [model.encode(x[..., i: i + FRAME]) for i in range(0, x.shape[-1], FRAME)]
    return torch.cat(frames, dim=-1)[0].numpy()


def torch_decode(model, codes: np.ndarray, streaming: bool) -> np.ndarray:
    c = torch.from_numpy(codes.astype(np.int64))[None]
    with torch.no_grad():
        if not streaming:
            return model.decode(c)[0, 0].numpy()
        with model.streaming(1):
            frames = [model.decode(c[..., t: t + 1]) for t in range(c.shape[-1])]
    return torch.cat(frames, dim=-1)[0, 0].numpy()


def our_stream_encode(mimi: Mimi, wav: np.ndarray, num_codebooks: int = NUM_CODEBOOKS):
    enc = mimi.streaming_encoder(num_codebooks)
    return np.stack([enc.step(wav[i: i + FRAME]) for i in range(0, len(wav), FRAME)], axis=1)


def our_stream_decode(mimi: Mimi, codes: np.ndarray) -> np.ndarray:
    dec = mimi.streaming_decoder()
    return np.concatenate([dec.step(codes[:, t]) for t in range(codes.shape[1])])


def whole_frames(wav: np.ndarray) -> np.ndarray:
    return np.pad(wav, (0, -len(wav) % FRAME))


# -- inputs -----------------------------------------------------------------------------------

def chirp(seconds: float = 2.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * (80 * t + 1200 * t**2))).astype(np.float32)


def spoken_clip(folder: Path) -> np.ndarray:
    """About 2.5 s of synthetic speech, 24 kHz mono int16 (espeak-ng, resampled by sox)."""
    raw, out = folder / "speech_raw.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), "This is a short test of the Mimi codec."],
                   check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out),
                    "trim", "0", "2.8"], check=True, capture_output=True)
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    assert 2.0 * SR <= len(pcm) <= 3.0 * SR, len(pcm)
    assert np.abs(pcm).max() > 3000, "espeak-ng produced (near) silence"
    return pcm


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mimi")


@pytest.fixture(scope="module")
def reference(work):
    cfg = MimiConfig.tiny()
    model = build_torch_mimi(cfg)
    weights, config = save_released_mimi(model, cfg, work)
    return model, weights, config


@pytest.fixture(scope="module")
def bundle(reference, work) -> Path:
    _, weights, config = reference
    out = work / "bundle"
    assert convert_main(["--mimi-weights", str(weights), "--mimi-config", str(config),
                         "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def mimi(bundle) -> Mimi:
    return load_mimi(bundle)


@pytest.fixture(scope="module")
def clips(work) -> dict[str, np.ndarray]:
    """Inputs as given to us: the chirp float32, the speech int16; both whole frames."""
    return {"chirp": whole_frames(chirp()), "speech": whole_frames(spoken_clip(work))}


def as_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm


@pytest.fixture(scope="module")
def expected(reference, clips):
    """PyTorch's codes and audio for each clip, batch and streaming."""
    model = reference[0]
    out = {}
    for name, pcm in clips.items():
        wav = as_float(pcm)
        codes = torch_encode(model, wav, streaming=False)
        out[name] = {
            "codes": codes,
            "stream_codes": torch_encode(model, wav, streaming=True),
            "audio": torch_decode(model, codes, streaming=False),
            "stream_audio": torch_decode(model, codes, streaming=True),
        }
    return out


CLIPS = ["chirp", "speech"]


# -- conversion ----------------------------------------------------------------------------------

@pytest.mark.torch
def test_bundle_holds_all_codebooks_in_float32(bundle):
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["mimi"] == MimiConfig.tiny().to_dict()
    assert "lm" not in cfg
    tensors = mx.load(str(bundle / "mimi.safetensors"))
    assert {a.dtype for a in tensors.values()} == {mx.float32}
    n_q = MimiConfig.tiny().quantizer.n_q
    books = [k for k in tensors if ".codebooks." in k]
    assert len(books) == n_q
    with pytest.raises(BundleError, match="no language model"):
        load_lm(bundle)


@pytest.mark.torch
def test_codebooks_are_folded_with_clamped_usage(reference, mimi):
    model = reference[0]
    cb = model.quantizer.rvq_rest.vq.layers[2]._codebook
    want = (cb.embedding_sum / cb.cluster_usage.clamp(min=1e-5)[:, None]).numpy()
    got = np.array(mimi.quantizer.rvq_rest.codebooks[2].embedding)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


@pytest.mark.torch
def test_untrained_codebook_is_refused(reference, work, capsys):
    model = reference[0]
    sd = released_state_dict(model)
    sd["quantizer.rvq_rest.vq.layers.3._codebook._initialized"] = torch.zeros(1)
    bad = work / "untrained.safetensors"
    save_file(sd, str(bad))
    out = work / "untrained_bundle"
    assert convert_main(["--mimi-weights", str(bad), "--mimi-config", str(reference[2]),
                         "--out", str(out)]) == 1
    assert "never trained" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.torch
def test_wrong_config_is_refused(reference, work, capsys):
    # The tiny weights against the (default) released config.
    out = work / "mismatch_bundle"
    assert convert_main(["--mimi-weights", str(reference[1]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing tensors" in err or "do not match" in err
    assert convert_main(["--out", str(out)]) == 1
    assert "nothing to convert" in capsys.readouterr().err


@pytest.mark.torch
def test_lm_and_mimi_in_one_bundle(reference, work):
    lm_weights = save_released(build_moshi_lm(tiny_lm_kwargs()), work / "lm.safetensors")
    lm_config = work / "lm_config.json"
    lm_config.write_text(json.dumps(tiny_lm_kwargs()))
    out = work / "lm_and_mimi"
    assert convert_main(["--moshi-weights", str(lm_weights), "--config", str(lm_config),
                         "--mimi-weights", str(reference[1]), "--mimi-config",
                         str(reference[2]), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"] == {"layout": "moshi-pytorch", "lm_weights": "lm.safetensors",
                             "mimi_weights": "mimi.safetensors",
                             "kyutai_config": "lm_config.json"}
    assert cfg["quantization"] == {"bits": 8, "group_size": 64}  # the LM q8 (the default)
    assert {a.dtype for a in mx.load(str(out / "mimi.safetensors")).values()} == {mx.float32}
    assert load_lm(out).cfg.num_layers == tiny_lm_kwargs()["num_layers"]
    assert load_mimi(out, num_codebooks=4).num_codebooks == 4


def test_released_config_maps_onto_the_released_checkpoint():
    manifest = json.loads(MANIFEST.read_text())
    cfg = mimi_config_from_kyutai(manifest["mimi_config"])
    assert cfg == MimiConfig.released()
    assert mimi_config_to_kyutai(cfg) == manifest["mimi_config"]
    shapes = {k: tuple(v[0]) for k, v in manifest["tensors"].items()}
    assert {v[1] for v in manifest["tensors"].values()} == {"float32"}
    mapping = mimi_mapping(cfg)
    check_mimi_mapping(mapping, shapes, "manifest")  # all used, none missing, shapes exact
    used = {e.src for e in mapping.entries} | {e.aux for e in mapping.entries if e.aux}
    assert used | set(mapping.ignored) == set(shapes)
    assert all(k.endswith("._initialized") for k in mapping.ignored)
    # Our model (built lazily: nothing allocated) has exactly the mapping's tensors.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(Mimi(cfg).parameters())}
    assert ours == {e.dst: e.shape for e in mapping.entries}
    assert len(ours) == 318 - 32 * 3 + 32  # three tensors per codebook fold into one


# -- parity with PyTorch --------------------------------------------------------------------------

@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_latents_match_pytorch(reference, mimi, clips, clip):
    """The continuous latent before quantization: codes alone hide small numeric errors."""
    wav = as_float(clips[clip])
    with torch.no_grad():
        want = reference[0]._encode_to_unquantized_latent(torch.from_numpy(wav)[None, None])
    want = want[0].T.numpy()
    got = np.array(mimi.encode_latent(mx.array(wav).reshape(1, -1, 1))[0])
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)  # latents reach ~3


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_batch_codes_match_pytorch(mimi, clips, expected, clip):
    want = expected[clip]["codes"]
    assert want.shape == (NUM_CODEBOOKS, len(clips[clip]) // FRAME)
    # Not degenerate: most frames get codes of their own, every codebook varies.
    assert len(np.unique(want.T, axis=0)) > 0.5 * want.shape[1]
    assert all(len(np.unique(row)) >= 2 for row in want)
    np.testing.assert_array_equal(mimi.encode(clips[clip]), want)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_streaming_codes_match_pytorch(mimi, clips, expected, clip):
    np.testing.assert_array_equal(expected[clip]["stream_codes"], expected[clip]["codes"])
    np.testing.assert_array_equal(our_stream_encode(mimi, clips[clip]),
                                  expected[clip]["stream_codes"])


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_batch_decode_matches_pytorch(mimi, expected, clip):
    want = expected[clip]["audio"]
    assert want.std() > 0.02  # an audible signal, so the tolerance means something
    got = mimi.decode(expected[clip]["codes"])
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_streaming_decode_matches_pytorch(mimi, expected, clip):
    got = our_stream_decode(mimi, expected[clip]["codes"])
    np.testing.assert_allclose(got, expected[clip]["stream_audio"], rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.torch
@SPEECH
def test_our_streaming_equals_our_batch(mimi, clips, clip):
    codes = mimi.encode(clips[clip])
    np.testing.assert_array_equal(our_stream_encode(mimi, clips[clip]), codes)
    np.testing.assert_allclose(our_stream_decode(mimi, codes), mimi.decode(codes),
                               rtol=0, atol=1e-5)


@pytest.mark.torch
@SPEECH
def test_any_number_of_codebooks(reference, mimi, clips):
    model, wav = reference[0], as_float(clips["speech"])
    for k in (1, 10):
        model.set_num_codebooks(k)
        try:
            want = torch_encode(model, wav, streaming=False)
        finally:
            model.set_num_codebooks(NUM_CODEBOOKS)
        codes = mimi.encode(wav, num_codebooks=k)
        np.testing.assert_array_equal(codes, want)
        np.testing.assert_array_equal(our_stream_encode(mimi, wav, k), want)
        np.testing.assert_allclose(mimi.decode(codes), torch_decode(model, want, False),
                                   rtol=0, atol=DECODE_ATOL)
    with pytest.raises(ValueError, match="num_codebooks"):
        mimi.encode(wav, num_codebooks=11)


@pytest.mark.torch
def test_attention_window_in_long_streams(work):
    """Past the transformers' window (here 8 positions, 4 frames) both of our modes keep
    matching PyTorch's batch mode. (Kyutai's streaming mode keeps one key fewer than its
    window for every other position, so it departs from its own batch mode there; our
    ring cache holds the whole window.)"""
    cfg = MimiConfig.tiny(context=8)
    model = build_torch_mimi(cfg, seed=1)
    folder = work / "short_context"
    folder.mkdir()
    weights, config = save_released_mimi(model, cfg, folder)
    out = work / "short_context_bundle"
    assert convert_main(["--mimi-weights", str(weights), "--mimi-config", str(config),
                         "--out", str(out)]) == 0
    mimi = load_mimi(out)
    wav = chirp(2.0)[: 25 * FRAME]
    codes = torch_encode(model, wav, streaming=False)
    np.testing.assert_array_equal(mimi.encode(wav), codes)
    np.testing.assert_array_equal(our_stream_encode(mimi, wav), codes)
    audio = torch_decode(model, codes, streaming=False)
    np.testing.assert_allclose(mimi.decode(codes), audio, rtol=0, atol=DECODE_ATOL)
    np.testing.assert_allclose(our_stream_decode(mimi, codes), audio, rtol=0, atol=DECODE_ATOL)


# -- streams ---------------------------------------------------------------------------------

@pytest.mark.torch
@SPEECH
def test_stream_state_does_not_grow_and_reset_restarts(mimi, clips):
    wav = as_float(clips["speech"])
    frames = [wav[i: i + FRAME] for i in range(0, len(wav), FRAME)]
    enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()

    def nbytes():
        return sum(a.nbytes for s in (enc, dec) for a in s.state_arrays())

    first = [enc.step(frames[0]), enc.step(frames[1])]
    dec.step(first[0])
    dec.step(first[1])
    size = nbytes()
    for f in frames[2:]:
        dec.step(enc.step(f))
    assert nbytes() == size
    enc.reset()
    dec.reset()
    again = [enc.step(frames[0]), enc.step(frames[1])]
    np.testing.assert_array_equal(np.stack(again), np.stack(first))
    np.testing.assert_allclose(dec.step(again[0]), mimi.decode(first[0][:, None]),
                               rtol=0, atol=1e-5)


@pytest.mark.torch
def test_stream_steps_check_their_input(mimi):
    enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()
    with pytest.raises(ValueError, match="1920 samples"):
        enc.step(np.zeros(FRAME - 1, np.float32))
    with pytest.raises(ValueError, match="mono"):
        enc.step(np.zeros((2, FRAME), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        dec.step(np.full(8, 64))
    with pytest.raises(ValueError, match="integers"):
        dec.step(np.zeros(8, np.float32))
    codes = enc.step(mx.zeros((FRAME,)))
    assert isinstance(codes, mx.array) and codes.shape == (NUM_CODEBOOKS,)
    assert isinstance(dec.step(codes), mx.array)


# -- input robustness (whole clips) ---------------------------------------------------------------

@pytest.mark.torch
@SPEECH
def test_odd_length_is_padded_with_a_warning(mimi, clips):
    wav = as_float(clips["speech"])
    n = len(wav) - FRAME // 3
    with pytest.warns(UserWarning, match=r"padded with 640 zeros"):
        codes = mimi.encode(wav[:n])
    padded = np.concatenate([wav[:n], np.zeros(640, np.float32)])
    np.testing.assert_array_equal(codes, mimi.encode(padded))
    assert codes.shape[1] == -(-n // FRAME)


@pytest.mark.torch
@SPEECH
def test_int16_and_float64_inputs(mimi, clips):
    pcm = clips["speech"]
    assert pcm.dtype == np.int16
    codes = mimi.encode(pcm)
    np.testing.assert_array_equal(codes, mimi.encode(pcm.astype(np.float32) / 32768.0))
    np.testing.assert_array_equal(codes, mimi.encode(pcm.astype(np.float64) / 32768.0))
    np.testing.assert_array_equal(codes, np.array(mimi.encode(mx.array(pcm))))
    with pytest.raises(ValueError, match="float or int16"):
        mimi.encode(pcm.astype(np.int32))


@pytest.mark.torch
@SPEECH
def test_shapes_and_array_kinds(mimi, clips):
    wav = as_float(clips["chirp"])[: 6 * FRAME]
    codes = mimi.encode(wav)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int32
    for shaped in (wav[None], wav[None, None]):
        np.testing.assert_array_equal(mimi.encode(shaped), codes)
    mx_codes = mimi.encode(mx.array(wav)[None, None])
    assert isinstance(mx_codes, mx.array)
    np.testing.assert_array_equal(np.array(mx_codes), codes)
    audio = mimi.decode(codes)
    assert isinstance(audio, np.ndarray) and audio.shape == (len(wav),)
    mx_audio = mimi.decode(mx_codes[None])
    assert isinstance(mx_audio, mx.array)
    np.testing.assert_array_equal(np.array(mx_audio), audio)


@pytest.mark.parametrize("shape", [(2, 4000), (1, 2, 4000), (4000, 2), (2, 1, 4000)])
@pytest.mark.torch
def test_more_than_one_channel_is_refused(mimi, shape):
    with pytest.raises(ValueError, match="Mimi takes mono audio; mix down or pick a channel"):
        mimi.encode(np.zeros(shape, np.float32))


@pytest.mark.torch
def test_bad_codes_are_refused(mimi):
    with pytest.raises(ValueError, match="codebooks"):
        mimi.decode(np.zeros((11, 3), np.int64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        mimi.decode(np.full((8, 3), -1))
    with pytest.raises(ValueError, match="shape"):
        mimi.decode(np.zeros((2, 8, 3), np.int64))
