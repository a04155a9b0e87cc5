"""A conversion plan: every tensor the bundle will hold, where it comes from, and how.

A `Part` (the language model, the image encoder, the Mimi codec) is a list of `Job`s; a
job reads one source tensor (or a few, concatenated), converts it and yields one output
tensor, or three for a quantized layer (`weight`, `scales`, `biases`). Every output's name,
dtype and shape is known before any data is read, so:

* `--dry-run` prints exactly what a conversion does, from the headers (or a manifest);
* a part is written in shards of bounded size (`model-00001-of-0000n.safetensors` and an
  index, as mlx-lm does), each shard streamed job by job through `SafetensorsWriter`:
  the memory a conversion needs is that of the largest tensor, not of the model.

A float source tensor that is already quantized with the target's bits and group size
(Kyutai's q8 / q4 MLX files, or one of our bundles) is copied packed, bit for bit;
otherwise it is dequantized (float32) and converted like a float tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .lm_layout import Entry
from .safetensors_io import DTYPE_NAMES, ITEMSIZE, SafetensorsWriter, dtype_code
from .source import FloatView, QuantSpec

Progress = Callable[[str, int, int], None]
"""progress(what, bytes done, bytes in all), called as a part is written."""

DEFAULT_SHARD_SIZE = 5 << 30  # mlx-lm's


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass
class Job:
    srcs: list[str]
    outputs: list[OutTensor]
    how: str
    run: Callable[[], list[mx.array]]
    quant: QuantSpec | None = None

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class Part:
    stem: str
    """Files: `{stem}.safetensors`, or shards and `{stem}.safetensors.index.json`."""
    title: str
    jobs: list[Job]
    view: FloatView | None = None
    copies: list[tuple[str, str]] = field(default_factory=list)
    elsewhere: dict[str, str] = field(default_factory=dict)
    """Source tensors another part converts: name -> that part's title."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Source tensors not stored: name -> why."""

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def quantized_outputs(dst: str, shape: tuple[int, ...], q: QuantSpec, code: str
                      ) -> list[OutTensor]:
    rows, cols = shape
    module = dst[: -len(".weight")]
    groups = (rows, cols // q.group_size)
    return [OutTensor(dst, "U32", (rows, cols * q.bits // 32)),
            OutTensor(module + ".scales", code, groups),
            OutTensor(module + ".biases", code, groups)]


def entry_value(e: Entry, view: FloatView) -> mx.array:
    """The float value of destination entry `e` (rows, axis order and shape as it says)."""
    from .mimi_layout import MimiEntry, convert_mimi_tensor
    from .vision_layout import VisionEntry

    if isinstance(e, MimiEntry):
        return convert_mimi_tensor(e, view)
    a = view[e.src]
    if e.rows is not None:
        a = a[e.rows[0]: e.rows[1]]
    if isinstance(e, VisionEntry) and e.perm is not None:
        a = a.transpose(e.perm)
    return a.reshape(e.shape)


def _is_plain(e: Entry, view: FloatView) -> bool:
    """Whether `e` only takes rows of its source: then a packed tensor can be sliced as is."""
    from .mimi_layout import MimiEntry
    from .vision_layout import VisionEntry

    if isinstance(e, MimiEntry) or (isinstance(e, VisionEntry) and e.perm is not None):
        return False
    src = view.shapes[e.src]
    rows = (e.rows[1] - e.rows[0],) if e.rows else src[:1]
    return len(src) == 2 and tuple(e.shape) == rows + src[1:]


def _notes(es: list[Entry], view: FloatView) -> list[str]:
    """What happens to the source on the way, in words (for --dry-run)."""
    from .mimi_layout import MimiEntry
    from .vision_layout import VisionEntry

    notes = [f"{len(es)} concatenated"] if len(es) > 1 else []
    e = es[0]
    if e.rows is not None:
        notes.append(f"rows {e.rows[0]}:{e.rows[1]}")
    if isinstance(e, VisionEntry) and e.perm is not None:
        notes.append("conv axes to MLX order")
    if isinstance(e, MimiEntry) and e.op != "copy":
        notes.append({"conv": "conv axes to MLX order",
                      "conv_transpose": "transposed-conv axes to MLX order",
                      "codebook": "centroids = embedding_sum / cluster_usage"}[e.op])
    elif len(es) == 1 and e.rows is None and tuple(view.shapes[e.src]) != tuple(e.shape):
        notes.append("reshaped")
    return notes


def entry_jobs(entries: list[Entry], view: FloatView, dtype: mx.Dtype,
               quant: QuantSpec | None, qmodules: set[str]) -> list[Job]:
    """Jobs for a mapping: entries sharing a destination are concatenated (rows); a
    `.weight` of a module in `qmodules` is quantized with `quant`."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.dst, []).append(e)
    code = dtype_code(dtype)
    jobs = []
    for dst, es in groups.items():
        shape = es[0].shape
        if len(es) > 1:
            shape = (sum(e.shape[0] for e in es),) + tuple(es[0].shape[1:])
        module, leaf = dst.rsplit(".", 1)
        q = quant if quant is not None and leaf == "weight" and module in qmodules else None
        srcs = [e.src for e in es] + [a for e in es if (a := getattr(e, "aux", None))]
        src_q = view.spec if srcs[0] in view.quantized else None
        notes = _notes(es, view)
        if q is not None:
            outputs = quantized_outputs(dst, shape, q, code)
            if len(es) == 1 and src_q == q and _is_plain(es[0], view):
                how = ", ".join(notes + [f"kept {q.label} (copied packed)"])
                jobs.append(Job(srcs, outputs, how, _packed_copy(es[0], view, dtype), q))
                continue
            notes.append(f"quantized {q.label}")
        else:
            outputs = [OutTensor(dst, code, tuple(shape))]
            stored = view.stored_dtype(srcs[0])
            if stored != DTYPE_NAMES[code]:
                notes.append(f"{stored} -> {DTYPE_NAMES[code]}")
        if src_q is not None:
            notes.insert(0, "dequantized")
        jobs.append(Job(srcs, outputs, ", ".join(notes) or "copied",
                        _converted(es, view, dtype, q), q))
    # Jobs reading one source tensor run one after another (the view keeps the last read).
    first: dict[str, int] = {}
    for j in jobs:
        first.setdefault(j.srcs[0], len(first))
    jobs.sort(key=lambda j: first[j.srcs[0]])
    return jobs


def _converted(es: list[Entry], view: FloatView, dtype: mx.Dtype, q: QuantSpec | None):
    def run() -> list[mx.array]:
        parts = [entry_value(e, view) for e in es]
        a = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).astype(dtype)
        if q is None:
            return [a]
        return list(mx.quantize(a, group_size=q.group_size, bits=q.bits))
    return run


def _packed_copy(e: Entry, view: FloatView, dtype: mx.Dtype):
    def run() -> list[mx.array]:
        w, s, b = view.packed(e.src)
        if e.rows is not None:
            w, s, b = (x[e.rows[0]: e.rows[1]] for x in (w, s, b))
        return [w, s.astype(dtype), b.astype(dtype)]
    return run


def copy_jobs(view: FloatView, names: list[str]) -> list[Job]:
    """Tensors copied unchanged (the Mimi codec of one of our bundles)."""
    jobs = []
    for n in names:
        info = view.source.info(n)
        jobs.append(Job([n], [OutTensor(n, info.dtype, info.shape)], "copied",
                        lambda n=n: [view[n]]))
    return jobs


# -- writing ----------------------------------------------------------------------------

def shard_jobs(jobs: list[Job], max_bytes: int) -> list[list[Job]]:
    """Consecutive jobs in shards of at most `max_bytes` (a larger job gets its own)."""
    shards: list[list[Job]] = []
    size = 0
    for j in jobs:
        if not shards or (size + j.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += j.nbytes
    return shards


def shard_names(stem: str, n: int) -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_part(part: Part, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_SIZE,
               progress: Progress | None = None) -> list[str]:
    """Writes the part's files into `out_dir`; returns their names."""
    shards = shard_jobs(part.jobs, max_shard_bytes)
    names = shard_names(part.stem, len(shards))
    total, done = part.nbytes, 0
    weight_map: dict[str, str] = {}
    if progress:
        progress(part.title, 0, total)
    try:
        for name, jobs in zip(names, shards):
            plan = [(o.name, o.dtype, o.shape) for j in jobs for o in j.outputs]
            with SafetensorsWriter(out_dir / name, plan) as writer:
                for job in jobs:
                    arrays = job.run()
                    mx.eval(*arrays)
                    for o, a in zip(job.outputs, arrays, strict=True):
                        writer.write(o.name, a)
                        weight_map[o.name] = name
                    del arrays
                    mx.clear_cache()
                    done += job.nbytes
                    if progress:
                        progress(part.title, done, total)
    finally:
        if part.view is not None:
            part.view.release()
    if len(names) > 1:
        index = {"metadata": {"total_size": total, "format": "mlx"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / f"{part.stem}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n")
    return names


# -- describing -------------------------------------------------------------------------

def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def describe_part(part: Part, max_shard_bytes: int) -> list[str]:
    """One line per source tensor: where it goes, as what, and the size it takes."""
    n = len(shard_jobs(part.jobs, max_shard_bytes))
    files = shard_names(part.stem, n)
    where = files[0] if n == 1 else f"{n} shards {files[0]} .. {files[-1]} + index"
    lines = [f"{part.title} -> {where} ({human(part.nbytes)})"]
    view = part.view
    for j in part.jobs:
        src = " + ".join(f"{s} {_shape(view.shapes[s])} {view.stored_dtype(s)}"
                         if view is not None else s for s in j.srcs)
        out = j.outputs[0]
        dst_dtype = j.quant.label if j.quant else DTYPE_NAMES[out.dtype]
        shape = _shape(out.shape) if j.quant is None else _shape(
            (out.shape[0], j.outputs[1].shape[1] * j.quant.group_size))
        extra = " (+ scales, biases)" if j.quant else ""
        lines.append(f"  {src} -> {out.name} {shape} {dst_dtype}{extra} [{j.how}] "
                     f"{human(j.nbytes)}")
    for copy, original in part.copies:
        lines.append(f"  {copy} -> not stored: a copy of {original} (checked equal when "
                     f"converting)")
    for name, why in part.dropped.items():
        lines.append(f"  {name} -> not stored: {why}")
    by_part: dict[str, list[str]] = {}
    for name, title in part.elsewhere.items():
        by_part.setdefault(title, []).append(name)
    for title, names in by_part.items():
        lines.append(f"  {len(names)} tensors ({_common_prefix(names)}*) -> the {title} "
                     f"(listed there)")
    return lines


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
