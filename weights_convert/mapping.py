"""What every layout produces: each of our tensors and where it comes from.

An `Entry` says that our tensor `dst` [shape] is the source tensor `src`, maybe a row block
of it (a fused projection, one depformer step's chunk), maybe divided row by row by a second
source (Mimi's codebook statistics), maybe with its axes permuted (a PyTorch convolution),
then reshaped. Entries sharing a destination are concatenated along the first axis (SigLIP's
q, k, v into one in_proj). The same list drives the checks, `--dry-run` and the conversion,
so what is printed is what is done.

Layouts are written as tables of renames from our names to theirs (`Renames`): the first
pattern that matches the whole name gives the source name; a name no pattern matches is the
same in both. They go from ours to theirs because every tensor of ours must be found, and a
missing one is best named as the checkpoint would name it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moshivis_mlx.bundle import listing
from moshivis_mlx.models.config import ConfigError
from moshivis_mlx.quant import QuantSpec, quantize_model

from .safetensors_io import WeightsError
from .source import FloatView

CODEBOOK_EPS = 1e-5


@dataclass(frozen=True)
class Entry:
    dst: str
    src: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    perm: tuple[int, ...] | None = None
    """Source axes -> ours (a convolution stored in PyTorch's order)."""
    aux: str | None = None
    """A codebook's cluster usage: the value is `src / max(aux, 1e-5)`, row by row."""
    src_shape: tuple[int, ...] | None = None
    """The source's exact shape, where the layout fixes it (Mimi)."""
    note: str | None = None
    """What is done on the way, in words (for --dry-run)."""


@dataclass
class Mapping:
    entries: list[Entry]
    ignored: list[str] = field(default_factory=list)
    """Source tensors deliberately not used here (another part takes them, or nobody)."""
    copies: list[tuple[str, str]] = field(default_factory=list)
    """(copy, original): stored copies of one shared tensor. Only the original is
    converted; each copy must hold exactly its data."""


def model_tensors(model: nn.Module, quant: QuantSpec | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's tensors as a bundle stores them, quantized with `quant`
    (MLX builds the skeleton lazily: nothing is allocated)."""
    if quant:
        quantize_model(model, quant)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@dataclass
class Found:
    """A model found in the sources: its layout, config, checked mapping and float view."""

    layout: str
    cfg: Any
    mapping: Mapping
    view: FloatView


def identity_mapping(tensors: dict[str, tuple[int, ...]]) -> Mapping:
    """Our names already (one of our bundles)."""
    return Mapping([Entry(k, k, tuple(v)) for k, v in tensors.items()])


Renames = list[tuple[re.Pattern, str | Callable[[re.Match], str]]]


def renames(table: list[tuple[str, str | Callable[[re.Match], str]]]) -> Renames:
    return [(re.compile(pattern), repl) for pattern, repl in table]


def rename(table: Renames, name: str) -> str:
    """Our `name` in a layout: the first pattern matching all of it, else unchanged."""
    for pattern, repl in table:
        m = pattern.fullmatch(name)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return name


def entry_value(e: Entry, read: Callable[[str], mx.array]) -> mx.array:
    """The float value of `e` from `read(source name)`."""
    a = read(e.src)
    if e.rows is not None:
        a = a[e.rows[0]: e.rows[1]]
    if e.aux is not None:
        usage = read(e.aux).astype(mx.float32)
        a = a.astype(mx.float32) / mx.maximum(usage, CODEBOOK_EPS)[:, None]
    if e.perm is not None:
        a = a.transpose(e.perm)
    return a.reshape(e.shape)


def check_mapping(mapping: Mapping, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every source tensor used or deliberately ignored, every entry's source present and of
    a shape that gives the destination; else one error listing all the problems."""
    used = {e.src for e in mapping.entries} | {e.aux for e in mapping.entries if e.aux}
    used |= set(mapping.ignored) | {c for c, _ in mapping.copies}
    missing = sorted({e.src for e in mapping.entries if e.src not in shapes})
    unexpected = sorted(set(shapes) - used)
    bad = []
    for e in mapping.entries:
        if e.src not in shapes:
            continue
        src = tuple(shapes[e.src])
        rows = src[0] if src else 0
        lo, hi = e.rows if e.rows else (0, rows)
        sliced = (hi - lo,) + src[1:] if e.rows else src
        if hi > rows or math.prod(sliced) != math.prod(e.shape):
            bad.append(f"{e.src} {list(src)} -> {e.dst} {list(e.shape)}")
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing, 8, ', ')}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected, 8, ', ')}")
    if bad:
        problems.append(f"mis-shaped tensors: {listing(bad, 8, '; ')}")
    if problems:
        raise WeightsError(f"{what}: " + " | ".join(problems))


@contextmanager
def about(label: str) -> Iterator[None]:
    """Errors raised inside say which file they are about."""
    try:
        yield
    except ConfigError:
        raise  # it names its own file and key
    except WeightsError as e:
        raise WeightsError(f"{label}: {e}") from None
