"""Small random checkpoints with exactly the key names of Kyutai's released files.

The manifests under tests/data/manifests list every tensor of the real checkpoints; a
synthetic checkpoint keeps those names, shrinks every dimension through a size table and
keeps only the first layers, so converters are tested on the real layouts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

MANIFESTS = Path(__file__).parent / "data" / "manifests"

# Full-size LM dimension -> tiny size (consistent with moshivis_mlx.models.lm.tiny()).
LM_SIZES = {
    4096: 64, 12288: 192, 22528: 384, 11264: 192, 32001: 97, 32000: 96, 2049: 65, 2048: 64,
    1024: 64, 24576: 1536, 8192: 512, 5632: 256, 2816: 128, 512: 8, 1152: 48, 1: 1,
}
TINY_LM_CONFIG = {"num_heads": 4, "depformer_num_heads": 2, "context": 24}


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v[0]) for k, v in manifest(name)["tensors"].items()}


def shrink(shapes: dict[str, tuple[int, ...]], sizes: dict[int, int], layers: int = 2,
           depformer_layers: int = 2) -> dict[str, tuple[int, ...]]:
    """Keeps layers < `layers` (< `depformer_layers` for the depformer), maps every size."""
    out = {}
    for k, shape in shapes.items():
        m = re.search(r"(depformer\.(?:slices\.\d+\.transformer\.)?layers|transformer\.layers)"
                      r"\.(\d+)\.", k)
        if m:
            limit = depformer_layers if m.group(1).startswith("depformer") else layers
            if int(m.group(2)) >= limit:
                continue
        out[k] = tuple(sizes[s] for s in shape)
    return out


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if k.endswith("alpha") or k.endswith("norm.weight") or re.search(r"norm\w*\.weight$", k):
            a = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[k] = a.astype(np.float32)
    return out


def tiny_moshivis_pt_tensors(duplicate_shared: bool = False,
                             seed: int = 0) -> dict[str, np.ndarray]:
    """The LM part of kyutai/moshika-vis-pytorch-bf16, tiny (the SigLIP tower left out)."""
    shapes = {k: v for k, v in manifest_shapes("moshivis.pt.json").items()
              if not k.startswith("image_prefix.enc.")}
    shapes = shrink(shapes, LM_SIZES)
    if duplicate_shared:
        for name in ("in_proj_weight", "out_proj.weight"):
            shapes[f"llm.transformer.layers.1.cross_attention.mha.{name}"] = \
                shapes[f"llm.transformer.layers.0.cross_attention.mha.{name}"]
    tensors = random_tensors(shapes, seed)
    if duplicate_shared:
        for name in ("in_proj_weight", "out_proj.weight"):
            tensors[f"llm.transformer.layers.1.cross_attention.mha.{name}"] = \
                tensors[f"llm.transformer.layers.0.cross_attention.mha.{name}"].copy()
    return tensors


def tiny_moshi_pt_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """kyutai/moshiko-pytorch-bf16's model.safetensors, tiny."""
    return random_tensors(shrink(manifest_shapes("moshi_7b_lm.pt.json"), LM_SIZES), seed)


# -- the SigLIP tower stored with MoshiVis -------------------------------------------------

# Full-size tower dimension -> tiny (width 48 = the tiny LM's image_dim, 16 positions).
TOWER_SIZES = {1152: 48, 4304: 88, 1024: 16, 3: 3, 14: 14}
TINY_SIGLIP_CONFIG = dict(hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                          num_attention_heads=4, image_size=56, patch_size=14, num_channels=3,
                          layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def tiny_tower_tensors(prefix: str = "image_prefix.enc.model.", layers: int = 2,
                       seed: int = 1) -> dict[str, np.ndarray]:
    """The released MoshiVis file's SigLIP tower (manifest names), tiny, under `prefix`."""
    src = "image_prefix.enc.model."
    shapes = {}
    for k, shape in manifest_shapes("moshivis.pt.json").items():
        if not k.startswith(src):
            continue
        m = re.search(r"encoder\.layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= layers:
            continue
        shapes[prefix + k[len(src):]] = tuple(TOWER_SIZES[s] for s in shape)
    return random_tensors(shapes, seed)


# -- Kyutai's MLX layout (kyuteye_mlx), built from the MoshiVis PyTorch layout ------------

def to_kyuteye_mlx(pt: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A MoshiVis PyTorch checkpoint in Kyutai's MLX layout, by the transforms the manifest
    moshivis.mlx.json documents (names, 1-D norms, q/kv split, one depformer slice per
    codebook with its chunk of the fused weights and copies of the shared norms)."""
    out: dict[str, np.ndarray] = {}
    dep_q = len({k for k in pt if re.fullmatch(r"audio_linears\.\d+\.weight", k)})
    dep_layers = len({k for k in pt if re.fullmatch(r"depformer\.layers\.\d+\.norm1\.alpha", k)})
    for k, v in pt.items():
        if k.startswith("image_prefix.enc."):
            out["img_embedder." + k[len("image_prefix.enc."):]] = v
        elif k.startswith("image_prefix."):
            name = "transformer." + k.replace(".alpha", ".weight")
            out[name] = v[0, 0] if k.endswith(".alpha") else v
        elif k.startswith("audio_emb."):
            out["audio_embs." + k[len("audio_emb."):]] = v
        elif k.startswith("llm."):
            name = k[len("llm."):]
            if name.endswith(".alpha"):
                out[name[: -len(".alpha")] + ".weight"] = v[0, 0]
            elif name == "transformer.layers.0.cross_attention.mha.in_proj_weight":
                d = v.shape[1]
                out["transformer.layers.0.cross_attention.mha.q_proj.weight"] = v[:d]
                out["transformer.layers.0.cross_attention.mha.kv_proj.weight"] = v[d:]
            elif ".cross_attention.mha." in name and not name.startswith("transformer.layers.0."):
                continue  # copies of the shared module: the MLX file keeps layer 0's
            else:
                name = name.replace("in_proj_weight", "in_proj.weight")
                name = name.replace("cross_attention.gate.alpha.",
                                    "cross_attention.gate.alpha.layers.")
                out[name] = v
    for k in range(dep_q):
        s = f"depformer.slices.{k}."
        out[s + "linear_in.weight"] = pt[f"depformer_in.{k}.weight"]
        out[s + "linear_out.weight"] = pt[f"audio_linears.{k}.weight"]
        out[s + "emb.weight"] = pt["depformer_text_emb.weight" if k == 0
                                   else f"depformer_emb.{k - 1}.weight"]
        for layer in range(dep_layers):
            src, dst = f"depformer.layers.{layer}.", f"{s}transformer.layers.{layer}."
            for name, fused in (("in_proj.weight", "in_proj_weight"),
                                ("out_proj.weight", "out_proj.weight")):
                w = pt[src + "self_attn." + fused]
                rows = w.shape[0] // dep_q
                out[dst + "self_attn." + name] = w[k * rows: (k + 1) * rows]
            for n in ("norm1", "norm2"):
                out[f"{dst}{n}.weight"] = pt[f"{src}{n}.alpha"][0, 0].copy()
            for n in ("linear_in", "linear_out"):
                out[f"{dst}gating.{n}.weight"] = pt[f"{src}gating.{k}.{n}.weight"]
    return out


def quantize_kyuteye(tensors: dict, bits: int, group_size: int, num_layers: int) -> dict:
    """What Kyutai's quantizer makes of an MLX-layout checkpoint: every linear and embedding
    weight (2-D, input width divisible by the group size; the tower stays float) as MLX's
    packed weight + scales + biases, in bfloat16; and copies of the shared cross-attention
    under layers 1.. (all but kv_proj.weight). Values: mlx arrays."""
    import mlx.core as mx

    out = {}
    for k, v in tensors.items():
        a = mx.array(v).astype(mx.bfloat16)
        if (k.endswith(".weight") and a.ndim == 2 and a.shape[1] % group_size == 0
                and not k.startswith("img_embedder.")):
            w, s, b = mx.quantize(a, group_size=group_size, bits=bits)
            base = k[: -len(".weight")]
            out[k], out[base + ".scales"], out[base + ".biases"] = w, s, b
        else:
            out[k] = a
    xa = "transformer.layers.0.cross_attention.mha."
    for layer in range(1, num_layers):
        for k in [k for k in out if k.startswith(xa)]:
            if k != xa + "kv_proj.weight":
                out[k.replace(".layers.0.", f".layers.{layer}.")] = out[k]
    return out


# -- Mimi ----------------------------------------------------------------------------------

def tiny_mimi_tensors(seed: int = 2) -> tuple[dict[str, np.ndarray], dict]:
    """A tiny Mimi in Kyutai's released layout (random, codebooks trained) and its config."""
    from moshivis_mlx.weights_convert.mimi_layout import mimi_config_to_kyutai, mimi_mapping

    from moshivis_mlx.models.mimi import MimiConfig

    cfg = MimiConfig.tiny()
    rng = np.random.default_rng(seed)
    out = {}
    mapping = mimi_mapping(cfg)
    for e in mapping.entries:
        out[e.src] = (rng.standard_normal(e.src_shape) / np.sqrt(max(e.src_shape[-1], 1))
                      ).astype(np.float32)
        if e.aux:
            out[e.aux] = (0.5 + rng.random(e.src_shape[:1])).astype(np.float32)
    for k in mapping.ignored:
        out[k] = np.ones((1,), np.float32)
    return out, mimi_config_to_kyutai(cfg)


def _tiny_tokenizer() -> bytes:
    """A real SentencePiece model with the tiny LM's 96 text pieces (the demo's recipe)."""
    from moshivis_mlx.app.demo import train_tokenizer

    return train_tokenizer(LM_SIZES[32000])


TINY_TOKENIZER = _tiny_tokenizer()


def fake_hf_repo(hf_cache: Path, repo: str, files: dict[str, bytes | Path],
                 absent: tuple[str, ...] = (), commit: str = "0123456789abcdef" * 2 + "01234567"
                 ) -> Path:
    """A repository as huggingface-hub caches it (offline use): refs/main -> snapshot;
    `absent` files are recorded as known not to exist in the repository."""
    import shutil

    root = Path(hf_cache) / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, snap / name)
        else:
            (snap / name).write_bytes(content)
    for name in absent:
        marker = root / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return snap


def pt_shapes(cfg, layout: str = "moshi-pytorch") -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of Kyutai's PyTorch layout for an LM config."""
    from moshivis_mlx.weights_convert.lm_layout import lm_mapping

    shapes: dict[str, tuple[int, ...]] = {}
    for e in lm_mapping({}, layout, cfg).entries:
        if e.src.endswith(".alpha"):
            shapes[e.src] = (1, 1, e.shape[0])
        elif e.rows is not None:
            shapes[e.src] = (max(e.rows[1], shapes.get(e.src, (0,))[0]),) + e.shape[1:]
        else:
            shapes[e.src] = e.shape
    return shapes


def write_big_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """A bfloat16 checkpoint written tensor by tensor (never whole in memory): random values
    from one 4 MB block. Returns the file's size."""
    import mlx.core as mx
    from moshivis_mlx.weights_convert.safetensors_io import SafetensorsWriter

    block = np.random.default_rng(seed).standard_normal(1 << 21).astype(np.float32)
    plan = [(k, "BF16", tuple(s)) for k, s in sorted(shapes.items())]
    with SafetensorsWriter(path, plan) as w:
        for i, (name, _, shape) in enumerate(plan):
            n = int(np.prod(shape))
            values = np.resize(np.roll(block, i), n).reshape(shape) * 0.05
            if name.endswith(".alpha"):
                values = values + 1.0
            w.write(name, mx.array(values).astype(mx.bfloat16))
    return Path(path).stat().st_size
