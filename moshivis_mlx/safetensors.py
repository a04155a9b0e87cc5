"""Reading safetensors headers and JSON files as untrusted input.

Both the app (loading a bundle) and the converter (reading a checkpoint) open files that
someone else made: a truncated download, an HTML error page saved under the file's name,
a header claiming petabytes, JSON nested a million deep. Everything here is checked
before any tensor data is read, and every problem is a `WeightsError` naming the file
(and the tensor or key).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WeightsError

# safetensors dtype code -> (bytes per element, name in MLX and NumPy).
DTYPES = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "U16": (2, "uint16"),
    "I16": (2, "int16"), "F16": (2, "float16"), "BF16": (2, "bfloat16"), "U32": (4, "uint32"),
    "I32": (4, "int32"), "F32": (4, "float32"), "U64": (8, "uint64"), "I64": (8, "int64"),
    "F64": (8, "float64"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
ITEMSIZE = {code: size for code, (size, _) in DTYPES.items()}
DTYPE_NAMES = {code: name for code, (_, name) in DTYPES.items()}
FLOAT_CODES = ("F16", "BF16", "F32")
"""What a weight may be stored as (besides MLX's packed uint32 of a quantized layer)."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ELEMENTS = 1 << 36  # no single tensor of a 7B model comes near this
MAX_JSON_BYTES = 64 * 1024 * 1024
"""A config or an index is a few KB; anything this big is not one."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    data_start: int = 0
    """Where the data section begins in the file (the offsets are relative to it)."""

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, self.dtype)


def parse_json(raw: bytes, where: str | Path, what: str | None = None) -> Any:
    """`raw` as JSON, or a WeightsError naming `where` (and saying `what` it is not):
    not UTF-8, invalid, or nested too deeply for the parser."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        detail = "not UTF-8 text"
    except json.JSONDecodeError as e:
        detail = f"invalid JSON: {e}"
    except RecursionError:
        detail = "JSON nested too deeply"
    raise WeightsError(f"{where}: {what} ({detail})" if what else f"{where}: {detail}")


def read_json(path: str | Path, expected: str = "a JSON object") -> dict[str, Any]:
    """A small JSON file holding an object, or a WeightsError naming the file."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file, expected {expected}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{path}: {path.stat().st_size} bytes, too large for {expected}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    doc = parse_json(raw, path)
    if not isinstance(doc, dict):
        raise WeightsError(f"{path}: expected {expected}, got a JSON {type(doc).__name__}")
    return doc


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
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file, expected a .safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: truncated ({size} bytes), not a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise WeightsError(f"{path}: not a safetensors file (header length {n} is impossible)")
        raw = f.read(n)
    header = parse_json(raw, path, "not a safetensors file")
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a table)")
    return check_table(path, header, size - 8 - n, 8 + n)


def check_table(where: str | Path, header: dict, data_size: int, data_start: int = 0
                ) -> dict[str, TensorInfo]:
    """A validated tensor table from a parsed safetensors header (`data_size`: the bytes
    after the header; the header of a remote file is checked with a size it cannot reach)."""
    tensors = {name: _check_entry(where, name, entry, data_size, data_start)
               for name, entry in header.items() if name != "__metadata__"}
    spans = sorted((t for t in tensors.values() if t.end > t.start), key=lambda t: (t.start, t.end))
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise WeightsError(f"{where}: tensors {a.name!r} and {b.name!r} overlap in the file")
    return tensors


def _check_entry(path: str | Path, name: str, entry: object, data_size: int,
                 data_start: int = 0) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise WeightsError(f"{where}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WeightsError(f"{where}: invalid shape {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise WeightsError(f"{where}: absurd shape {shape}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                       for o in offsets) or offsets[0] > offsets[1]):
        raise WeightsError(f"{where}: invalid data offsets {offsets!r}")
    start, end = offsets
    if end - start != numel * ITEMSIZE[dtype]:
        raise WeightsError(
            f"{where}: {end - start} bytes in the file for shape {shape} of {dtype}")
    if end > data_size:
        raise WeightsError(f"{where}: data runs past the end of the file (truncated download?)")
    return TensorInfo(name, dtype, tuple(shape), start, end, data_start)
