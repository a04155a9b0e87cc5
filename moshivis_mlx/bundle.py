"""Our on-disk format: a bundle directory.

    config.json            every hyper-parameter, quantization, dtype, generation defaults
    model.safetensors      the language model (or model-0000i-of-0000n.safetensors + index)
    vision.safetensors     the SigLIP image encoder (MoshiVis)
    mimi.safetensors       the Mimi codec
    tokenizer.model        SentencePiece text tokenizer

A quantized bundle stores `weight`, `scales` and `biases` of each quantized layer; the model
skeleton is quantized before loading, so the float model is never materialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BundleError
from .image import ImageEncoder
from .models.lm import LM, LmConfig
from .models.mimi import Mimi, MimiConfig
from .models.siglip import SiglipConfig, SiglipVision
from .quant import QuantSpec, quantize_model
from .sampling import GenerationConfig

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
LM_WEIGHTS = "model.safetensors"
MIMI_WEIGHTS = "mimi.safetensors"
VISION_WEIGHTS = "vision.safetensors"

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def read_config(bundle: str | Path) -> dict[str, Any]:
    bundle = Path(bundle)
    path = bundle / CONFIG_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory (make one with moshivis-convert)")
    if not path.exists():
        raise BundleError(f"{bundle}: no {CONFIG_NAME}; is this a moshivis-mlx bundle? "
                          f"(make one with moshivis-convert)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version}, this version reads {FORMAT_VERSION}; "
                          f"convert the checkpoint again")
    return cfg


def write_config(bundle: str | Path, cfg: dict[str, Any]) -> None:
    cfg = {"format_version": FORMAT_VERSION, **cfg}
    (Path(bundle) / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def weight_files(bundle: Path, stem: str) -> list[Path]:
    """`stem.safetensors`, or the shards listed by `stem.safetensors.index.json`."""
    single = bundle / f"{stem}.safetensors"
    index = bundle / f"{stem}.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [bundle / f for f in sorted(set(weight_map.values()))]
    if single.exists():
        return [single]
    raise BundleError(f"{bundle}: no {single.name} (the bundle is incomplete; convert again)")


def load_weights_into(model: nn.Module, files: list[Path], quantization: dict | None,
                      what: str) -> None:
    """Loads a bundle's tensors (in their stored dtypes) into a freshly built model."""
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    spec = QuantSpec.from_dict(quantization)
    if spec is not None:
        quantize_model(model, spec, lambda path, m: f"{path}.scales" in weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{what}: weights do not match the config: {e}") from None
    mx.eval(model.parameters())


def _model_config(bundle: Path, section: str, parse: Callable[[dict], Any], what: str,
                  hint: str, required: bool = True) -> tuple[dict[str, Any], Any]:
    """A model's section of config.json and its parsed config, or a BundleError saying why."""
    cfg = read_config(bundle)
    if not cfg.get(section):
        if not required:
            return cfg, None
        raise BundleError(f"{bundle}: the bundle holds no {what} ({hint})")
    try:
        return cfg, parse(cfg[section], f"{section}.")
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{bundle}/{CONFIG_NAME}: {e}") from None


def load_lm(bundle: str | Path) -> LM:
    """The language model of a bundle, quantized or not, ready for `Generator`."""
    bundle = Path(bundle)
    cfg, lm_cfg = _model_config(bundle, "lm", LmConfig.from_dict, "language model",
                                "convert one with moshivis-convert --moshi-weights")
    lm = LM(lm_cfg)
    load_weights_into(lm, weight_files(bundle, "model"), cfg.get("quantization"),
                      f"{bundle}/{LM_WEIGHTS}")
    return lm


def save_lm(lm: LM, bundle: str | Path, quantization: dict | None = None,
            extra_config: dict[str, Any] | None = None) -> None:
    """Writes an in-memory LM as a bundle (tests, the demo model). Its config is merged
    into an existing config.json, so other parts of the bundle are kept."""
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(bundle / LM_WEIGHTS), dict(tree_flatten(lm.parameters())))
    cfg = read_config(bundle) if (bundle / CONFIG_NAME).exists() else {}
    cfg.pop("format_version", None)
    dtype = next(k for k, v in DTYPES.items() if v == lm.dtype)
    cfg.update({"model_type": "moshivis" if lm.cfg.cross_attention else "moshi",
                "lm": lm.cfg.to_dict(), "dtype": dtype, "quantization": quantization})
    cfg.update(extra_config or {})
    write_config(bundle, cfg)


def load_mimi(bundle: str | Path, num_codebooks: int = 8) -> Mimi:
    """The bundle's Mimi codec (always float32); `encode` gives `num_codebooks` codes a frame."""
    bundle = Path(bundle)
    _, mimi_cfg = _model_config(bundle, "mimi", MimiConfig.from_dict, "Mimi codec",
                                "convert one with moshivis-convert --mimi-weights")
    mimi = Mimi(mimi_cfg, num_codebooks=num_codebooks)
    load_weights_into(mimi, weight_files(bundle, "mimi"), None, f"{bundle}/{MIMI_WEIGHTS}")
    return mimi


def load_vision(bundle: str | Path) -> ImageEncoder:
    """The SigLIP image encoder of a bundle, with its preprocessing.

    `config.json` describes it under `vision`: `siglip` (the `SiglipConfig`) and its own
    `quantization` (None: float), which may differ from the language model's.
    """
    bundle = Path(bundle)
    def parse(v: Any, where: str) -> SiglipConfig:
        if not isinstance(v, dict) or "siglip" not in v:
            raise ValueError(f"{where}siglip: missing")
        return SiglipConfig.from_dict(v["siglip"], where + "siglip.")

    cfg, siglip = _model_config(bundle, "vision", parse,
                                "image encoder", "add one with moshivis-convert --vision-weights")
    model = SiglipVision(siglip)
    load_weights_into(model, weight_files(bundle, "vision"), cfg["vision"].get("quantization"),
                      f"{bundle}/{VISION_WEIGHTS}")
    return ImageEncoder(model)


def load_generation(bundle: str | Path) -> GenerationConfig:
    """The bundle's sampling defaults (Kyutai's where it stores none)."""
    _, gen = _model_config(Path(bundle), "generation", GenerationConfig.from_dict,
                           "generation settings", "", required=False)
    return gen or GenerationConfig()
