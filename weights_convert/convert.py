"""Kyutai checkpoints -> a moshivis-mlx bundle directory.

Tensors are read lazily and converted one at a time (rows of fused tensors split, norm
gains reshaped, cast, optionally quantized), and the bundle is written into a temporary
directory that is renamed into place only when complete: an interrupted conversion leaves
nothing behind, and an existing bundle is only replaced with `force`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moshivis_mlx.bundle import DTYPES, LM_WEIGHTS, MIMI_WEIGHTS, quantizable, write_config
from moshivis_mlx.generate import DEFAULT_XA_START
from moshivis_mlx.models.lm import LM, LmConfig
from moshivis_mlx.models.mimi import MimiConfig

from .lm_layout import Entry, Mapping, check_mapping, detect_lm_layout, infer_lm_config, lm_mapping
from .mimi_layout import converted_mimi, plan_mimi
from .safetensors_io import WeightsError, read_header
from .vision_convert import (
    VisionPlan,
    has_vision_tower,
    plan_vision,
    read_vision_config,
    vision_quantization,
    write_vision,
)


@dataclass
class Quantization:
    bits: int = 8
    group_size: int = 64

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "group_size": self.group_size}


@dataclass
class ConvertOptions:
    out: Path
    moshi_weights: Path | None = None
    kyutai_config: Path | None = None
    mimi_weights: Path | None = None
    mimi_config: Path | None = None
    """Kyutai's Mimi config (JSON); default: the released Mimi."""
    dtype: str = "bfloat16"
    quantization: Quantization | None = field(default_factory=Quantization)
    force: bool = False
    # The SigLIP image encoder (default: the tower inside --moshi-weights, if any).
    vision_weights: Path | None = None
    vision_config: Path | None = None
    vision_float: bool = False


def read_kyutai_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    # Kyutai's repos nest the model kwargs under lm_kwargs in some versions.
    return {**cfg, **cfg.get("lm_kwargs", {})}


def generation_defaults(kyutai_config: dict[str, Any] | None) -> dict[str, Any]:
    """Kyutai's sampling defaults; xa_start from the config when it gives a step number."""
    xa_start = (kyutai_config or {}).get("xa_start")
    return {
        "text_temperature": 0.7,
        "text_top_k": 25,
        "audio_temperature": 0.8,
        "audio_top_k": 250,
        "xa_start": xa_start if isinstance(xa_start, int) else DEFAULT_XA_START,
    }


def quantized_paths(model: nn.Module, group_size: int) -> set[str]:
    """Module paths (e.g. 'transformer.layers.0.ffn.linear_in') that get quantized."""
    return {path for path, m in model.named_modules() if quantizable(m, group_size)}


def convert_tensor(entry: Entry, source: mx.array, dtype: mx.Dtype) -> mx.array:
    a = source
    if entry.rows is not None:
        a = a[entry.rows[0]: entry.rows[1]]
    return a.reshape(entry.shape).astype(dtype)


def converted_lm(mapping: Mapping, sources: dict[str, mx.array], cfg: LmConfig,
                 dtype: mx.Dtype, quant: Quantization | None) -> Iterator[tuple[str, mx.array]]:
    """Destination tensors one by one, lazily (nothing is read until evaluated)."""
    qpaths = quantized_paths(LM(cfg), quant.group_size) if quant else set()
    for e in mapping.entries:
        a = convert_tensor(e, sources[e.src], dtype)
        module = e.dst.rsplit(".", 1)[0]
        if e.dst.endswith(".weight") and module in qpaths:
            w, scales, biases = mx.quantize(a, group_size=quant.group_size, bits=quant.bits)
            yield e.dst, w
            yield f"{module}.scales", scales
            yield f"{module}.biases", biases
        else:
            yield e.dst, a


def expected_lm_tensors(cfg: LmConfig, quant: Quantization | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's LM tensors, from the model skeleton (nothing allocated)."""
    model = LM(cfg)
    if quant:
        from moshivis_mlx.bundle import quantize_model
        quantize_model(model, quant.bits, quant.group_size)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed to `out` on success, removed otherwise."""
    out = Path(out)
    if out.exists() and not force:
        raise WeightsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plan_lm(weights: Path, kyutai_config: dict[str, Any] | None) -> tuple[LmConfig, Mapping, str]:
    shapes = {k: v.shape for k, v in read_header(weights).items()}
    layout = detect_lm_layout(shapes)
    cfg = infer_lm_config(shapes, layout, kyutai_config)
    mapping = lm_mapping(shapes, layout, cfg)
    check_mapping(mapping, shapes, str(weights))
    return cfg, mapping, layout


def write_lm(out_dir: Path, opts: ConvertOptions, kc: dict[str, Any] | None, cfg: LmConfig,
             mapping: Mapping, layout: str) -> dict[str, Any]:
    """Writes the LM tensors; returns the LM's part of config.json."""
    dtype = DTYPES[opts.dtype]
    sources = mx.load(str(opts.moshi_weights))
    tensors = dict(converted_lm(mapping, sources, cfg, dtype, opts.quantization))
    mx.save_safetensors(str(out_dir / LM_WEIGHTS), tensors)
    return {
        "model_type": "moshivis" if cfg.cross_attention else "moshi",
        "lm": cfg.to_dict(),
        "dtype": opts.dtype,
        "quantization": opts.quantization.to_dict() if opts.quantization else None,
        "generation": generation_defaults(kc),
        "source": {"layout": layout, "lm_weights": Path(opts.moshi_weights).name},
    }


def write_mimi(out_dir: Path, weights: Path, cfg: MimiConfig, mapping: Mapping) -> dict[str, Any]:
    """Writes mimi.safetensors, always float32 and never quantized (the codec is small and its
    numerics matter); returns the config's `mimi` section."""
    tensors = converted_mimi(mapping, mx.load(str(weights)), str(weights))
    mx.save_safetensors(str(out_dir / MIMI_WEIGHTS), tensors)
    return cfg.to_dict()


def convert(opts: ConvertOptions) -> Path:
    """Writes the bundle; returns its path."""
    if opts.moshi_weights is None and opts.mimi_weights is None and opts.vision_weights is None:
        raise WeightsError("nothing to convert: give --moshi-weights, --mimi-weights "
                           "and/or --vision-weights")
    if opts.dtype not in DTYPES:
        raise WeightsError(f"unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})")
    # Every part is planned from the headers first: bad inputs fail before anything is written.
    kc = read_kyutai_config(opts.kyutai_config)
    lm = plan_lm(Path(opts.moshi_weights), kc) if opts.moshi_weights is not None else None
    mimi = plan_mimi(Path(opts.mimi_weights), opts.mimi_config) if opts.mimi_weights else None
    vision = plan_bundle_vision(opts)
    if lm is not None and vision is not None and lm[0].cross_attention \
            and lm[0].image_dim != vision.cfg.dim:
        raise WeightsError(f"the language model takes {lm[0].image_dim}-wide image tokens, "
                           f"the vision tower makes {vision.cfg.dim}")
    with staging_dir(opts.out, opts.force) as tmp:
        config: dict[str, Any] = {}
        if lm is not None:
            config.update(write_lm(tmp, opts, kc, *lm))
        if mimi is not None:
            config["mimi"] = write_mimi(tmp, Path(opts.mimi_weights), *mimi)
            config.setdefault("source", {})["mimi_weights"] = Path(opts.mimi_weights).name
        if vision is not None:
            quant = opts.quantization.to_dict() if opts.quantization else None
            config["vision"] = write_vision(tmp, vision, opts.dtype, DTYPES[opts.dtype],
                                            vision_quantization(quant, opts.vision_float))
        write_config(tmp, config)
    return Path(opts.out)


# -- the SigLIP image encoder (see vision_convert) ---------------------------------------

def plan_bundle_vision(opts: ConvertOptions) -> VisionPlan | None:
    """The tower to convert: --vision-weights, else the one stored with MoshiVis' LM."""
    source = opts.vision_weights
    if source is None and opts.moshi_weights is not None:
        if has_vision_tower(Path(opts.moshi_weights)):
            source = Path(opts.moshi_weights)
    if source is None:
        if opts.vision_config is not None:
            raise WeightsError("--vision-config given but no vision tower to convert "
                               "(give --vision-weights)")
        return None
    return plan_vision(Path(source), read_vision_config(opts.vision_config))
