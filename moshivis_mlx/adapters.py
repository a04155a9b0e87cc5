"""MoshiVis' adapters as a small artefact of their own, and putting them on a bundle's model.

The adapters are the parts MoshiVis adds to Moshi, the only ones `moshivis-train` trains:

    xa.q_proj, xa.kv_proj, xa.out_proj          the cross-attention, shared by every layer
    transformer.layers.{i}.xa_gate.*           each layer's gate MLP
    transformer.layers.{i}.norm_cross          each layer's norm before the cross-attention
    image_prefix.proj_xa, image_prefix.norm_xa  SigLIP tokens -> the model's width

A trained set is a directory:

    adapters.safetensors    those tensors, float (never quantized), our names
    adapter_config.json     what they fit: the backbone's shape, and how they were trained

It goes on top of any bundle whose backbone has that shape (`apply_adapters`): the app,
the benchmark and moshivis-eval take `--adapters DIR`, and `moshivis-convert --bundle B
--adapters DIR` writes a bundle with them merged in. A set trained for another shape is
refused with one line saying which dimension differs.

A set is validated when it is read, as a bundle's weights are: the config (its format,
the backbone's dimensions as positive integers), the tensors' header (float dtypes only,
a file that is whole), and every value finite and within `MAX_ADAPTER_VALUE`; the app,
the benchmark, moshivis-eval, the merge into a bundle and a resumed training all read
through `read_adapters`, so none of them runs on a damaged or diverged set.

In a quantized bundle the adapters are quantized like every other layer; putting a set
on such a model makes those few layers float again (`dequantize_adapters`), in the
model's activation dtype.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .errors import WeightsError
from .fileio import atomic_write
from .models.lm import LM, LmConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "moshivis-adapters"
FORMAT_VERSION = 1

ADAPTER_MODULE = re.compile(
    r"(xa|image_prefix|transformer\.layers\.\d+\.(xa_gate|norm_cross))(\.|$)")
"""Parameter or module paths that belong to the adapters."""

SHAPE_KEYS = ("dim", "num_heads", "num_layers", "image_dim", "xa_gate_hidden")
"""The backbone dimensions a set of adapters is tied to."""

MAX_ADAPTER_VALUE = 1e4
"""The largest magnitude a value of a usable set holds. Trained adapters hold values of
order 1 (AdamW moves each by at most the learning rate a step); one beyond this is a
damaged or diverged set, which would overflow the model's bfloat16 activations into
noise."""


class AdapterError(WeightsError):
    """Adapters that cannot be read, or do not fit the model; the message says which."""


def is_adapter(path: str) -> bool:
    """Whether a parameter or module path (e.g. 'xa.q_proj.weight') is an adapter's."""
    return ADAPTER_MODULE.match(path) is not None


def adapter_parameters(lm: LM) -> dict[str, mx.array]:
    """The adapters' parameters of `lm`, by name (quantized layers as their packed parts)."""
    return {k: v for k, v in tree_flatten(lm.parameters()) if is_adapter(k)}


def require_cross_attention(cfg: LmConfig, where: str) -> None:
    if not cfg.cross_attention:
        raise AdapterError(f"the model in {where} is plain Moshi (no cross-attention): it has "
                           f"no adapters", "use a MoshiVis bundle")


def backbone_shape(cfg: LmConfig) -> dict[str, int]:
    return {k: getattr(cfg, k) for k in SHAPE_KEYS}


def dequantize_adapters(lm: LM, dtype: mx.Dtype | None = None) -> list[str]:
    """Makes every quantized adapter layer a float `nn.Linear` with the dequantized weights
    (in `dtype`, default the model's); returns their paths. The rest stays as it is."""
    dtype = dtype or lm.dtype
    swaps = []
    for path, module in lm.named_modules():
        if not (is_adapter(path) and isinstance(module, nn.QuantizedLinear)):
            continue
        w = mx.dequantize(module.weight, module.scales, module.biases,
                          group_size=module.group_size, bits=module.bits)
        out_dims, in_dims = w.shape
        linear = nn.Linear(in_dims, out_dims, bias="bias" in module)
        linear.weight = w.astype(dtype)
        if "bias" in module:
            linear.bias = module.bias.astype(dtype)
        swaps.append((path, linear))
    if swaps:
        lm.update_modules(tree_unflatten(swaps))
    return [p for p, _ in swaps]


@dataclass
class Adapters:
    """A trained set: its tensors (float32 on load) and its config."""

    weights: dict[str, mx.array]
    backbone: dict[str, int]
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "the adapters"

    def check_fits(self, cfg: LmConfig, where: str = "the bundle") -> None:
        """One line saying what differs, if the backbone is not the one they were trained for."""
        require_cross_attention(cfg, where)
        ours = backbone_shape(cfg)
        differ = [f"{k} {self.backbone.get(k)} (the model's: {ours[k]})" for k in SHAPE_KEYS
                  if self.backbone.get(k) != ours[k]]
        if differ:
            raise AdapterError(f"{self.label}: trained for another backbone shape: "
                               f"{', '.join(differ)}", f"use adapters trained on {where}")

    def check_tensors(self, expected: dict[str, tuple[int, ...]]) -> None:
        """The tensors are exactly the adapters' names and float shapes of the model."""
        missing = sorted(set(expected) - set(self.weights))
        extra = sorted(set(self.weights) - set(expected))
        wrong = [f"{k} {list(self.weights[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(set(expected) & set(self.weights))
                 if tuple(self.weights[k].shape) != tuple(expected[k])]
        problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                   ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + wrong[:3]
        if problems:
            raise AdapterError(f"{self.label}/{ADAPTER_WEIGHTS}: does not fit the model: "
                               f"{'; '.join(problems)}")


def expected_adapter_shapes(cfg: LmConfig) -> dict[str, tuple[int, ...]]:
    """The adapters' tensor names and float shapes for `cfg` (nothing allocated)."""
    skeleton = LM(cfg)  # lazily initialised: no weight is computed
    shapes = tree_map(lambda a: tuple(a.shape), skeleton.parameters())
    return {k: v for k, v in tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
            if is_adapter(k)}


def write_adapters(out: str | Path, weights: dict[str, mx.array], cfg: LmConfig,
                   training: dict[str, Any] | None = None) -> Path:
    """Writes a set into the directory `out` (created), each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = [k for k in weights if not is_adapter(k)]
    if bad:
        raise ValueError(f"not adapter tensors: {', '.join(bad[:3])}")
    check_values(weights, str(out))
    save_safetensors_atomic(out / ADAPTER_WEIGHTS, weights)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": backbone_shape(cfg),
           "tensors": len(weights), "parameters": int(sum(v.size for v in weights.values())),
           "training": training or {}}
    atomic_write(out / ADAPTER_CONFIG, json.dumps(doc, indent=2) + "\n")
    return out


def check_values(weights: dict[str, mx.array], where: str) -> None:
    """Every value finite (`bundle.non_finite`) and within `MAX_ADAPTER_VALUE`, or one
    line naming the tensors."""
    from .bundle import listing, non_finite

    names = sorted(weights)
    if not names:
        return
    peaks = mx.stack([mx.max(mx.abs(weights[k].astype(mx.float32))) for k in names]).tolist()
    nan = set(non_finite(weights))
    bad = [f"{k} ({'NaN or inf' if k in nan else f'{peak:.3g}'})"
           for k, peak in zip(names, peaks) if k in nan or not peak <= MAX_ADAPTER_VALUE]
    if bad:
        raise AdapterError(f"{where}: NaN, infinite or absurd values (beyond "
                           f"{MAX_ADAPTER_VALUE:g} in magnitude) in {listing(bad, 3)}: a "
                           f"damaged or diverged set", "use the adapters of an earlier checkpoint")


def _check_config(doc: dict, cfg_path: Path) -> dict[str, int]:
    """The config's format and backbone shape (positive integers), or one line."""
    if doc.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: not a moshivis-adapters config (no \"format\": "
                           f"\"{FORMAT}\")")
    version = doc.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise AdapterError(f"{cfg_path}: adapters format {version!r}, this version reads "
                           f"{FORMAT_VERSION}")
    backbone = doc.get("backbone")
    if not isinstance(backbone, dict) or set(SHAPE_KEYS) - set(backbone):
        raise AdapterError(f"{cfg_path}: no backbone shape ({', '.join(SHAPE_KEYS)})")
    wrong = [f"{k} {backbone[k]!r}" for k in SHAPE_KEYS
             if isinstance(backbone[k], bool) or not isinstance(backbone[k], int)
             or not 0 < backbone[k] < 1 << 31]
    if wrong:
        raise AdapterError(f"{cfg_path}: backbone dimensions must be positive integers, got "
                           f"{', '.join(wrong)}")
    training = doc.get("training")
    if training is not None and not isinstance(training, dict):
        raise AdapterError(f"{cfg_path}: \"training\" must be an object, got "
                           f"{type(training).__name__}")
    return {k: backbone[k] for k in SHAPE_KEYS}


def read_adapters(path: str | Path, what: str = "--adapters") -> Adapters:
    """A set written by `write_adapters` (or by moshivis-train), validated as a bundle's
    weights are (see the module's docstring); `what` names it in messages."""
    from .safetensors import FLOAT_CODES, read_header, read_json

    path = Path(path).expanduser()
    if not path.is_dir():
        why = "no such directory" if not path.exists() else "not a directory"
        raise AdapterError(f"{what} {path}: {why}",
                           "give the directory moshivis-train wrote (OUT/adapters)")
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"{path}: no {p.name}; is this a moshivis-train adapters "
                               f"directory?")
    try:
        doc = read_json(cfg_path, "a moshivis-adapters config")
        backbone = _check_config(doc, cfg_path)
        table = read_header(w_path)
    except AdapterError:
        raise
    except WeightsError as e:
        raise AdapterError(str(e)) from None
    from .bundle import listing

    not_float = [f"{k} {t.dtype_name}" for k, t in sorted(table.items())
                 if t.dtype not in FLOAT_CODES]
    if not_float:
        raise AdapterError(f"{w_path}: adapters are float tensors, got {listing(not_float, 3)}")
    try:
        weights = mx.load(str(w_path))
    except Exception as e:  # MLX raises RuntimeError / ValueError for a broken file
        raise AdapterError(f"{w_path}: not a readable safetensors file ({e})") from None
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    check_values(weights, str(w_path))
    return Adapters(weights, backbone, doc.get("training") or {}, path)


def apply_adapters(lm: LM, adapters: Adapters | str | Path, where: str = "the bundle") -> None:
    """Puts a trained set on `lm` in place: the adapter layers become float (the model's
    activation dtype) and take the set's values. Refused, with one line, if they do not fit."""
    if not isinstance(adapters, Adapters):
        adapters = read_adapters(adapters)
    adapters.check_fits(lm.cfg, where)
    adapters.check_tensors(expected_adapter_shapes(lm.cfg))
    dequantize_adapters(lm)
    dtype = lm.dtype
    lm.load_weights([(k, v.astype(dtype)) for k, v in adapters.weights.items()], strict=False)
    mx.eval(lm.parameters())


# -- atomic files ------------------------------------------------------------------------------

def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array],
                            metadata: dict[str, str] | None = None) -> None:
    """`mx.save_safetensors` into a temporary file renamed into place: a reader (or a
    resumed run after a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
