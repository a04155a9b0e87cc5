"""SigLIP vision-tower checkpoint layouts -> ours.

The same tower is stored under different prefixes, all with HF's module names below it:

    vision_model.X                      HF SiglipVisionModel / SiglipModel (as released)
    X                                   HF SiglipVisionModel saved by transformers >= 5
    vision_tower.vision_model.X         HF PaliGemma (model.vision_tower... in newer files)
    image_prefix.enc.model.X            MoshiVis PyTorch checkpoint (kyuteye_pt)
    img_embedder.model.X                MoshiVis MLX checkpoint (kyuteye_mlx)

Ours differs in two ways: attention has one fused [q; k; v] input projection (the project
transformer's), and the patch convolution is MLX's [out, kh, kw, in] instead of PyTorch's
[out, in, kh, kw]. kyuteye_mlx files keep the PyTorch order and transpose when loading,
so the order is read from each file's shape, not assumed from its layout.

Quantization: the tower follows the bundle's quantization, but never below 8 bits. It runs
once per image, so 4 bits would buy no speed worth having and cost accuracy that every
later step sees through the cross-attention; 8 bits roughly halves its memory (0.8 GB in
bfloat16). Layers whose input width the group size does not divide stay float: with the
PaliGemma2 tower that is each MLP's output projection (4304 inputs) and, always, the patch
convolution and the norms. `--vision-float` keeps the whole tower in the bundle's dtype,
as Kyutai's own MLX checkpoints do. A quantized source tower (one of our bundles) is
dequantized, or copied packed when it already has the target's bits and group size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moshivis_mlx.models.config import check_value
from moshivis_mlx.models.siglip import SiglipConfig, SiglipVision, paligemma2_448
from moshivis_mlx.quant import QuantSpec

from .lm_layout import CONFIG_PATH, KYUTEYE_MLX, MOSHIVIS_PT
from .mapping import Entry, Found, Mapping, about, check_mapping, model_tensors, rename, renames
from .safetensors_io import WeightsError, read_json
from .source import FloatView, Source, infer_quant_spec

HF_SIGLIP = "hf-siglip"
HF_PALIGEMMA = "hf-paligemma"

PREFIXES: list[tuple[str, str]] = [
    ("image_prefix.enc.model.", MOSHIVIS_PT),
    ("img_embedder.model.", KYUTEYE_MLX),
    ("model.vision_tower.vision_model.", HF_PALIGEMMA),
    ("vision_tower.vision_model.", HF_PALIGEMMA),
    ("vision_model.", HF_SIGLIP),
    ("", HF_SIGLIP),  # SiglipVisionModel saved by transformers >= 5: no prefix
]
# HF `hidden_act` names -> our FFN kinds. SigLIP checkpoints use the tanh approximation.
HF_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}

# HF SiglipVisionConfig defaults, for keys a config file leaves out (as HF itself does).
HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}

PATCH = "embeddings.patch_embedding.weight"
PT_TO_MLX_CONV = (0, 2, 3, 1)
QUANT_ANCHOR = "encoder.layers.0.self_attn.q_proj.weight"
"""The weight that tells how a quantized tower is stored (its input width is the patch
convolution's output width, which is never quantized)."""
RENAMES = renames([  # ours -> HF's, below the prefix
    (r"embeddings\.patch\.(\w+)", r"embeddings.patch_embedding.\1"),
    (r"embeddings\.positions", "embeddings.position_embedding.weight"),
    (r"encoder\.layers\.(\d+)\.norm([12])\.(\w+)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.ffn\.linear_in\.(\w+)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.linear_out\.(\w+)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"post_norm\.(\w+)", r"post_layernorm.\1"),
])
FUSED = re.compile(r"(encoder\.layers\.\d+\.self_attn)\.in_proj\.(\w+)")


def find_tower(keys: set[str] | list[str]) -> tuple[str, str] | None:
    """(prefix, layout) of the one SigLIP tower among `keys`; None if there is none."""
    keys = set(keys)
    found = [(p, layout) for p, layout in PREFIXES if p + PATCH in keys]
    if len(found) > 1:
        raise WeightsError("several SigLIP towers in one file: "
                           + ", ".join(p + PATCH for p, _ in found))
    return found[0] if found else None


def detect_vision_layout(keys: set[str] | list[str]) -> tuple[str, str]:
    found = find_tower(keys)
    if found is None:
        raise WeightsError(
            "no SigLIP vision tower found: expected keys such as vision_model." + PATCH
            + " (HF), image_prefix.enc.model." + PATCH + " (MoshiVis PyTorch) or "
            "img_embedder.model." + PATCH + " (MoshiVis MLX)")
    return found


def _count_layers(keys: set[str], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.layer_norm1\.weight")
    found = {int(m.group(1)) for k in keys if (m := rx.fullmatch(k))}
    if found != set(range(len(found))):
        raise WeightsError(f"vision encoder layer indices are not contiguous: {sorted(found)}")
    return len(found)


def check_vision_config(shapes: dict[str, tuple[int, ...]], prefix: str,
                        cfg: SiglipConfig) -> None:
    """The sizes the weights fix must be the config's: else one error naming each one."""
    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in shapes:
            raise WeightsError(f"missing tensor {key!r}")
        return tuple(shapes[key])

    patch = shape(PATCH)
    positions = shape("embeddings.position_embedding.weight")
    fc1 = shape("encoder.layers.0.mlp.fc1.weight") if cfg.num_layers else (cfg.ffn_hidden,)
    found = {
        "dim": patch[0],
        "num_layers": _count_layers(set(shapes), prefix),
        "ffn_hidden": fc1[0],
        "num_tokens (positions)": positions[0],
    }
    wanted = {
        "dim": cfg.dim,
        "num_layers": cfg.num_layers,
        "ffn_hidden": cfg.ffn_hidden,
        "num_tokens (positions)": cfg.num_tokens,
    }
    diffs = [f"{k}: config {v}, weights {found[k]}" for k, v in wanted.items() if v != found[k]]
    if diffs:
        raise WeightsError("the vision weights do not fit the vision config ("
                           + "; ".join(diffs)
                           + "); pass the tower's HF config with --vision-config")


def patch_perm(shape: tuple[int, ...], cfg: SiglipConfig) -> tuple[int, ...] | None:
    """How to reach MLX's [out, kh, kw, in] from the stored patch-conv shape."""
    d, p, c = cfg.dim, cfg.patch_size, cfg.num_channels
    pt, mlx = (d, c, p, p), (d, p, p, c)
    if tuple(shape) == pt:
        return PT_TO_MLX_CONV  # every known layout stores this order when both fit (p == c)
    if tuple(shape) == mlx:
        return None
    raise WeightsError(f"patch convolution has shape {list(shape)}, expected {list(pt)} "
                       f"(PyTorch order) or {list(mlx)} (MLX order)")


def vision_mapping(shapes: dict[str, tuple[int, ...]], prefix: str,
                   cfg: SiglipConfig) -> Mapping:
    """Every tensor of our `SiglipVision` and where it comes from. Source keys outside
    `prefix` belong to other models of the same file and are not listed."""
    entries = []
    for dst, shape in expected_vision_tensors(cfg, None).items():
        m = FUSED.fullmatch(dst)
        if m:  # ours is [q; k; v] in one projection
            third = (shape[0] // 3,) + shape[1:]
            entries += [Entry(dst, f"{prefix}{m[1]}.{p}_proj.{m[2]}", third) for p in "qkv"]
            continue
        src = prefix + rename(RENAMES, dst)
        if dst == "embeddings.patch.weight":
            d, p, c = cfg.dim, cfg.patch_size, cfg.num_channels
            perm = patch_perm(shapes.get(src, (d, c, p, p)), cfg)
            note = "conv axes to MLX order" if perm else None
            entries.append(Entry(dst, src, shape, perm=perm, note=note))
        else:
            entries.append(Entry(dst, src, shape))
    # HF's attention-pooling head (MoshiVis uses the token sequence, not a pooled vector)
    # and the position-id buffer some HF versions save.
    ignored = [k for k in shapes if k.startswith(prefix + "head.")
               or k == prefix + "embeddings.position_ids"]
    return Mapping(entries, ignored)


def tower_shapes(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """The source tensors under the tower's prefix: the ones a mapping must account for."""
    return {k: v for k, v in shapes.items() if k.startswith(prefix)}


def expected_vision_tensors(cfg: SiglipConfig, quant: dict[str, int] | None
                            ) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's vision tensors, from the skeleton (nothing allocated)."""
    return model_tensors(SiglipVision(cfg), QuantSpec(**quant) if quant else None)


def vision_quantization(bundle_quant: QuantSpec | None, keep_float: bool) -> QuantSpec | None:
    """The tower's quantization given the bundle's (see the module docstring)."""
    if bundle_quant is None or keep_float:
        return None
    return QuantSpec(max(8, bundle_quant.bits), bundle_quant.group_size)


def find_vision(source: Source, hf_config: dict[str, Any] | None) -> Found:
    """The SigLIP tower in `source` (any known layout, float or quantized)."""
    prefix, layout = detect_vision_layout(source.keys())
    names = set(tower_shapes(source.shapes(), prefix))
    spec = infer_quant_spec(source, names, prefix + QUANT_ANCHOR,
                            source.info(prefix + PATCH).shape[0])
    view = FloatView(source, names, spec)
    with about(source.label):
        cfg = vision_config_from(hf_config)
        check_vision_config(view.shapes, prefix, cfg)
        mapping = vision_mapping(view.shapes, prefix, cfg)
    check_mapping(mapping, view.shapes, source.label)
    return Found(layout, cfg, mapping, view)


def read_vision_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    cfg = read_json(path, "a JSON object (HF's SiglipVisionConfig)")
    return {**cfg, CONFIG_PATH: str(path)}


def siglip_config_from_hf(d: dict[str, Any]) -> SiglipConfig:
    """From HF's `SiglipVisionConfig` JSON (or a SigLIP / PaliGemma config holding one
    under `vision_config`). Keys it leaves out take HF's defaults; keys we have no use
    for (projection_dim, vision_use_head, ...) are ignored."""
    if isinstance(d.get("vision_config"), dict):
        d = d["vision_config"]
    c = {**HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    act = c["hidden_act"]
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act: unsupported {act!r} "
                         f"(expected one of {', '.join(HF_ACTIVATIONS)})")
    keys = {"dim": "hidden_size", "num_heads": "num_attention_heads",
            "num_layers": "num_hidden_layers", "ffn_hidden": "intermediate_size",
            "norm_eps": "layer_norm_eps", "image_size": "image_size",
            "patch_size": "patch_size", "num_channels": "num_channels"}
    values = {ours: check_value(theirs, c[theirs], float if ours == "norm_eps" else int)
              for ours, theirs in keys.items()}
    return SiglipConfig(ffn=HF_ACTIVATIONS[act], **values)


def vision_config_from(hf_config: dict[str, Any] | None) -> SiglipConfig:
    """The tower's config: HF's SiglipVisionConfig JSON when given, else PaliGemma2-448."""
    if hf_config is None:
        return paligemma2_448()
    try:
        return siglip_config_from_hf(hf_config)
    except (ValueError, TypeError) as e:
        where = hf_config.get(CONFIG_PATH) or "the vision config"
        raise WeightsError(f"{where}: invalid vision config: {e}") from None
