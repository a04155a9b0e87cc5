"""The SigLIP image encoder: parity with transformers, checkpoint layouts, the image path
into the LM, and image files good and bad.

Every model here is small and random; references are transformers' SiglipVisionModel
(torch, float32) and NumPy written in this file.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from lanes import reference_wanted
from mlx.utils import tree_flatten
from moshivis_mlx.cli.convert import main as convert_main
from moshivis_mlx.weights_convert.lm_layout import (
    MOSHIVIS_PT,
    check_mapping,
    infer_lm_config,
    lm_mapping,
)
from moshivis_mlx.weights_convert.vision_layout import (
    expected_vision_tensors,
    siglip_config_from_hf,
    tower_shapes,
    vision_mapping,
)
from PIL import Image, ImageFile

from moshivis_mlx import Generator, ImageError, Sampler, load_image, load_lm, load_vision
from moshivis_mlx.bundle import BundleError
from moshivis_mlx.image import preprocess
from moshivis_mlx.models import lm as lm_models
from moshivis_mlx.models import siglip
from moshivis_mlx.quant import QuantSpec, quantize_model

if reference_wanted():  # transformers' SigLIP, for the tests marked torch
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.set_num_threads(1)

MANIFESTS = Path(__file__).parent / "data" / "manifests"

# A small tower with the real structure: the MLP width (88) is divisible by neither 32 nor
# 64, like the real 4304, so quantization must leave the MLP output projection float.
HF_CONFIG = dict(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                 num_attention_heads=4, image_size=56, patch_size=14, num_channels=3,
                 layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
SIZE = HF_CONFIG["image_size"]
TOKENS = (SIZE // HF_CONFIG["patch_size"]) ** 2
DIM = HF_CONFIG["hidden_size"]
# Kyutai's config of the tiny MoshiVis LM below (what the weights cannot tell).
KYUTAI_CONFIG = {"num_heads": 4, "depformer_num_heads": 2, "context": 24}


# -- references and fixtures -----------------------------------------------------------

def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, LayerNorm gains around 1 and their biases non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
            else:
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module")
def hf_tower() -> SiglipVisionModel:
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**HF_CONFIG)).eval()
    randomise(model, seed=1)
    return model


def hf_tokens(model: SiglipVisionModel, pixels: np.ndarray) -> np.ndarray:
    """NHWC pixels -> transformers' last hidden state."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        return model(pixel_values=x).last_hidden_state.numpy()


def hf_state(model: SiglipVisionModel, prefix: str, head: bool = True) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if head or not k.startswith("head.")}


def reference_pixels(path: Path) -> np.ndarray:
    """MoshiVis' preprocessing, spelled out: RGB, bicubic resize, x/255, (x - 0.5) / 0.5."""
    img = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5


def convert(*args: str | Path) -> int:
    return convert_main([str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision")


@pytest.fixture(scope="module")
def hf_config_file(work) -> Path:
    path = work / "siglip_config.json"
    path.write_text(json.dumps(HF_CONFIG))
    return path


@pytest.fixture(scope="module")
def hf_bundle(work, hf_tower, hf_config_file) -> Path:
    """The HF layout (vision_model.*, pooling head included) converted by the CLI, float32."""
    src = work / "siglip_hf.safetensors"
    save_file(hf_state(hf_tower, "vision_model."), str(src))
    out = work / "bundle_hf"
    assert convert("--vision-weights", src, "--vision-config", hf_config_file,
                   "--dtype", "float32", "--no-quantize", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def photo(work) -> Path:
    """A smooth colour image of another size than the tower's, so the resize matters."""
    h, w = 70, 90
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 7.0)], axis=-1)
    path = work / "photo.png"
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def random_pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)


# -- the tower --------------------------------------------------------------------------

@pytest.mark.torch
def test_hf_parity_batch(hf_bundle, hf_tower):
    vision = load_vision(hf_bundle)
    pixels = random_pixels(2)
    ours = np.array(vision(mx.array(pixels)))
    ref = hf_tokens(hf_tower, pixels)
    assert ours.shape == ref.shape == (2, TOKENS, DIM)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The two images of the batch are encoded independently.
    one = np.array(vision(mx.array(pixels[1:])))
    np.testing.assert_allclose(one[0], ours[1], atol=1e-5, rtol=0)


@pytest.mark.torch
def test_encode_image_preprocesses_like_moshivis(hf_bundle, hf_tower, photo):
    vision = load_vision(hf_bundle)
    tokens = vision.encode_image(photo)
    assert tokens.shape == (TOKENS, DIM)
    pixels = reference_pixels(photo)
    np.testing.assert_allclose(np.array(vision.preprocess(photo)), pixels, atol=1e-6, rtol=0)
    ref = hf_tokens(hf_tower, pixels[None])[0]
    np.testing.assert_allclose(np.array(tokens), ref, atol=1e-4, rtol=0)
    # A PIL image gives the same tokens as its file.
    np.testing.assert_array_equal(np.array(vision.encode_image(Image.open(photo))),
                                  np.array(tokens))


@pytest.mark.torch
def test_pixels_of_the_wrong_size_are_refused(hf_bundle):
    vision = load_vision(hf_bundle)
    with pytest.raises(ValueError, match="pixels must be"):
        vision(mx.zeros((1, SIZE + 14, SIZE + 14, 3)))


@pytest.mark.parametrize("layout", ["hf-unprefixed", "moshivis-pt", "moshivis-mlx",
                                    "mlx-ordered-conv"])
@pytest.mark.torch
def test_other_layouts_give_the_same_tokens(layout, work, hf_tower, hf_bundle, hf_config_file):
    if layout == "hf-unprefixed":  # SiglipVisionModel.save_pretrained of transformers >= 5
        state = hf_state(hf_tower, "")
    elif layout == "moshivis-pt":  # with the image projection beside it, as MoshiVis stores it
        state = hf_state(hf_tower, "image_prefix.enc.model.", head=False)
        state["image_prefix.proj_xa.weight"] = torch.randn(32, DIM)
        state["image_prefix.norm_xa.alpha"] = torch.ones(1, 1, 32)
    else:  # kyuteye_mlx files keep PyTorch's conv order and transpose when loading
        state = hf_state(hf_tower, "img_embedder.model.", head=False)
        if layout == "mlx-ordered-conv":
            key = "img_embedder.model.embeddings.patch_embedding.weight"
            state[key] = state[key].permute(0, 2, 3, 1).contiguous()
    src = work / f"siglip_{layout}.safetensors"
    save_file(state, str(src))
    out = work / f"bundle_{layout}"
    assert convert("--vision-weights", src, "--vision-config", hf_config_file,
                   "--dtype", "float32", "--out", out, "--vision-float") == 0
    pixels = mx.array(random_pixels(1, seed=3))
    np.testing.assert_array_equal(np.array(load_vision(out)(pixels)),
                                  np.array(load_vision(hf_bundle)(pixels)))


@pytest.mark.torch
def test_quantized_tower(work, hf_bundle, hf_config_file):
    src = work / "siglip_hf.safetensors"  # written by hf_bundle
    out = work / "bundle_q"
    assert convert("--vision-weights", src, "--vision-config", hf_config_file,
                   "--dtype", "float32", "--q-bits", "4", "--q-group-size", "32",
                   "--out", out) == 0
    section = json.loads((out / "config.json").read_text())["vision"]
    assert section["quantization"] == {"bits": 8, "group_size": 32}  # never below 8 bits
    names = set(mx.load(str(out / "vision.safetensors")))
    assert "encoder.layers.0.self_attn.in_proj.scales" in names
    assert "encoder.layers.0.ffn.linear_in.scales" in names
    assert "encoder.layers.0.ffn.linear_out.scales" not in names  # 88 inputs: stays float
    pixels = mx.array(random_pixels(1, seed=4))
    q = np.array(load_vision(out)(pixels))
    f = np.array(load_vision(hf_bundle)(pixels))
    assert 0 < np.abs(q - f).max() < 0.05 * np.abs(f).max()


@pytest.mark.torch
def test_convert_errors(work, hf_bundle, hf_config_file, capsys):
    src = work / "siglip_hf.safetensors"
    # The default config is PaliGemma2's tower, which these weights are not.
    assert convert("--vision-weights", src, "--out", work / "bad1") == 1
    err = capsys.readouterr().err
    assert "do not fit the vision config" in err and "--vision-config" in err
    other = work / "not_a_tower.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(other))
    assert convert("--vision-weights", other, "--out", work / "bad2") == 1
    assert "no SigLIP vision tower found" in capsys.readouterr().err
    quantized = work / "quantized_tower.safetensors"
    save_file({"img_embedder.model.embeddings.patch_embedding.weight": torch.zeros(64, 3, 14, 14),
               "img_embedder.model.encoder.layers.0.mlp.fc1.scales": torch.zeros(88, 2)},
              str(quantized))
    assert convert("--vision-weights", quantized, "--out", work / "bad3") == 1
    # Quantized towers are dequantized, but only whole ones (weight, scales and biases).
    assert "quantized img_embedder.model.encoder.layers.0.mlp.fc1 lacks" in capsys.readouterr().err
    assert convert("--vision-config", hf_config_file, "--out", work / "bad4") == 1
    assert "nothing to convert" in capsys.readouterr().err
    assert not any((work / f"bad{i}").exists() for i in range(1, 5))


@pytest.mark.torch
def test_bundle_without_the_other_model(hf_bundle):
    with pytest.raises(BundleError, match="no language model"):
        load_lm(hf_bundle)


def test_presets_build():
    cfg = siglip.PRESETS["tiny"]()
    assert cfg.dim == lm_models.tiny().image_dim  # the tiny tower feeds the tiny LM
    model = siglip.SiglipVision(cfg)
    out = model(mx.zeros((2, cfg.image_size, cfg.image_size, 3)))
    assert out.shape == (2, cfg.num_tokens, cfg.dim)
    full = siglip.PRESETS["paligemma2-448"]()
    assert (full.num_tokens, full.dim, full.num_layers) == (1024, 1152, 27)
    hf = json.loads((MANIFESTS / "siglip_paligemma2_448.json").read_text())["hf_config"]
    assert siglip_config_from_hf(hf) == full


# -- a MoshiVis checkpoint: LM and tower in one file, and the image path into the LM ----

def moshivis_lm_config() -> lm_models.LmConfig:
    return replace(lm_models.tiny(), image_dim=DIM)


def fake_moshivis_pt(cfg: lm_models.LmConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under every name and shape of Kyutai's MoshiVis PyTorch layout."""
    shapes: dict[str, tuple[int, ...]] = {}
    for e in lm_mapping({}, MOSHIVIS_PT, cfg).entries:
        if e.src.endswith(".alpha"):
            shapes[e.src] = (1, 1, e.shape[0])
        elif e.rows is not None:
            rows = max(e.rows[1], shapes.get(e.src, (0,))[0])
            shapes[e.src] = (rows,) + e.shape[1:]
        else:
            shapes[e.src] = e.shape
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith(".alpha"):
            out[name] = 1.0 + 0.3 * noise
        elif len(shape) > 1:
            out[name] = noise / shape[-1] ** 0.5
        else:
            out[name] = 0.3 * noise
    return out


@pytest.fixture(scope="module")
def moshivis_checkpoint(work, hf_tower) -> tuple[Path, dict[str, torch.Tensor]]:
    state = fake_moshivis_pt(moshivis_lm_config(), seed=5)
    state.update(hf_state(hf_tower, "image_prefix.enc.model.", head=False))
    path = work / "moshivis.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def moshivis_bundle(work, moshivis_checkpoint, hf_config_file) -> Path:
    src, _ = moshivis_checkpoint
    kc = work / "kyutai_config.json"
    kc.write_text(json.dumps(KYUTAI_CONFIG))
    out = work / "bundle_moshivis"
    # No --vision-weights: the tower comes from the MoshiVis file itself.
    assert convert("--moshi-weights", src, "--config", kc, "--vision-config", hf_config_file,
                   "--dtype", "float32", "--no-quantize", "--out", out) == 0
    return out


@pytest.mark.torch
def test_moshivis_checkpoint_brings_its_tower(moshivis_bundle, hf_bundle):
    cfg = json.loads((moshivis_bundle / "config.json").read_text())
    assert cfg["model_type"] == "moshivis"
    assert cfg["vision"]["source"]["layout"] == "moshivis-pytorch"
    assert load_lm(moshivis_bundle).cfg.image_dim == DIM
    pixels = mx.array(random_pixels(1, seed=6))
    np.testing.assert_array_equal(np.array(load_vision(moshivis_bundle)(pixels)),
                                  np.array(load_vision(hf_bundle)(pixels)))


def reference_image_kv(tokens: np.ndarray, state: dict[str, torch.Tensor], num_heads: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """SigLIP tokens [N, D] -> K, V [H, N, head_dim] from the checkpoint's own tensors:
    proj_xa (with bias), norm_xa as a true RMS norm (eps 1e-8, as lm.ImagePrefix and
    kyuteye_mlx), then the K and V rows of the shared cross-attention's in_proj."""
    f64 = {k: v.double().numpy() for k, v in state.items()}
    x = tokens.astype(np.float64) @ f64["image_prefix.proj_xa.weight"].T
    x = x + f64["image_prefix.proj_xa.bias"]
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-8)
    x = x * f64["image_prefix.norm_xa.alpha"].reshape(-1)
    w = f64["llm.transformer.layers.0.cross_attention.mha.in_proj_weight"]
    d = w.shape[1]
    k, v = x @ w[d:2 * d].T, x @ w[2 * d:].T
    n = tokens.shape[0]
    split = lambda a: a.reshape(n, num_heads, d // num_heads).transpose(1, 0, 2)  # noqa: E731
    return split(k), split(v)


@pytest.mark.torch
def test_image_to_cross_attention_kv(moshivis_bundle, moshivis_checkpoint, hf_tower, photo):
    _, state = moshivis_checkpoint
    lm = load_lm(moshivis_bundle)
    vision = load_vision(moshivis_bundle)
    gen = Generator(lm, text_sampler=Sampler(temperature=0.0),
                    audio_sampler=Sampler(temperature=0.0))
    gen.set_image(vision.encode_image(photo))
    keys, values = (np.array(a[0]) for a in gen.image_kv)
    tokens = hf_tokens(hf_tower, reference_pixels(photo)[None])[0]
    ref_k, ref_v = reference_image_kv(tokens, state, lm.cfg.num_heads)
    assert keys.shape == ref_k.shape == (lm.cfg.num_heads, TOKENS, lm.cfg.dim // lm.cfg.num_heads)
    np.testing.assert_allclose(keys, ref_k, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(values, ref_v, atol=2e-4, rtol=1e-4)


@pytest.mark.torch
def test_switching_images_recomputes_only_the_kv(moshivis_bundle):
    lm = load_lm(moshivis_bundle)
    rng = np.random.RandomState(7)
    tok_a = mx.array(rng.randn(TOKENS, DIM).astype(np.float32))
    tok_b = mx.array(rng.randn(TOKENS, DIM).astype(np.float32))
    codes = rng.randint(0, lm.cfg.card, size=(8, 8))

    def generator() -> Generator:
        return Generator(lm, text_sampler=Sampler(temperature=0.0),
                         audio_sampler=Sampler(temperature=0.0), xa_start=1, keep_logits=True)

    gen = generator()
    gen.set_image(tok_a)
    first = [gen.step(codes[t]) for t in range(4)]
    kv_a = [np.array(a) for a in gen.image_kv]
    history = [(c.offset, np.array(c.keys), np.array(c.values)) for c in gen.caches]
    calls = []
    image_kv = lm.image_kv
    lm.image_kv = lambda t: calls.append(1) or image_kv(t)
    try:
        gen.set_image(tok_b)  # reset=False: the conversation goes on
    finally:
        del lm.image_kv
    assert len(calls) == 1
    assert gen.step_index == 4
    for c, (offset, k, v) in zip(gen.caches, history):
        assert c.offset == offset
        np.testing.assert_array_equal(np.array(c.keys), k)
        np.testing.assert_array_equal(np.array(c.values), v)
    kv_b = [np.array(a) for a in gen.image_kv]
    for a, b, want in zip(kv_a, kv_b, lm.image_kv(tok_b[None])):
        assert not np.allclose(a, b)
        np.testing.assert_array_equal(b, np.array(want))

    # The next step sees the new image: it differs from going on with the old one.
    same = generator()
    same.set_image(tok_a)
    for t in range(4):
        same.step(codes[t])
    gen.step(codes[4])
    same.step(codes[4])
    assert not np.allclose(np.array(gen.last_text_logits), np.array(same.last_text_logits))

    # reset=True starts the conversation again, with the new image.
    gen.set_image(tok_a, reset=True)
    assert gen.step_index == 0 and all(c.offset == 0 for c in gen.caches)
    np.testing.assert_array_equal(np.array(gen.image_kv[0]), kv_a[0])
    again = [gen.step(codes[t]) for t in range(4)]
    assert again == first

    gen.set_image(None)
    assert gen.image_kv is None and gen.step_index == 4


# -- full-size layouts, from the manifests (names and shapes only) -----------------------

def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((MANIFESTS / name).read_text())["tensors"]
    return {k: tuple(v[0]) for k, v in tensors.items()}


def destination_shapes(mapping) -> dict[str, tuple[int, ...]]:
    """Shapes our tensors get from a mapping (entries sharing a name are concatenated)."""
    out: dict[str, tuple[int, ...]] = {}
    for e in mapping.entries:
        if e.dst in out:
            prev = out[e.dst]
            out[e.dst] = (prev[0] + e.shape[0],) + prev[1:]
        else:
            out[e.dst] = e.shape
    return out


@pytest.mark.parametrize("manifest,prefix", [
    ("siglip_paligemma2_448.json", "vision_model."),
    ("moshivis.pt.json", "image_prefix.enc.model."),
    ("moshivis.mlx.json", "img_embedder.model."),
])
def test_full_size_layouts_match_the_manifests(manifest, prefix):
    shapes = manifest_shapes(manifest)
    cfg = siglip.paligemma2_448()
    mapping = vision_mapping(shapes, prefix, cfg)
    tower = tower_shapes(shapes, prefix)
    assert len(tower) == 437
    check_mapping(mapping, tower, manifest)  # every tower tensor used, every shape right
    assert {e.src for e in mapping.entries} == set(tower)
    assert destination_shapes(mapping) == expected_vision_tensors(cfg, None)
    # The patch conv is stored [out, in, kh, kw] in all three: transposed for MLX.
    patch = next(e for e in mapping.entries if e.dst == "embeddings.patch.weight")
    assert tower[patch.src] == (1152, 3, 14, 14) and patch.perm == (0, 2, 3, 1)


def test_full_moshivis_checkpoint_routes_the_tower():
    """The LM mapping leaves the tower to the vision converter, and nothing else over."""
    shapes = manifest_shapes("moshivis.pt.json")
    cfg = infer_lm_config(shapes, MOSHIVIS_PT)
    mapping = lm_mapping(shapes, MOSHIVIS_PT, cfg)
    check_mapping(mapping, shapes, "moshivis.pt.json")
    assert sum(k.startswith("image_prefix.enc.model.") for k in mapping.ignored) == 437


def test_full_size_quantization_leaves_the_mlp_output_float():
    cfg = siglip.paligemma2_448()
    names = expected_vision_tensors(cfg, {"bits": 8, "group_size": 64})
    assert names["encoder.layers.0.ffn.linear_in.scales"] == (4304, 1152 // 64)
    assert "encoder.layers.26.ffn.linear_out.scales" not in names
    assert names["encoder.layers.26.ffn.linear_out.weight"] == (1152, 4304)
    assert "embeddings.patch.scales" not in names
    model = siglip.SiglipVision(cfg)  # the loader's predicate quantizes exactly those
    quantize_model(model, QuantSpec(8, 64), lambda path, m: f"{path}.scales" in names)
    assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == names


# -- image files ------------------------------------------------------------------------

def rgb_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def one_line_error(path, match: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert match in msg, msg
    return info.value


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    one_line_error(path, "not an image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    one_line_error(path, "empty file")


def test_truncated_jpeg(tmp_path, monkeypatch):
    noise = np.random.RandomState(0).randint(0, 256, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    one_line_error(path, "cannot decode")
    # Even when another library asked Pillow to accept truncated files.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    one_line_error(path, "cannot decode")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the setting is given back


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header claiming width x height, with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 + (width + 7) // 8))  # one row of the many claimed
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(30000, 30000), (12000, 10000)])
def test_huge_png(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(width, height))
    assert path.stat().st_size < 1000
    one_line_error(path, "too large")


def test_missing_path(tmp_path):
    one_line_error(tmp_path / "nowhere.jpg", "no such file")


def test_directory(tmp_path):
    one_line_error(tmp_path, "is a directory")


@pytest.mark.torch
def test_errors_surface_through_encode_image(hf_bundle, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_vision(hf_bundle).encode_image(tmp_path / "nowhere.png")


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path, quality=95)  # red in CMYK
    assert Image.open(path).mode == "CMYK"
    r, g, b = rgb_of(load_image(path))[15, 20]
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png(tmp_path):
    ramp = np.tile(np.array([0, 257 * 64, 32896, 65535], dtype=np.uint16), (8, 4))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = rgb_of(load_image(path))
    assert rgb.shape == (8, 16, 3)
    np.testing.assert_array_equal(rgb[0, :4, 0], [0, 64, 128, 255])  # scaled, not clipped
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_rgba_png_over_white(tmp_path):
    a = np.zeros((10, 10, 4), dtype=np.uint8)
    a[:, :5] = (0, 0, 255, 255)  # opaque blue
    a[:, 5:] = (0, 0, 0, 0)  # transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(path)
    rgb = rgb_of(load_image(path))
    assert tuple(rgb[5, 2]) == (0, 0, 255) and tuple(rgb[5, 7]) == (255, 255, 255)


def test_grayscale(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((12, 12), 90, dtype=np.uint8), "L").save(path)
    rgb = rgb_of(load_image(path))
    assert abs(rgb[6, 6, 0] - 90) <= 2 and (rgb[..., 0] == rgb[..., 1]).all()


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    assert tuple(rgb_of(load_image(path))[8, 8]) == (255, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((40, 60, 3), dtype=np.uint8)
    a[:, :30] = (255, 0, 0)  # stored: left half red, right half blue
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: left becomes top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    rgb = rgb_of(load_image(path))
    assert rgb.shape == (60, 40, 3)
    top, bottom = rgb[10, 20], rgb[50, 20]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("mode", ["1", "P-transparent", "LA", "I", "F"])
def test_other_modes(tmp_path, mode):
    if mode == "1":
        img = Image.fromarray(np.eye(8, dtype=bool))
        want = (255, 255, 255)
    elif mode == "P-transparent":
        img = Image.new("P", (8, 8), 1)
        img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
        img.info["transparency"] = 1
        want = (255, 255, 255)  # the transparent colour shows the white background
    elif mode == "LA":
        img = Image.new("LA", (8, 8), (40, 255))
        want = (40, 40, 40)
    elif mode == "I":
        img = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32), "I")
        want = (255, 255, 255)
    else:
        img = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F")
        want = (128, 128, 128)
    path = tmp_path / f"mode_{mode}.{'tif' if mode in ('I', 'F') else 'png'}"
    img.save(path)
    assert tuple(rgb_of(load_image(path))[0, 0]) == want


def test_preprocess_range_and_size(photo):
    x = preprocess(photo, 28)
    assert x.shape == (28, 28, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0
