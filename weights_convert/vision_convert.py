"""The SigLIP tower of a bundle: plan (layout, config, mapping) and write `vision.safetensors`.

Quantization: the tower follows the bundle's quantization, but never below 8 bits. It runs
once per image, so 4 bits would buy no speed worth having and cost accuracy that every
later step sees through the cross-attention; 8 bits roughly halves its memory (0.8 GB in
bfloat16). Layers whose input width the group size does not divide stay float: with the
PaliGemma2 tower that is each MLP's output projection (4304 inputs) and, always, the patch
convolution and the norms. `--vision-float` keeps the whole tower in the bundle's dtype,
as Kyutai's own MLX checkpoints do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from moshivis_mlx.bundle import VISION_WEIGHTS, quantizable, quantize_model
from moshivis_mlx.models.siglip import SiglipConfig, SiglipVision

from .lm_layout import Entry, Mapping, check_mapping
from .safetensors_io import WeightsError, read_header
from .vision_layout import (
    VisionEntry,
    check_vision_config,
    detect_vision_layout,
    find_tower,
    tower_shapes,
    vision_config_from,
    vision_mapping,
)


@dataclass
class VisionPlan:
    weights: Path
    layout: str
    prefix: str
    cfg: SiglipConfig
    mapping: Mapping


def read_vision_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: expected a JSON object (HF's SiglipVisionConfig)")
    return cfg


def has_vision_tower(weights: Path) -> bool:
    return find_tower(read_header(weights)) is not None


def plan_vision(weights: Path, hf_config: dict[str, Any] | None) -> VisionPlan:
    shapes = {k: v.shape for k, v in read_header(weights).items()}
    prefix, layout = detect_vision_layout(shapes)
    if any(k.startswith(prefix) and k.endswith(".scales") for k in shapes):
        raise WeightsError(f"{weights}: the vision tower is quantized; convert from a float "
                           f"(bfloat16 or float32) checkpoint")
    cfg = vision_config_from(hf_config)
    try:
        check_vision_config(shapes, prefix, cfg)
        mapping = vision_mapping(shapes, prefix, cfg)
    except WeightsError as e:
        raise WeightsError(f"{weights}: {e}") from None
    check_mapping(mapping, tower_shapes(shapes, prefix), str(weights))
    return VisionPlan(Path(weights), layout, prefix, cfg, mapping)


def vision_quantization(bundle_quant: dict[str, int] | None, keep_float: bool
                        ) -> dict[str, int] | None:
    """The tower's quantization given the bundle's (see the module docstring)."""
    if bundle_quant is None or keep_float:
        return None
    return {"bits": max(8, bundle_quant["bits"]), "group_size": bundle_quant["group_size"]}


def _source(entry: Entry, sources: dict[str, mx.array]) -> mx.array:
    a = sources[entry.src]
    if entry.rows is not None:
        a = a[entry.rows[0]: entry.rows[1]]
    if isinstance(entry, VisionEntry) and entry.perm is not None:
        a = a.transpose(entry.perm)
    return a.reshape(entry.shape)


def converted_vision(plan: VisionPlan, sources: dict[str, mx.array], dtype: mx.Dtype,
                     quant: dict[str, int] | None) -> Iterator[tuple[str, mx.array]]:
    """Destination tensors one by one, lazily; entries sharing a destination are concatenated."""
    groups: dict[str, list[Entry]] = {}
    for e in plan.mapping.entries:
        groups.setdefault(e.dst, []).append(e)
    qpaths: set[str] = set()
    if quant:
        qpaths = {path for path, m in SiglipVision(plan.cfg).named_modules()
                  if quantizable(m, quant["group_size"])}
    for dst, entries in groups.items():
        parts = [_source(e, sources) for e in entries]
        a = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).astype(dtype)
        module = dst.rsplit(".", 1)[0]
        if dst.endswith(".weight") and module in qpaths:
            w, scales, biases = mx.quantize(a, group_size=quant["group_size"], bits=quant["bits"])
            yield dst, w
            yield f"{module}.scales", scales
            yield f"{module}.biases", biases
        else:
            yield dst, a


def expected_vision_tensors(cfg: SiglipConfig, quant: dict[str, int] | None
                            ) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's vision tensors, from the skeleton (nothing allocated)."""
    model = SiglipVision(cfg)
    if quant:
        quantize_model(model, quant["bits"], quant["group_size"])
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def write_vision(out_dir: Path, plan: VisionPlan, dtype_name: str, dtype: mx.Dtype,
                 quant: dict[str, int] | None) -> dict[str, Any]:
    """Writes `vision.safetensors` into `out_dir`; returns the `vision` section of config.json."""
    sources = mx.load(str(plan.weights))
    tensors = dict(converted_vision(plan, sources, dtype, quant))
    mx.save_safetensors(str(out_dir / VISION_WEIGHTS), tensors)
    return {
        "siglip": plan.cfg.to_dict(),
        "dtype": dtype_name,
        "quantization": quant,
        "source": {"layout": plan.layout, "weights": plan.weights.name},
    }
