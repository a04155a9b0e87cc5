"""Reading and writing safetensors files safely, without torch.

The header is parsed and validated before any tensor data is touched: a truncated file,
overlapping or out-of-range offsets, sizes that disagree with shapes, or absurd shapes
are reported with the file and tensor names. Tensors are then read one at a time
(`read_tensor`), so a conversion never holds more than the tensor it is working on.

`SafetensorsWriter` writes a file whose table of contents is known in advance (a
conversion plan): the header first, then each tensor as it is computed, so a shard of
any size costs the memory of one tensor. A manifest (names, shapes and dtypes of a
released checkpoint, no data) is read into the same validated table (`read_manifest`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from moshivis_mlx.errors import WeightsError

# safetensors dtype code -> (bytes per element, name in MLX and NumPy).
DTYPES = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "U16": (2, "uint16"),
    "I16": (2, "int16"), "F16": (2, "float16"), "BF16": (2, "bfloat16"), "U32": (4, "uint32"),
    "I32": (4, "int32"), "F32": (4, "float32"), "U64": (8, "uint64"), "I64": (8, "int64"),
    "F64": (8, "float64"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
ITEMSIZE = {code: size for code, (size, _) in DTYPES.items()}
DTYPE_NAMES = {code: name for code, (_, name) in DTYPES.items()}
CODES = {name: code for code, name in DTYPE_NAMES.items()}
# What MLX can hold (bfloat16 travels through NumPy as uint16).
MX_DTYPES = {code: getattr(mx, "bool_" if name == "bool" else name)
             for code, name in DTYPE_NAMES.items() if code not in ("F64", "F8_E4M3", "F8_E5M2")}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ELEMENTS = 1 << 36  # no single tensor of a 7B model comes near this
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
COMPARE_CHUNK = 4 << 20


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


def dtype_code(dtype: mx.Dtype) -> str:
    """The safetensors code of an MLX dtype."""
    for code, d in MX_DTYPES.items():
        if d == dtype:
            return code
    raise WeightsError(f"cannot store dtype {dtype} in safetensors")


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: refusing to read a pickle checkpoint (it can run arbitrary code); "
            f"use the .safetensors file of the same model, or convert it with "
            f"safetensors' convert script on a trusted machine")


def read_json_config(path: str | Path, expected: str = "a JSON object") -> dict:
    """A JSON config file as a dict; a WeightsError naming the file otherwise."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such config file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: expected {expected}")
    return cfg


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
    return TensorInfo(name, dtype, tuple(shape), start, end, data_start)


def read_tensor(path: str | Path, info: TensorInfo) -> mx.array:
    """One tensor of a file whose header `read_header` validated, read now (only its bytes)."""
    if info.dtype not in MX_DTYPES:
        raise WeightsError(f"{path}: tensor {info.name!r}: cannot convert dtype {info.dtype_name}")
    np_dtype = np.uint16 if info.dtype == "BF16" else np.dtype(info.dtype_name)
    with open(path, "rb") as f:
        f.seek(info.data_start + info.start)
        data = np.fromfile(f, dtype=np_dtype, count=info.numel)
    if data.size != info.numel:
        raise WeightsError(f"{path}: tensor {info.name!r}: file ends early (truncated?)")
    a = mx.array(data.reshape(info.shape))
    return a.view(mx.bfloat16) if info.dtype == "BF16" else a


def same_bytes(path_a: str | Path, a: TensorInfo, path_b: str | Path, b: TensorInfo) -> bool:
    """Whether two stored tensors hold exactly the same data (compared in bounded chunks)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        fa.seek(a.data_start + a.start)
        fb.seek(b.data_start + b.start)
        left = a.nbytes
        while left:
            n = min(left, COMPARE_CHUNK)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def read_manifest(path: str | Path) -> dict[str, TensorInfo]:
    """The tensor table of a manifest: `{"tensors": {name: [[shape...], "dtype"]}, ...}`.

    A manifest describes a released checkpoint without its data; it is validated like a
    header (known dtypes, sane shapes) and gets the offsets the file would have."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such manifest") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a manifest (invalid JSON: {e})") from None
    table = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise WeightsError(f"{path}: not a manifest (expected a non-empty \"tensors\" table)")
    tensors: dict[str, TensorInfo] = {}
    offset = 0
    for name, value in table.items():
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not isinstance(value[1], str)):
            raise WeightsError(f"{path}: tensor {name!r}: expected [[shape...], \"dtype\"]")
        shape, dtype = value
        code = CODES.get(dtype, dtype if dtype in ITEMSIZE else None)
        if code is None:
            raise WeightsError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        sane = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        nbytes = math.prod(shape) * ITEMSIZE[code] if sane else 0
        entry = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        tensors[name] = _check_entry(path, name, entry, 1 << 62)
        offset += nbytes
    return tensors


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known in
    advance: the header goes first, then each tensor as it is produced, so the file can be
    far larger than memory. Every tensor is checked against the plan."""

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]]):
        self.path = Path(path)
        self.plan = list(plan)
        header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for name, code, shape in self.plan:
            nbytes = math.prod(shape) * ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, array: mx.array) -> None:
        if self._next >= len(self.plan):
            raise RuntimeError(f"{self.path.name}: {name} is not in the plan")
        want, code, shape = self.plan[self._next]
        if (name, code, tuple(shape)) != (want, dtype_code(array.dtype), tuple(array.shape)):
            raise RuntimeError(f"{self.path.name}: expected {want} {code} {list(shape)}, got "
                               f"{name} {dtype_code(array.dtype)} {list(array.shape)}")
        array = mx.contiguous(array)
        mx.eval(array)
        self._file.write(memoryview(array))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._next != len(self.plan):
                raise RuntimeError(f"{self.path.name}: {len(self.plan) - self._next} tensors "
                                   f"were never written")
            self._file.flush()
        finally:
            self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
