"""The SigLIP tower of a bundle: plan (layout, config, mapping) and write `vision.safetensors`.

Quantization: the tower follows the bundle's quantization, but never below 8 bits. It runs
once per image, so 4 bits would buy no speed worth having and cost accuracy that every
later step sees through the cross-attention; 8 bits roughly halves its memory (0.8 GB in
bfloat16). Layers whose input width the group size does not divide stay float: with the
PaliGemma2 tower that is each MLP's output projection (4304 inputs) and, always, the patch
convolution and the norms. `--vision-float` keeps the whole tower in the bundle's dtype,
as Kyutai's own MLX checkpoints do.

A quantized source tower (one of our bundles; Kyutai's quantizer can also quantize it) is
dequantized, or copied packed when it already has the target's bits and group size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from moshivis_mlx.models.siglip import SiglipConfig, SiglipVision
from moshivis_mlx.quant import QuantSpec, quantizable, quantize_model

from .lm_layout import Entry, Mapping, check_mapping
from .plan import Part, entry_jobs
from .safetensors_io import WeightsError, read_json_config
from .source import FloatView, Source, infer_quant_spec
from .vision_layout import (
    PATCH,
    check_vision_config,
    detect_vision_layout,
    find_tower,
    tower_shapes,
    vision_config_from,
    vision_mapping,
)

BUNDLE = "bundle"
# The weight that tells how a quantized tower is stored (its input width is the patch
# convolution's output width, which is never quantized).
QUANT_ANCHOR = "encoder.layers.0.self_attn.q_proj.weight"


@dataclass
class VisionPlan:
    source: Source
    layout: str
    prefix: str
    cfg: SiglipConfig
    mapping: Mapping
    view: FloatView

    @property
    def weights(self) -> str:
        return self.source.label


def read_vision_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return read_json_config(path, "a JSON object (HF's SiglipVisionConfig)")


def has_vision_tower(source: Source) -> bool:
    return find_tower(source.keys()) is not None


def plan_vision(source: Source, hf_config: dict[str, Any] | None) -> VisionPlan:
    """The tower in `source` (any known layout, float or quantized): config and mapping,
    checked against the header (every tower tensor used, every shape right)."""
    keys = source.keys()
    prefix, layout = detect_vision_layout(keys)
    names = set(tower_shapes(source.shapes(), prefix))
    patch = source.info(prefix + PATCH).shape
    spec = infer_quant_spec(source, names, prefix + QUANT_ANCHOR, patch[0])
    view = FloatView(source, names, spec)
    try:
        cfg = vision_config_from(hf_config)
        check_vision_config(view.shapes, prefix, cfg)
        mapping = vision_mapping(view.shapes, prefix, cfg)
    except WeightsError as e:
        raise WeightsError(f"{source.label}: {e}") from None
    check_mapping(mapping, view.shapes, source.label)
    return VisionPlan(source, layout, prefix, cfg, mapping, view)


def plan_bundle_vision(source: Source, cfg: SiglipConfig, quant: dict[str, int] | None
                       ) -> VisionPlan:
    """The tower of one of our bundles: our names already, maybe quantized."""
    spec = QuantSpec(**quant) if quant else None
    view = FloatView(source, source.keys(), spec)
    names = expected_vision_tensors(cfg, None)
    mapping = Mapping([Entry(k, k, v) for k, v in names.items()], [])
    check_mapping(mapping, view.shapes, source.label)
    return VisionPlan(source, BUNDLE, "", cfg, mapping, view)


def vision_quantization(bundle_quant: dict[str, int] | None, keep_float: bool
                        ) -> dict[str, int] | None:
    """The tower's quantization given the bundle's (see the module docstring)."""
    if bundle_quant is None or keep_float:
        return None
    return {"bits": max(8, bundle_quant["bits"]), "group_size": bundle_quant["group_size"]}


def vision_part(plan: VisionPlan, dtype: mx.Dtype, quant: dict[str, int] | None) -> Part:
    """The jobs writing `vision.safetensors`."""
    spec = QuantSpec(**quant) if quant else None
    qpaths: set[str] = set()
    if spec:
        qpaths = {path for path, m in SiglipVision(plan.cfg).named_modules()
                  if quantizable(m, spec.group_size)}
    jobs = entry_jobs(plan.mapping.entries, plan.view, dtype, spec, qpaths)
    dropped = {k: "not used (HF's pooling head, position ids)" for k in plan.mapping.ignored}
    return Part("vision", "image encoder", jobs, plan.view, dropped=dropped)


def expected_vision_tensors(cfg: SiglipConfig, quant: dict[str, int] | None
                            ) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's vision tensors, from the skeleton (nothing allocated)."""
    model = SiglipVision(cfg)
    if quant:
        quantize_model(model, QuantSpec(quant["bits"], quant["group_size"]))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def vision_section(plan: VisionPlan, dtype_name: str, quant: dict[str, int] | None
                   ) -> dict[str, Any]:
    """The `vision` section of config.json."""
    return {
        "siglip": plan.cfg.to_dict(),
        "dtype": dtype_name,
        "quantization": quant,
        "source": {"layout": plan.layout, "weights": Path(plan.weights).name},
    }
