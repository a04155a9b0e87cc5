"""Reading safetensors files safely, without torch.

The header is parsed and validated before any tensor data is touched: a truncated file,
overlapping or out-of-range offsets, sizes that disagree with shapes, or absurd shapes
are reported with the file and tensor names. Tensor data is then read lazily by MLX.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ELEMENTS = 1 << 36  # no single tensor of a 7B model comes near this
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: refusing to read a pickle checkpoint (it can run arbitrary code); "
            f"use the .safetensors file of the same model, or convert it with "
            f"safetensors' convert script on a trusted machine")


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Validated tensor table of a safetensors file (reads only the header)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, expected a .safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: truncated ({size} bytes), not a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise WeightsError(f"{path}: not a safetensors file (header length {n} is impossible)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_size)
    spans = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise WeightsError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the file")
    return tensors


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise WeightsError(f"{where}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WeightsError(f"{where}: invalid shape {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise WeightsError(f"{where}: absurd shape {shape}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise WeightsError(f"{where}: invalid data offsets {offsets!r}")
    start, end = offsets
    if end - start != numel * ITEMSIZE[dtype]:
        raise WeightsError(
            f"{where}: {end - start} bytes in the file for shape {shape} of {dtype}")
    if end > data_size:
        raise WeightsError(f"{where}: data runs past the end of the file (truncated download?)")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def load_tensors(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a (validated) file as lazy MLX arrays: data is read when evaluated."""
    read_header(path)
    return mx.load(str(path))
