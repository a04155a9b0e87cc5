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
        m = re.search(r"(depformer\.(?:slices\.\d+\.transformer\.)?layers|transformer\.layers)\.(\d+)\.", k)
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


def tiny_moshivis_pt_tensors(duplicate_shared: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
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
