"""moshivis-convert end to end: every source layout gives the same bundle as its PyTorch
original, quantized files are copied exactly, bundles re-convert, big parts are sharded,
--dry-run plans from headers and manifests, and every bad input is refused in one line
with nothing left behind.

All checkpoints are tiny and random, with exactly the released files' tensor names
(tests/synthetic.py); Kyutai's MLX layout is derived from the MoshiVis PyTorch one by the
transforms its manifest documents.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from convert_support import assert_same_tensors, nothing_left, ok, run
from moshivis_mlx.cli.convert import main as convert_main
from safetensors.numpy import save_file
from synthetic import (
    LM_SIZES,
    MANIFESTS,
    TINY_LM_CONFIG,
    TINY_SIGLIP_CONFIG,
    TINY_TOKENIZER,
    TOWER_SIZES,
    manifest,
    manifest_shapes,
    quantize_kyuteye,
    tiny_mimi_tensors,
    tiny_moshi_pt_tensors,
    tiny_moshivis_pt_tensors,
    tiny_tower_tensors,
    to_kyuteye_mlx,
)

from moshivis_mlx import Generator, Sampler, load_lm, load_mimi, load_vision
from moshivis_mlx.bundle import read_config
from moshivis_mlx.sampling import GenerationConfig

LAYERS = 2  # of the tiny LM


# -- helpers ----------------------------------------------------------------------------

def bf16_exact(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 values that bfloat16 holds exactly (so both routes start from equal numbers)."""
    return {k: np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32))
            for k, v in tensors.items()}


def save_mx(tensors: dict, path: Path) -> Path:
    mx.save_safetensors(str(path), {k: mx.array(v) if isinstance(v, np.ndarray) else v
                                    for k, v in tensors.items()})
    return path


def greedy_run(bundle: Path, steps: int = 6) -> list:
    """Tokens of a few greedy steps with an image (through the bundle's own tower)."""
    lm = load_lm(bundle)
    gen = Generator(lm, Sampler(0.0), Sampler(0.0), xa_start=0)
    if lm.cfg.cross_attention:
        pixels = mx.array(np.random.default_rng(0).uniform(-1, 1, (1, 56, 56, 3)), mx.float32)
        gen.set_image(load_vision(bundle)(pixels))
    codes = np.random.default_rng(1).integers(0, lm.cfg.card, size=(8, steps))
    outs = [gen.step(codes[:, t]) for t in range(steps)]
    return [None if o is None else (o.text_token, tuple(o.audio_codes)) for o in outs]


# -- sources ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def configs(work) -> dict[str, Path]:
    lm, siglip = work / "kyutai_config.json", work / "siglip_config.json"
    lm.write_text(json.dumps(TINY_LM_CONFIG))
    siglip.write_text(json.dumps(TINY_SIGLIP_CONFIG))
    tokenizer = work / "tokenizer_spm_32k_3.model"
    tokenizer.write_bytes(TINY_TOKENIZER)
    mimi, mimi_cfg = tiny_mimi_tensors()
    save_file(mimi, str(work / "mimi.safetensors"))
    (work / "mimi_config.json").write_text(json.dumps(mimi_cfg))
    return {"lm": lm, "siglip": siglip, "tokenizer": tokenizer,
            "mimi": work / "mimi.safetensors", "mimi_config": work / "mimi_config.json"}


@pytest.fixture(scope="module")
def pt_tensors() -> dict[str, np.ndarray]:
    """MoshiVis PyTorch layout: LM (shared cross-attention stored under both layers) and
    tower, with bfloat16-exact values."""
    tensors = tiny_moshivis_pt_tensors(duplicate_shared=True)
    tensors.update(tiny_tower_tensors())
    return bf16_exact(tensors)


@pytest.fixture(scope="module")
def sources(work, pt_tensors) -> dict[str, Path]:
    kyuteye = {k: mx.array(v).astype(mx.bfloat16) for k, v in to_kyuteye_mlx(pt_tensors).items()}
    out = {"pt": work / "moshivis_pt.safetensors",
           "mlx": save_mx(kyuteye, work / "model.safetensors")}
    save_file(pt_tensors, str(out["pt"]))
    for bits, group in ((8, 64), (4, 32)):
        q = quantize_kyuteye(to_kyuteye_mlx(pt_tensors), bits, group, LAYERS)
        out[f"mlx-q{bits}"] = save_mx(q, work / f"model.q{bits}.safetensors")
    return out


def convert_lm(work: Path, configs, src: Path, name: str, *extra) -> Path:
    out = work / name
    ok("--moshi-weights", src, "--config", configs["lm"], "--vision-config", configs["siglip"],
       "--out", out, *extra)
    return out


# -- Kyutai's MLX layout ----------------------------------------------------------------

def test_synthetic_mlx_checkpoint_has_the_released_names_and_shapes(sources):
    """The derived MLX-layout file holds exactly the manifest's tensors (first 2 layers)."""
    shapes = {k: tuple(v.shape) for k, v in mx.load(str(sources["mlx"])).items()}
    wanted = {}
    for k, shape in manifest_shapes("moshivis.mlx.json").items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= LAYERS:
            continue
        # Sizes the PyTorch layout has not: a slice's in_proj (3 x the depformer width) and
        # the cross-attention's kv_proj (2 x the model width; 8192 is 8 steps x 1024 there).
        sizes = TOWER_SIZES if k.startswith("img_embedder.") else {
            **LM_SIZES, 3072: 192, 8192: 128 if ".kv_proj." in k else LM_SIZES[8192]}
        wanted[k] = tuple(sizes[s] for s in shape)
    assert shapes == wanted


def test_mlx_layout_gives_the_pytorch_bundle(work, configs, sources):
    """Kyutai's MLX file and the MoshiVis PyTorch file it was made from convert to the same
    bundle, bit for bit (float32, unquantized), and generate the same tokens."""
    args = ("--dtype", "float32", "--no-quantize")
    pt = convert_lm(work, configs, sources["pt"], "pt_f32", *args)
    mlx = convert_lm(work, configs, sources["mlx"], "mlx_f32", *args)
    assert_same_tensors(pt, mlx, "model")
    assert_same_tensors(pt, mlx, "vision")
    cp, cm = read_config(pt), read_config(mlx)
    assert cp["lm"] == cm["lm"] and cp["vision"]["siglip"] == cm["vision"]["siglip"]
    assert cm["source"]["layout"] == "kyuteye-mlx"
    assert cm["vision"]["source"]["layout"] == "kyuteye-mlx"
    assert greedy_run(pt) == greedy_run(mlx)


# The fusion settings of Kyutai's MoshiVis config (KyuteyeConfig, as configs/moshika-vis.yaml
# gives them): xa_start / xa_end are the markers of the tokens cross-attention covers.
KYUTEYE_FUSION = {
    "add_boi_eoi": False, "align_img_and_speech_tokens_dim": True,
    "encoder_name": "siglip_gemma2_448", "image_size": 512, "interpolation": "bicubic",
    "norm_extra": None, "norm_xa": "rms_norm", "num_crossattended_tokens": -1,
    "num_extra_tokens": 0, "xa_conditional_gating": True, "xa_delay": 0, "xa_dim": None,
    "xa_start": "start", "xa_end": "end", "xa_gate_shared": False, "xa_gating": "sigmoid",
    "xa_layers": [], "xa_shared": True, "xa_step": 1,
}


@pytest.mark.parametrize("scope", [{"xa_start": "start", "xa_end": "end"},
                                   {"xa_start": 0, "xa_end": "end"}], ids=["markers", "zero"])
def test_kyutai_moshivis_config_converts_as_without_its_scope(work, configs, sources, scope):
    """xa_start "start" / xa_end "end" say cross-attention covers every token, as ours
    does: the model converts to the same bundle, and the same tokens, as without those
    keys; the generation's xa_start (steps before the image counts) stays ours."""
    kyuteye = work / f"kyuteye_config_{scope['xa_start']}.json"
    kyuteye.write_text(json.dumps({**TINY_LM_CONFIG, **KYUTEYE_FUSION, **scope}))
    args = ("--dtype", "float32", "--no-quantize")
    plain = convert_lm(work, configs, sources["pt"], f"plain_scope_{scope['xa_start']}", *args)
    out = work / f"kyuteye_scope_{scope['xa_start']}"
    ok("--moshi-weights", sources["pt"], "--config", kyuteye, "--vision-config",
       configs["siglip"], "--out", out, *args)
    assert_same_tensors(plain, out, "model")
    cp, ck = read_config(plain), read_config(out)
    assert ck["lm"] == cp["lm"] and ck["lm"]["cross_attention"]
    assert ck["generation"] == cp["generation"]
    assert ck["generation"]["xa_start"] == GenerationConfig().xa_start == 16
    assert greedy_run(out) == greedy_run(plain)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_quantized_mlx_files_are_kept_exactly(work, configs, sources, bits, group):
    """model.q8 / model.q4: with the same bits and group size as the target, the packed
    tensors are copied, and equal the PyTorch checkpoint converted and quantized by us."""
    q = ("--q-bits", bits, "--q-group-size", group)
    pt = convert_lm(work, configs, sources["pt"], f"pt_q{bits}", *q)
    mlx = convert_lm(work, configs, sources[f"mlx-q{bits}"], f"mlx_q{bits}", *q)
    assert_same_tensors(pt, mlx, "model")
    assert_same_tensors(pt, mlx, "vision")
    assert read_config(mlx)["quantization"] == {"bits": bits, "group_size": group}
    plan = ok("--moshi-weights", sources[f"mlx-q{bits}"], "--config", configs["lm"],
              "--vision-config", configs["siglip"], *q, "--dry-run")
    assert f"stored q{bits}/g{group}" in plan and f"kept q{bits}/g{group}" in plan
    assert "copy of transformer.layers.0.cross_attention.mha.q_proj.scales" in plan
    assert greedy_run(pt) == greedy_run(mlx)


def test_quantized_mlx_file_dequantized_and_requantized(work, configs, sources):
    """q8 -> float32 (--dequantize): exactly MLX's dequantization; q8 -> q4: the same as
    dequantizing to bfloat16 first and quantizing that."""
    src = mx.load(str(sources["mlx-q8"]))
    f32 = convert_lm(work, configs, sources["mlx-q8"], "mlx_q8_f32", "--dequantize",
                     "--dtype", "float32")
    stored = mx.load(str(f32 / "model.safetensors"))
    w = stored["transformer.layers.1.ffn.linear_in.weight"]
    base = "transformer.layers.1.gating.linear_in."
    expected = mx.dequantize(src[base + "weight"], src[base + "scales"].astype(mx.float32),
                             src[base + "biases"].astype(mx.float32), group_size=64, bits=8)
    np.testing.assert_array_equal(np.array(w), np.array(expected))
    assert not any(k.endswith(".scales") for k in stored)

    q4 = convert_lm(work, configs, sources["mlx-q8"], "mlx_q8_to_q4", "--q-bits", 4,
                    "--q-group-size", 32)
    bf16 = convert_lm(work, configs, sources["mlx-q8"], "mlx_q8_bf16", "--dequantize")
    via = work / "mlx_q8_bf16_q4"
    ok("--bundle", bf16, "--q-bits", 4, "--q-group-size", 32, "--out", via)
    assert_same_tensors(q4, via, "model")
    # A q4/g32 model: packed half as wide as the q8 source, in groups half as long...
    assert read_config(q4)["quantization"] == {"bits": 4, "group_size": 32}
    packed = mx.load(str(q4 / "model.safetensors"))
    assert packed["text_linear.weight"].shape[1] * 2 == src["text_linear.weight"].shape[1]
    assert packed["text_linear.scales"].shape[1] == 2 * src["text_linear.scales"].shape[1]
    # ...that generates tokens of the right shapes and ranges, other ones than the q8
    # numbers (f32 holds them exactly) do: coarser weights, another answer.
    lm = read_config(q4)["lm"]
    outs = greedy_run(q4)
    assert len(outs) == 6 and outs[0] is None  # the acoustic delay
    for text, audio in outs[1:]:
        assert 0 <= text < lm["text_card"] and len(audio) == lm["dep_q"]
        assert all(0 <= c < lm["card"] for c in audio)
    assert outs != greedy_run(f32)


def test_copies_of_shared_tensors_must_be_equal(work, configs, sources):
    src = {k: v for k, v in mx.load(str(sources["mlx-q8"])).items()}
    key = "transformer.layers.1.cross_attention.mha.out_proj.scales"
    src[key] = src[key] * 2
    bad = save_mx(src, work / "bad_copy.q8.safetensors")
    out = work / "bad_copy"
    rc, _, err = run("--moshi-weights", bad, "--config", configs["lm"], "--vision-config",
                     configs["siglip"], "--out", out)
    assert rc == 1 and err.count("\n") == 1
    assert "copies of shared tensors differ" in err and key in err
    assert nothing_left(out)

    src = {k: v for k, v in mx.load(str(sources["mlx"])).items()}
    key = "depformer.slices.3.transformer.layers.1.norm2.weight"
    src[key] = src[key] + 1
    bad = save_mx(src, work / "bad_norm.safetensors")
    rc, _, err = run("--moshi-weights", bad, "--config", configs["lm"], "--vision-config",
                     configs["siglip"], "--out", out)
    assert rc == 1 and key in err and nothing_left(out)


# -- our own bundles --------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_f32(work, configs, sources) -> Path:
    """A float32 bundle with every part: LM, tower, Mimi, tokenizer."""
    out = work / "full_f32"
    ok("--moshi-weights", sources["pt"], "--config", configs["lm"], "--vision-config",
       configs["siglip"], "--mimi-weights", configs["mimi"], "--mimi-config",
       configs["mimi_config"], "--tokenizer", configs["tokenizer"], "--dtype", "float32",
       "--no-quantize", "--out", out)
    return out


def test_bundle_config_holds_everything(full_f32):
    cfg = read_config(full_f32)
    assert cfg["format_version"] == 1
    assert cfg["model_type"] == "moshivis" and cfg["lm"]["cross_attention"]
    assert cfg["lm"]["num_heads"] == TINY_LM_CONFIG["num_heads"]
    assert cfg["dtype"] == "float32" and cfg["quantization"] is None
    assert set(cfg["generation"]) >= {"text_temperature", "text_top_k", "audio_temperature",
                                      "audio_top_k", "xa_start"}
    assert cfg["vision"]["siglip"]["dim"] == 48 and cfg["mimi"]["sample_rate"] == 24000
    assert cfg["tokenizer"] == "tokenizer.model"
    assert (full_f32 / "tokenizer.model").read_bytes() == TINY_TOKENIZER
    assert cfg["source"]["tokenizer"] == "tokenizer_spm_32k_3.model"
    assert cfg["converter"]["name"] == "moshivis-convert"
    assert sorted(p.name for p in full_f32.iterdir()) == [
        "config.json", "mimi.safetensors", "model.safetensors", "tokenizer.model",
        "vision.safetensors"]


def test_bundle_requantized_equals_direct_conversion(work, configs, sources, full_f32):
    """float32 bundle -> q4/g32 is exactly PyTorch -> q4/g32; Mimi and tokenizer carried."""
    via = work / "via_bundle_q4"
    ok("--bundle", full_f32, "--q-bits", 4, "--q-group-size", 32, "--out", via)
    direct = convert_lm(work, configs, sources["pt"], "direct_q4", "--dtype", "float32",
                        "--q-bits", 4, "--q-group-size", 32)
    assert_same_tensors(via, direct, "model")
    assert_same_tensors(via, direct, "vision")
    assert_same_tensors(via, full_f32, "mimi")
    cfg = read_config(via)
    assert cfg["quantization"] == {"bits": 4, "group_size": 32}
    assert cfg["vision"]["quantization"] == {"bits": 8, "group_size": 32}
    assert cfg["source"]["layout"] == "bundle" and cfg["source"]["from"]["layout"] == \
        "moshivis-pytorch"
    assert (via / "tokenizer.model").read_bytes() == TINY_TOKENIZER
    assert cfg["mimi"] == read_config(full_f32)["mimi"]
    assert load_mimi(via).cfg == load_mimi(full_f32).cfg


def test_bundle_q8_round_trips(work, full_f32):
    """q8 -> q8 copies every packed tensor; q8 -> --dequantize stores MLX's dequantization."""
    q8 = work / "rt_q8"
    ok("--bundle", full_f32, "--out", q8)  # default: q8, group 64, the bundle's float32
    again = work / "rt_q8_again"
    ok("--bundle", q8, "--out", again)
    assert_same_tensors(q8, again, "model")
    back = work / "rt_f32"
    ok("--bundle", q8, "--dequantize", "--out", back)
    packed = mx.load(str(q8 / "model.safetensors"))
    floats = mx.load(str(back / "model.safetensors"))
    for name in ("text_linear", "depformer.heads.3", "transformer.layers.0.self_attn.in_proj"):
        expected = mx.dequantize(packed[name + ".weight"], packed[name + ".scales"],
                                 packed[name + ".biases"], group_size=64, bits=8)
        np.testing.assert_array_equal(np.array(floats[name + ".weight"]), np.array(expected))
    assert read_config(back)["quantization"] is None
    assert greedy_run(back) == greedy_run(q8)  # the same numbers, float or packed


def test_sharded_bundle(work, full_f32):
    """Above --shard-size the LM goes to shards + index (mlx-lm's names) and loads the same;
    a sharded bundle converts again."""
    sharded = work / "sharded"
    ok("--bundle", full_f32, "--no-quantize", "--shard-size", "256KB", "--out", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    for name in shards:  # bounded, except a single tensor larger than the limit
        tensors = mx.load(str(sharded / name))
        assert sum(v.nbytes for v in tensors.values()) <= 256 << 10 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for s in shards for v in mx.load(str(sharded / s)).values())
    assert_same_tensors(sharded, full_f32, "model")
    assert greedy_run(sharded) == greedy_run(full_f32)
    unsharded = work / "unsharded"
    ok("--bundle", sharded, "--no-quantize", "--out", unsharded)
    assert (unsharded / "model.safetensors").exists()
    assert_same_tensors(unsharded, full_f32, "model")


# -- dry runs ---------------------------------------------------------------------------

def _logical_names(tensors: dict) -> set[str]:
    return {k for k in tensors if not k.endswith((".scales", ".biases"))}


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.json")))
def test_dry_run_on_every_manifest(name):
    """Every tensor of the released files is planned (none missing, none left over), and
    the bundle's size is printed for bfloat16, q8 and q4."""
    rc, out, err = run("--dry-run", "--manifest", MANIFESTS / name)
    assert rc == 0, err
    sources = set()
    for line in out.splitlines():
        if " -> " in line and line.startswith("  ") and " tensors (" not in line:
            head = line.split(" -> ")[0].strip()
            sources |= {part.split(" [")[0] for part in head.split(" + ")}
    assert sources == set(manifest(name)["tensors"])
    sizes = re.search(r"bundle size: bfloat16 (.+) \| q8 \(group 64\) (.+) \| q4 \(group 32\) (.+)",
                      out)
    assert sizes, out[-500:]
    bf16, q8, q4 = (_bytes(s) for s in sizes.groups())
    elements = manifest(name)["num_elements"]
    if name == "mimi.pt.json":  # float32, never quantized, usage statistics folded away
        assert bf16 == q8 == q4 < 4 * elements
    elif name.startswith("siglip"):  # the tower never goes below 8 bits (q4: groups of 32)
        assert bf16 == pytest.approx(2 * elements, rel=1e-3) and q8 < q4 < bf16
    else:
        assert bf16 == pytest.approx(2 * elements, rel=1e-3) and q4 < q8 < 0.6 * bf16


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_dry_run_on_files_writes_nothing_and_sizes_exactly(work, configs, sources):
    """The dry run's size is the bundle's on disk, to the byte: what "wrote" then says."""
    from moshivis_mlx.weights_convert.convert import (
        ConvertOptions,
        bundle_size,
        human,
        plan_conversion,
    )

    out = work / "dry"
    args = ("--moshi-weights", sources["mlx-q4"], "--config", configs["lm"], "--vision-config",
            configs["siglip"], "--mimi-weights", configs["mimi"], "--mimi-config",
            configs["mimi_config"], "--tokenizer", configs["tokenizer"])
    rc, text, err = run(*args, "--dry-run", "--out", out)
    assert rc == 0 and not out.exists()
    planned = re.search(r"this conversion \(bfloat16, q8/g64\): (.+) on disk", text).group(1)
    wrote = ok(*args, "--out", work / "dry_real")
    on_disk = sum(f.stat().st_size for f in (work / "dry_real").iterdir())
    assert f"wrote {work / 'dry_real'} ({planned})" in wrote and planned == human(on_disk)
    plan = plan_conversion(ConvertOptions(
        moshi_weights=sources["mlx-q4"], kyutai_config=configs["lm"],
        vision_config=configs["siglip"], mimi_weights=configs["mimi"],
        mimi_config=configs["mimi_config"], tokenizer=configs["tokenizer"]))
    assert bundle_size(plan, 5 << 30) == on_disk
    assert "dequantized, quantized q8/g64" in text


# -- bad inputs: one line, non-zero, nothing left behind --------------------------------

def refused(work: Path, *args, out_name: str = "refused") -> str:
    out = work / out_name
    rc, _, err = run(*args, "--out", out)
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("moshivis-convert: "), err
    assert "Traceback" not in err
    assert nothing_left(out)
    return err


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_pickle_is_refused(work):
    pickle = work / "model.pt"
    pickle.write_bytes(b"\x80\x04not really")
    err = refused(work, "--moshi-weights", pickle)
    assert "refusing to read a pickle" in err and ".safetensors" in err


def test_truncated_file(work, sources):
    data = sources["pt"].read_bytes()
    cut = work / "truncated.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    err = refused(work, "--moshi-weights", cut)
    assert "truncated" in err and str(cut) in err


def test_overlapping_offsets(work):
    bad = raw_safetensors(work / "overlap.safetensors", {
        "a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    err = refused(work, "--moshi-weights", bad)
    assert "overlap" in err and "'a.weight'" in err and str(bad) in err


def test_absurd_shape(work):
    bad = raw_safetensors(work / "absurd.safetensors", {
        "text_emb.weight": {"dtype": "BF16", "shape": [1 << 40, 1 << 40],
                            "data_offsets": [0, 8]}}, bytes(8))
    err = refused(work, "--moshi-weights", bad)
    assert "absurd shape" in err and "text_emb.weight" in err


def test_missing_unexpected_and_misshaped_tensors(work, configs):
    tensors = tiny_moshi_pt_tensors()
    del tensors["transformer.layers.1.norm2.alpha"]
    tensors["transformer.layers.1.surprise"] = np.zeros(3, np.float32)
    tensors["out_norm.alpha"] = np.ones((1, 1, 8), np.float32)
    bad = work / "broken.safetensors"
    save_file(tensors, str(bad))
    err = refused(work, "--moshi-weights", bad, "--config", configs["lm"])
    assert "missing tensors: transformer.layers.1.norm2.alpha" in err
    assert "unexpected tensors: transformer.layers.1.surprise" in err
    assert "mis-shaped tensors: out_norm.alpha [1, 1, 8] -> out_norm.weight [64]" in err


def test_existing_output_needs_force(work, configs):
    """An existing bundle is replaced only with --force; anything else is never replaced
    (--force over a folder of someone's files would delete them)."""
    mimi = ("--mimi-weights", configs["mimi"], "--mimi-config", configs["mimi_config"])
    out = work / "existing"
    ok(*mimi, "--out", out)
    before = (out / "config.json").stat().st_mtime_ns
    rc, _, err = run(*mimi, "--out", out)
    assert rc == 1 and "already exists (use --force" in err and err.count("\n") == 1
    assert (out / "config.json").stat().st_mtime_ns == before
    ok(*mimi, "--out", out, "--force")
    assert (out / "mimi.safetensors").exists() and not list(work.glob(".existing.*"))

    mine = work / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    rc, _, err = run(*mimi, "--out", mine, "--force")
    assert rc == 1 and "not a moshivis-mlx bundle" in err and err.count("\n") == 1
    assert (mine / "keep.txt").read_text() == "mine" and not list(work.glob(".mine.*"))


def test_interrupted_conversion_leaves_nothing(work, configs, sources, monkeypatch):
    """Ctrl-C in the middle of writing: exit 130, one line, no bundle, no partial files."""
    from moshivis_mlx.weights_convert import safetensors_io

    original = safetensors_io.SafetensorsWriter.write
    calls = []

    def interrupted(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name, array)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", interrupted)
    out = work / "interrupted"
    rc, _, err = run("--moshi-weights", sources["pt"], "--config", configs["lm"],
                     "--vision-config", configs["siglip"], "--out", out)
    assert rc == 130 and err == "moshivis-convert: interrupted, nothing written\n"
    assert len(calls) == 5 and nothing_left(out)


def test_full_disk_leaves_nothing(work, configs, sources, monkeypatch):
    from moshivis_mlx.weights_convert import safetensors_io

    def full(self, name, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", full)
    err = refused(work, "--moshi-weights", sources["pt"], "--config", configs["lm"],
                  "--vision-config", configs["siglip"], out_name="disk_full")
    assert "No space left on device" in err


def test_other_refusals(work, configs, sources):
    assert "nothing to convert" in refused(work)
    assert "--bundle converts a bundle as it is" in refused(
        work, "--bundle", work, "--mimi-weights", configs["mimi"])
    assert "no config.json" in refused(work, "--bundle", work)
    assert "not a SentencePiece model" in refused(
        work, "--mimi-weights", configs["mimi"], "--mimi-config", configs["mimi_config"],
        "--tokenizer", configs["lm"])
    assert "use --manifest with --dry-run" in refused(
        work, "--manifest", MANIFESTS / "mimi.pt.json")
    assert "number of attention heads" in refused(work, "--moshi-weights", sources["pt"])
    candle = work / "candle.safetensors"
    save_file({"depformer.0.emb.weight": np.zeros((4, 4), np.float32)}, str(candle))
    assert "Rust (candle) layout" in refused(work, "--moshi-weights", candle)


def test_progress_bars(work, configs):
    """On a terminal the conversion shows one bar per part (rich), up to the part's size."""
    from moshivis_mlx.cli.convert import byte_bars

    err = io.StringIO()
    with contextlib.redirect_stderr(err), byte_bars() as progress:
        from moshivis_mlx.weights_convert.convert import ConvertOptions, convert

        convert(ConvertOptions(out=work / "with_bars", mimi_weights=configs["mimi"],
                               mimi_config=configs["mimi_config"]), progress.track)
    task = progress.progress.tasks[0]
    assert task.description == "Mimi codec" and task.completed == task.total > 0
    assert "Mimi codec" in err.getvalue()


# -- memory -----------------------------------------------------------------------------

# Linux: VmHWM (ru_maxrss would include the parent's peak, kept across fork and exec);
# macOS: ru_maxrss, in bytes there.
PEAK_PROBE = """import os, resource, sys
from moshivis_mlx.cli.convert import main
rc = main(sys.argv[1:])
if os.path.exists("/proc/self/status"):
    kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
else:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print("PEAK_KB", kb, rc)
"""


def peak_rss(*args) -> int:
    """Peak resident memory (bytes) of a fresh `moshivis-convert *args` process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", PEAK_PROBE, *map(str, args)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PEAK_KB")]
    assert p.returncode == 0 and line and line[0].endswith(" 0"), p.stderr[-2000:]
    return int(line[0].split()[1]) * 1024


@pytest.mark.slow
def test_peak_memory_stays_far_below_the_checkpoint(tmp_path):
    """A ~400 MB bfloat16 checkpoint converts (q8) with ~50 MB more than the process needs to
    start and plan: tensors are read, converted and written one at a time (measured: 315 MB
    peak, 40 MB above the dry run). Before streaming, the whole converted model was held at
    once: 974 MB peak for this file."""
    from synthetic import pt_shapes, write_big_checkpoint

    from moshivis_mlx.models.lm import DepformerConfig, LmConfig

    cfg = LmConfig(dim=1024, num_heads=8, num_layers=8, ffn_hidden=2816, text_card=8000,
                   depformer=DepformerConfig(dim=512, num_heads=4, num_layers=2, ffn_hidden=1408))
    src = tmp_path / "big.safetensors"
    size = write_big_checkpoint(src, pt_shapes(cfg))
    assert 300e6 < size < 600e6
    kc = tmp_path / "config.json"
    kc.write_text(json.dumps({"num_heads": 8, "depformer_num_heads": 4}))
    args = ("--moshi-weights", src, "--config", kc)
    baseline = peak_rss(*args, "--dry-run")  # the same process, imports and plan, no data
    peak = peak_rss(*args, "--out", tmp_path / "q8")
    print(f"checkpoint {size / 1e6:.0f} MB: peak RSS {peak / 1e6:.0f} MB, "
          f"{(peak - baseline) / 1e6:.0f} MB above the dry run's {baseline / 1e6:.0f} MB")
    assert peak - baseline < 0.15 * size
    assert peak < size
    assert load_lm(tmp_path / "q8").cfg == cfg


def test_manifests_are_validated_and_debug_shows_the_traceback(work):
    bad = work / "bad_manifest.json"
    bad.write_text(json.dumps({"tensors": {"text_emb.weight": [[1 << 40, 1 << 40], "bfloat16"],
                                           "x": [[2], "complex64"]}}))
    rc, _, err = run("--dry-run", "--manifest", bad)
    assert rc == 1 and err.count("\n") == 1 and "absurd shape" in err and str(bad) in err
    from moshivis_mlx.weights_convert.safetensors_io import WeightsError

    with pytest.raises(WeightsError, match="absurd shape"):
        convert_main(["--dry-run", "--manifest", str(bad), "--debug"])
