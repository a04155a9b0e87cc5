"""Where a conversion's tensors come from: safetensors files, or a table without data.

`Source` is the validated table of every stored tensor (from local files, a manifest or a
remote header), read one tensor at a time on demand. `FloatView` is what a group of stored
tensors stands for: MLX's affine quantization keeps a layer as three tensors, `X.weight`
(uint32, packed), `X.scales` and `X.biases`; the view shows them as the one float tensor
`X.weight` of the unpacked shape, so the layouts are the same for quantized and float
checkpoints. It reads the float values (dequantized in float32) or, to copy them
unchanged, the packed triple.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from moshivis_mlx.quant import BITS, GROUP_SIZES, QuantSpec

from .safetensors_io import TensorInfo, WeightsError, read_header, read_manifest, read_tensor
from .safetensors_io import same_bytes as _same_bytes

PACKED = ("weight", "scales", "biases")


class Source:
    """The tensors of one checkpoint: one file, several (shards), or a table alone."""

    def __init__(self, label: str, tensors: dict[str, tuple[Path | None, TensorInfo]]):
        self.label = label
        self.tensors = tensors
        self.has_data = all(path is not None for path, _ in tensors.values())

    @classmethod
    def from_files(cls, paths: list[Path], label: str | None = None) -> Source:
        tensors: dict[str, tuple[Path | None, TensorInfo]] = {}
        for path in paths:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise WeightsError(f"{path}: tensor {name!r} is also in {tensors[name][0]}")
                tensors[name] = (Path(path), info)
        return cls(label or ", ".join(str(p) for p in paths), tensors)

    @classmethod
    def from_table(cls, label: str, table: dict[str, TensorInfo]) -> Source:
        """Names, shapes and dtypes only (a manifest, a remote header): planned, not read."""
        return cls(label, {k: (None, v) for k, v in table.items()})

    @classmethod
    def from_manifest(cls, path: Path) -> Source:
        return cls.from_table(str(path), read_manifest(path))

    def keys(self) -> set[str]:
        return set(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def shapes(self, names: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
        names = self.tensors if names is None else names
        return {k: self.tensors[k][1].shape for k in names}

    def read(self, name: str) -> mx.array:
        path, info = self.tensors[name]
        if path is None:
            raise WeightsError(f"{self.label}: only the tensor table is known here (a manifest "
                               f"or a remote header): it can be planned, not converted")
        return read_tensor(path, info)

    def same_bytes(self, a: str, b: str) -> bool:
        (pa, ia), (pb, ib) = self.tensors[a], self.tensors[b]
        if pa is None or pb is None:
            return ia.dtype == ib.dtype and ia.shape == ib.shape
        return _same_bytes(pa, ia, pb, ib)


def quantized_bases(names: Iterable[str]) -> set[str]:
    """Module paths stored quantized (those with a `.scales` tensor)."""
    return {n[: -len(".scales")] for n in names if n.endswith(".scales")}


def _lacking(names: set[str], bases: Iterable[str], parts: tuple[str, ...]) -> list[str]:
    out = []
    for b in sorted(bases):
        missing = [f"{b}.{p}" for p in parts if f"{b}.{p}" not in names]
        if missing:
            out.append(f"quantized {b} lacks {', '.join(missing)}")
    return out


def infer_quant_spec(source: Source, names: Iterable[str], anchor: str, in_dim: int
                     ) -> QuantSpec | None:
    """How the quantized tensors among `names` are stored, from `anchor` (a weight whose
    float input width `in_dim` is known from an unquantized tensor). None: nothing is."""
    names = set(names)
    bases = quantized_bases(names)
    if not bases:
        return None
    incomplete = _lacking(names, bases, ("weight", "biases"))
    if incomplete:
        raise WeightsError(f"{source.label}: " + "; ".join(incomplete))
    base = anchor[: -len(".weight")]
    if base + ".scales" not in names or anchor not in names:
        raise WeightsError(f"{source.label}: quantized tensors, but {anchor} (which tells the "
                           f"bits and the group size) is not quantized")
    packed, scales = source.info(anchor).shape, source.info(base + ".scales").shape
    bits, rem_b = divmod(packed[-1] * 32, in_dim)
    group, rem_g = divmod(in_dim, scales[-1]) if scales[-1] else (0, 1)
    if rem_b or rem_g or bits not in BITS or group not in GROUP_SIZES:
        raise WeightsError(
            f"{source.label}: {anchor} {list(packed)} with scales {list(scales)} for an input "
            f"width of {in_dim} is not an MLX affine quantization with {BITS} bits "
            f"and groups of {GROUP_SIZES}")
    return QuantSpec(bits, group)


class FloatView:
    """The float tensors that `names` of `source` stand for (see the module docstring)."""

    def __init__(self, source: Source, names: Iterable[str], spec: QuantSpec | None):
        self.source = source
        self.spec = spec
        names = set(names)
        bases = quantized_bases(names)
        if bases and spec is None:
            raise WeightsError(f"{source.label}: quantized tensors where none are expected: "
                               + ", ".join(sorted(b + ".scales" for b in bases)[:5]))
        problems = _lacking(names, bases, PACKED)
        if not problems:
            problems = [p for b in sorted(bases) if (p := self._check_packed(b))]
        if problems:
            raise WeightsError(f"{source.label}: " + "; ".join(problems))
        self.quantized = {b + ".weight" for b in bases}
        parts = {f"{b}.{p}" for b in bases for p in PACKED}
        self.shapes: dict[str, tuple[int, ...]] = {
            n: source.info(n).shape for n in names - parts}
        for b in bases:
            rows, groups = source.info(b + ".scales").shape
            self.shapes[b + ".weight"] = (rows, groups * spec.group_size)
        self._cache: tuple[str, mx.array] | None = None

    def _check_packed(self, base: str) -> str | None:
        """Why the packed triple of `base` does not fit the spec (None: it does)."""
        w, s, b = (self.source.info(f"{base}.{p}") for p in PACKED)
        q = self.spec
        if (w.dtype == "U32" and len(w.shape) == 2 and len(s.shape) == 2 and s.shape == b.shape
                and s.shape[0] == w.shape[0]
                and w.shape[1] * 32 == s.shape[1] * q.group_size * q.bits):
            return None
        return (f"quantized {base}: weight {w.dtype_name} {list(w.shape)}, scales "
                f"{list(s.shape)}, biases {list(b.shape)} do not fit {q.label}")

    def stored_names(self, name: str) -> list[str]:
        """The stored tensors behind `name`."""
        if name in self.quantized:
            base = name[: -len(".weight")]
            return [f"{base}.{p}" for p in PACKED]
        return [name]

    def stored_dtype(self, name: str) -> str:
        if name in self.quantized:
            return self.spec.label
        return self.source.info(name).dtype_name

    def __getitem__(self, name: str) -> mx.array:
        """The float tensor (quantized ones dequantized, in float32). The last one read is
        kept: the row blocks of one fused tensor are converted one after another."""
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            if name in self.quantized:
                w, s, b = self.packed(name)
                value = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                                      group_size=self.spec.group_size, bits=self.spec.bits)
            else:
                value = self.source.read(name)
            self._cache = (name, value)
        return self._cache[1]

    def packed(self, name: str) -> tuple[mx.array, mx.array, mx.array]:
        """The stored (weight, scales, biases) of a quantized tensor."""
        w, s, b = (self.source.read(n) for n in self.stored_names(name))
        return w, s, b

    def release(self) -> None:
        self._cache = None
