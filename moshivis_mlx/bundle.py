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
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BundleError, WeightsError
from .fileio import atomic_write
from .image import ImageEncoder
from .models.config import ConfigError
from .models.lm import LM, LmConfig
from .models.mimi import Mimi, MimiConfig
from .models.siglip import SiglipConfig, SiglipVision
from .paths import inside
from .quant import QuantSpec, quantize_model
from .safetensors import FLOAT_CODES, TensorInfo, read_header, read_json
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
        cfg = read_json(path, "a JSON object (a bundle's config)")
    except WeightsError as e:
        raise BundleError(str(e)) from None
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version}, this version reads {FORMAT_VERSION}; "
                          f"convert the checkpoint again")
    try:  # read by every opener and report: a bad entry names this file
        QuantSpec.from_dict(cfg.get("quantization"))
    except WeightsError as e:  # QuantSpec says what is wrong with it
        raise BundleError(f"{path}: {e.message}", "convert the checkpoint again") from None
    return cfg


def write_config(bundle: str | Path, cfg: dict[str, Any]) -> None:
    cfg = {"format_version": FORMAT_VERSION, **cfg}
    atomic_write(Path(bundle) / CONFIG_NAME, config_text(cfg))


def config_text(cfg: dict[str, Any]) -> str:
    """config.json's exact text (a dry run sizes it before writing)."""
    return json.dumps(cfg, indent=2) + "\n"


def weight_files(bundle: Path, stem: str) -> list[Path]:
    """`stem.safetensors`, or the shards listed by `stem.safetensors.index.json` (names
    inside the bundle only)."""
    single = bundle / f"{stem}.safetensors"
    index = bundle / f"{stem}.safetensors.index.json"
    if index.exists():
        try:
            weight_map = read_json(index, "a safetensors index").get("weight_map")
        except WeightsError as e:
            raise BundleError(str(e)) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise BundleError(f"{index}: no weight_map (a table of tensor -> file); "
                              f"convert again")
        files = sorted({str(f) if isinstance(f, str) else repr(f) for f in weight_map.values()})
        return [inside(bundle, f, f"{index}: weight_map") for f in files]
    if single.exists():
        return [single]
    raise BundleError(f"{bundle}: no {single.name} (the bundle is incomplete; convert again)")


def read_tables(files: list[Path]) -> dict[str, TensorInfo]:
    """The validated headers of a part's files: every tensor, once."""
    tables: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tables:
                raise BundleError(f"{f}: tensor {name!r} is also in {where[name]}")
            tables[name], where[name] = info, f
    return tables


def _check_tensors(model: nn.Module, tables: dict[str, TensorInfo], what: str) -> None:
    """The stored tensors are exactly the model's, of its shapes, and floats (or MLX's
    packed uint32 where a layer is quantized): checked on the headers, before loading."""
    want = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(want) - set(tables))
    unexpected = sorted(set(tables) - set(want))
    shapes = sorted(f"{k} {list(tables[k].shape)} (expected {list(want[k])})"
                    for k in set(want) & set(tables) if tuple(tables[k].shape) != tuple(want[k]))
    dtypes = sorted(f"{k} {tables[k].dtype_name}" for k in set(want) & set(tables)
                    if tables[k].dtype not in FLOAT_CODES
                    and not (tables[k].dtype == "U32" and k.endswith(".weight")
                             and k[: -len("weight")] + "scales" in tables))
    problems = [f"{label}: {listing(items)}" for label, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("mis-shaped tensors", shapes), ("not float tensors", dtypes)) if items]
    if problems:
        raise BundleError(f"{what}: weights do not match the config: " + " | ".join(problems))


def listing(items: list[str], limit: int = 6, sep: str = ", ") -> str:
    """The first `limit` items and how many more (an error message stays one short line)."""
    head = sep.join(items[:limit])
    return head if len(items) <= limit else f"{head}{sep}... ({len(items) - limit} more)"


def non_finite(arrays: dict[str, mx.array]) -> list[str]:
    """The names of the float arrays holding NaN or infinite values (one evaluation for
    all): a model with any of them speaks noise, so bundles, conversions and adapters
    refuse them."""
    names = [k for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not names:
        return []
    flags = mx.stack([mx.all(mx.isfinite(arrays[k])) for k in names]).tolist()
    return [k for k, ok in zip(names, flags) if not ok]


def check_finite(weights: dict[str, mx.array], what: str) -> None:
    """A `BundleError` naming the tensors of `what` that are not finite."""
    if bad := non_finite(weights):
        raise BundleError(f"{what}: NaN or infinite values in {listing(bad)} (a damaged "
                          f"file); convert the checkpoint again")


def load_weights_into(model: nn.Module, files: list[Path], quantization: dict | None,
                      what: str) -> None:
    """Loads a bundle's tensors (in their stored dtypes) into a freshly built model: the
    headers are validated as a checkpoint's are, and matched to the model, before any
    data is read; the values must be finite."""
    tables = read_tables(files)
    spec = QuantSpec.from_dict(quantization)
    if spec is not None:
        quantize_model(model, spec, lambda path, m: f"{path}.scales" in tables)
    _check_tensors(model, tables, what)
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    check_finite(weights, what)
    model.load_weights(list(weights.items()), strict=True)
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
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise BundleError(f"{bundle}/{CONFIG_NAME}: {e}") from None


# -- will it fit? ----------------------------------------------------------------------------

def machine_memory() -> int:
    """Bytes of memory the models can use (a Mac's GPU shares the RAM); 0: unknown."""
    size = mx.device_info().get("memory_size")
    if isinstance(size, int) and size > 0:
        return size
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(bundle: Path, lm_cfg: LmConfig, dtype: str) -> None:
    """Refuses, before anything is allocated, a model whose weights (every part of the
    bundle, from the headers) and attention caches (from the config) exceed the memory."""
    weights = 0
    for stem in ("model", "mimi", "vision"):
        if (bundle / f"{stem}.safetensors").exists() or \
                (bundle / f"{stem}.safetensors.index.json").exists():
            weights += sum(t.nbytes for t in read_tables(weight_files(bundle, stem)).values())
    itemsize = DTYPES.get(dtype, mx.float32).size
    d = lm_cfg.depformer
    caches = 2 * itemsize * (lm_cfg.num_layers * lm_cfg.context * lm_cfg.dim
                             + d.num_layers * lm_cfg.dep_q * d.dim)
    available = machine_memory()
    if available and weights + caches > available:
        raise BundleError(
            f"{bundle}: the model needs {_gb(weights + caches)} ({_gb(weights)} of weights, "
            f"{_gb(caches)} of attention cache for lm.context {lm_cfg.context}) and this "
            f"machine has {_gb(available)}",
            "use a smaller quantization (-q q4), or a bundle with a smaller lm.context")


def load_lm(bundle: str | Path) -> LM:
    """The language model of a bundle, quantized or not, ready for `Generator`."""
    bundle = Path(bundle)
    cfg, lm_cfg = _model_config(bundle, "lm", LmConfig.from_dict, "language model",
                                "convert one with moshivis-convert --moshi-weights")
    check_fits(bundle, lm_cfg, cfg.get("dtype") or "bfloat16")
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
