"""Blockwise affine quantization: the presets every tool uses, and quantizing a model.

`q8` is 8 bits with one scale and bias per 64 weights, `q4` 4 bits per 32 (Kyutai's own
choice for its 4-bit MLX files: at 4 bits the smaller group keeps the error in check for
1/16 more memory). The five commands (`-q q4` in each) and the docs all read this table, so
the q4 that is benchmarked is the q4 that is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from .errors import UsageError, WeightsError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """MLX affine quantization: `bits` per weight, one scale and bias per `group_size`."""

    bits: int = 8
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise WeightsError(f"quantization bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
            raise WeightsError(f"quantization group size must be one of {GROUP_SIZES}, got "
                               f"{self.group_size!r}")

    @property
    def label(self) -> str:
        return f"q{self.bits}/g{self.group_size}"

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: object) -> QuantSpec | None:
        """A config's `quantization` entry (None: not quantized)."""
        if d is None:
            return None
        if not isinstance(d, dict) or set(d) - {"bits", "group_size"} or "bits" not in d:
            raise WeightsError(f"quantization must be {{'bits': ..., 'group_size': ...}} or "
                               f"null, got {d!r}")
        return cls(d["bits"], d.get("group_size", 64))


PRESETS: dict[str, QuantSpec | None] = {
    "bf16": None,
    "q8": QuantSpec(8, 64),
    "q4": QuantSpec(4, 32),
}
"""Name -> quantization (None: bfloat16, not quantized)."""


ALIASES = {"8": "q8", "4": "q4", "none": "bf16"}
"""Earlier spellings of the presets (the app's, evaluation's and training's -q 8|4|none),
still understood."""


def preset_key(name: str) -> str:
    """The preset's name for `name`, spelled any known way ('Q8', '8', 'none', ...); a
    `UsageError` naming the choices otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise UsageError(f"unknown quantization {name!r}", f"choose {', '.join(PRESETS)}")
    return key


def preset(name: str) -> QuantSpec | None:
    """The quantization of the preset `name` (see `preset_key`)."""
    return PRESETS[preset_key(name)]


def preset_name(spec: QuantSpec | None) -> str:
    """The preset's name of `spec`, or its label when it is none of them."""
    for name, s in PRESETS.items():
        if s == spec:
            return name
    return spec.label if spec else "bf16"


def quantizable(module: nn.Module, group_size: int) -> bool:
    """Linear and embedding layers whose input width the group size divides."""
    if not hasattr(module, "to_quantized"):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.shape[-1] % group_size == 0


def quantized_paths(model: nn.Module, group_size: int) -> set[str]:
    """Module paths (e.g. 'transformer.layers.0.ffn.linear_in') that get quantized."""
    return {path for path, m in model.named_modules() if quantizable(m, group_size)}


def quantize_model(model: nn.Module, spec: QuantSpec,
                   predicate: Callable[[str, nn.Module], bool] | None = None) -> None:
    """Quantizes every quantizable layer in place (norms stay float)."""
    def pred(path: str, m: nn.Module) -> bool:
        return quantizable(m, spec.group_size) and (predicate is None or predicate(path, m))

    nn.quantize(model, group_size=spec.group_size, bits=spec.bits, class_predicate=pred)
