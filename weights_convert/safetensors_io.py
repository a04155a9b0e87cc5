"""Reading and writing safetensors files safely, without torch.

The header is parsed and validated before any tensor data is touched (in
`moshivis_mlx.safetensors`, which the app's bundle loading shares): a truncated file,
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
from pathlib import Path

import mlx.core as mx
import numpy as np

from moshivis_mlx.errors import WeightsError
from moshivis_mlx.safetensors import (  # noqa: F401 (the converter's names for them)
    DTYPE_NAMES,
    DTYPES,
    FLOAT_CODES,
    ITEMSIZE,
    MAX_ELEMENTS,
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    TensorInfo,
    _check_entry,
    check_table,
    parse_json,
    read_header,
    read_json,
    refuse_pickle,
)

# What MLX can hold (bfloat16 travels through NumPy as uint16).
MX_DTYPES = {code: getattr(mx, "bool_" if name == "bool" else name)
             for code, name in DTYPE_NAMES.items() if code not in ("F64", "F8_E4M3", "F8_E5M2")}
CODES = {name: code for code, name in DTYPE_NAMES.items()}
COMPARE_CHUNK = 4 << 20


def dtype_code(dtype: mx.Dtype) -> str:
    """The safetensors code of an MLX dtype."""
    for code, d in MX_DTYPES.items():
        if d == dtype:
            return code
    raise WeightsError(f"cannot store dtype {dtype} in safetensors")


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
    doc = read_json(path, "a manifest (a JSON object)")
    table = doc.get("tensors")
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


def header_bytes(plan: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The JSON header of a file holding `plan`'s tensors in order (8-byte aligned)."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, code, shape in plan:
        nbytes = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def file_size(plan: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """The exact size of the file `SafetensorsWriter` makes for `plan`."""
    return 8 + len(header_bytes(plan)) + sum(math.prod(s) * ITEMSIZE[c] for _, c, s in plan)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known in
    advance: the header goes first, then each tensor as it is produced, so the file can be
    far larger than memory. Every tensor is checked against the plan."""

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]]):
        self.path = Path(path)
        self.plan = list(plan)
        raw = header_bytes(self.plan)
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
