"""Where a conversion's tensors come from: safetensors files, or a manifest (no data).

`Source` is the validated table of every stored tensor, read one at a time on demand.
`FloatView` is what a group of stored tensors stands for: MLX's affine quantization keeps
a layer as three tensors, `X.weight` (uint32, packed), `X.scales` and `X.biases`; the view
shows them as the one float tensor `X.weight` of the unpacked shape, so the layouts'
mappings and checks are the same for quantized and float checkpoints. It reads the
float values (dequantized in float32) or, to copy them unchanged, the packed triple.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import mlx.core as mx

from moshivis_mlx.quant import BITS as SUPPORTED_BITS
from moshivis_mlx.quant import GROUP_SIZES as SUPPORTED_GROUPS
from moshivis_mlx.quant import QuantSpec

from .safetensors_io import TensorInfo, WeightsError, read_header, read_manifest, read_tensor
from .safetensors_io import same_bytes as _same_bytes


class Source:
    """The tensors of one checkpoint, from one file, several (shards) or a manifest."""

    def __init__(self, label: str, tensors: dict[str, tuple[Path | None, TensorInfo]],
                 has_data: bool):
        self.label = label
        self.tensors = tensors
        self.has_data = has_data

    @classmethod
    def from_files(cls, paths: list[Path], label: str | None = None) -> Source:
        tensors: dict[str, tuple[Path | None, TensorInfo]] = {}
        for path in paths:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise WeightsError(f"{path}: tensor {name!r} is also in {tensors[name][0]}")
                tensors[name] = (Path(path), info)
        return cls(label or ", ".join(str(p) for p in paths), tensors, True)

    @classmethod
    def from_manifest(cls, path: Path) -> Source:
        return cls(str(path), {k: (None, v) for k, v in read_manifest(path).items()}, False)

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


def infer_quant_spec(source: Source, names: Iterable[str], anchor: str, in_dim: int
                     ) -> QuantSpec | None:
    """How the quantized tensors among `names` are stored, from `anchor` (a weight whose
    float input width `in_dim` is known from an unquantized tensor). None: nothing is."""
    names = set(names)
    bases = quantized_bases(names)
    if not bases:
        return None
    incomplete = []
    for b in sorted(bases):
        lacking = [f"{b}.{p}" for p in ("weight", "biases") if f"{b}.{p}" not in names]
        if lacking:
            incomplete.append(f"quantized {b} lacks {', '.join(lacking)}")
    if incomplete:
        raise WeightsError(f"{source.label}: " + "; ".join(incomplete))
    base = anchor[: -len(".weight")]
    if base + ".scales" not in names or anchor not in names:
        raise WeightsError(f"{source.label}: quantized tensors, but {anchor} (which tells the "
                           f"bits and the group size) is not quantized")
    packed, scales = source.info(anchor).shape, source.info(base + ".scales").shape
    bits, rem_b = divmod(packed[-1] * 32, in_dim)
    group, rem_g = divmod(in_dim, scales[-1]) if scales[-1] else (0, 1)
    if rem_b or rem_g or bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUPS:
        raise WeightsError(
            f"{source.label}: {anchor} {list(packed)} with scales {list(scales)} for an input "
            f"width of {in_dim} is not an MLX affine quantization with {SUPPORTED_BITS} bits "
            f"and groups of {SUPPORTED_GROUPS}")
    return QuantSpec(bits, group)


class FloatView:
    """The float tensors that `names` of `source` stand for (see the module docstring)."""

    def __init__(self, source: Source, names: Iterable[str], spec: QuantSpec | None):
        self.source = source
        self.spec = spec
        names = set(names)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.quantized: set[str] = set()
        bases = quantized_bases(names)
        if bases and spec is None:
            raise WeightsError(f"{source.label}: quantized tensors where none are expected: "
                               + ", ".join(sorted(b + ".scales" for b in bases)[:5]))
        parts = {f"{b}.{p}" for b in bases for p in ("weight", "scales", "biases")}
        problems = []
        for base in sorted(bases):
            try:
                self.shapes[base + ".weight"] = self._unpacked_shape(names, base)
                self.quantized.add(base + ".weight")
            except WeightsError as e:
                problems.append(str(e))
        if problems:
            raise WeightsError(f"{source.label}: " + "; ".join(problems))
        for n in names - parts:
            self.shapes[n] = source.info(n).shape
        self._cache: tuple[tuple[str, str], object] | None = None

    def _unpacked_shape(self, names: set[str], base: str) -> tuple[int, ...]:
        w, s, b = (f"{base}.{p}" for p in ("weight", "scales", "biases"))
        missing = [n for n in (w, s, b) if n not in names]
        if missing:
            raise WeightsError(f"quantized {base} lacks {', '.join(missing)}")
        iw, is_, ib = (self.source.info(n) for n in (w, s, b))
        spec = self.spec
        ok = (iw.dtype == "U32" and len(iw.shape) == 2 and is_.shape == ib.shape
              and len(is_.shape) == 2 and is_.shape[0] == iw.shape[0]
              and iw.shape[1] * 32 == is_.shape[1] * spec.group_size * spec.bits)
        if not ok:
            raise WeightsError(
                f"quantized {base}: weight {iw.dtype_name} {list(iw.shape)}, scales "
                f"{list(is_.shape)}, biases {list(ib.shape)} do not fit {spec.label}")
        return (iw.shape[0], is_.shape[1] * spec.group_size)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def stored_names(self, name: str) -> list[str]:
        """The stored tensors behind `name`."""
        if name in self.quantized:
            base = name[: -len(".weight")]
            return [name, base + ".scales", base + ".biases"]
        return [name]

    def stored_dtype(self, name: str) -> str:
        if name in self.quantized:
            return self.spec.label
        return self.source.info(name).dtype_name

    def _cached(self, key: tuple[str, str], load):
        # One tensor is kept: the entries that use one source tensor (row blocks of a fused
        # projection) are converted one after another, and read it once.
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            self._cache = (key, load())
        return self._cache[1]

    def __getitem__(self, name: str) -> mx.array:
        """The float tensor (quantized ones dequantized, in float32)."""
        if name not in self.quantized:
            return self._cached((name, "raw"), lambda: self.source.read(name))

        def load():
            w, s, b = self.packed(name)
            return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                                 group_size=self.spec.group_size, bits=self.spec.bits)
        return self._cached((name, "float"), load)

    def packed(self, name: str) -> tuple[mx.array, mx.array, mx.array]:
        """The stored (weight, scales, biases) of a quantized tensor."""
        return tuple(self.source.read(n) for n in self.stored_names(name))

    def release(self) -> None:
        self._cache = None
