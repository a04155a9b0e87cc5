"""Kyutai checkpoints (or one of our bundles) -> a moshivis-mlx bundle directory.

One pipeline: plan, then dry-run or write.

* Planning reads headers only (`plan_conversion`): every source file is validated, its
  layout recognised, every tensor mapped (nothing missing, nothing left over, every shape
  right) and every output tensor named, typed and sized before a byte of data is read.
  Each output tensor is a `Job`: the entries it is made of, what is done, and a function
  computing it (one tensor, or `weight`, `scales`, `biases` when quantized).
* `dry_run` prints that plan.
* `convert` runs the data checks (copies of shared tensors equal, Mimi's codebooks trained),
  then writes each part (`model`, `vision`, `mimi`) job by job through `SafetensorsWriter`,
  in shards of bounded size with an index as mlx-lm does, into a temporary directory renamed
  into place only when complete. Memory: the largest tensor, not the model.

A source tensor already quantized with the target's bits and group size (Kyutai's q8 / q4
MLX files, one of our bundles) is copied packed, bit for bit; otherwise it is dequantized
(float32) and converted like a float tensor.

Sources, recognised by their tensor names (see lm_layout, vision_layout, mimi_layout):
Kyutai's Moshi and MoshiVis in PyTorch and MLX layouts, SigLIP towers, Kyutai's Mimi, or
one of our bundles (config.json), re-quantized, dequantized or re-typed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx

from moshivis_mlx.bundle import (
    DTYPES,
    FORMAT_VERSION,
    config_text,
    listing,
    non_finite,
    read_config,
    weight_files,
    write_config,
)
from moshivis_mlx.fileio import staged_dir
from moshivis_mlx.models.config import ConfigError
from moshivis_mlx.models.lm import LmConfig
from moshivis_mlx.models.mimi import MimiConfig
from moshivis_mlx.models.siglip import SiglipConfig
from moshivis_mlx.paths import check_outputs
from moshivis_mlx.quant import PRESETS, QuantSpec
from moshivis_mlx.text import TOKENIZER_NAME

from .lm_layout import (
    BUNDLE,
    check_kyutai_types,
    expected_lm_tensors,
    find_lm,
    is_lm,
    kyutai_generation_defaults,
    read_kyutai_config,
)
from .mapping import (
    Entry,
    Found,
    Mapping,
    check_mapping,
    entry_value,
    identity_mapping,
)
from .mimi_layout import check_codebooks_trained, find_mimi, is_mimi, mimi_config_from_kyutai
from .safetensors_io import (
    DTYPE_NAMES,
    FLOAT_CODES,
    ITEMSIZE,
    SafetensorsWriter,
    WeightsError,
    dtype_code,
    file_size,
)
from .source import FloatView, Source
from .vision_layout import (
    expected_vision_tensors,
    find_tower,
    find_vision,
    read_vision_config,
    vision_quantization,
)

Quantization = QuantSpec
"""Blockwise affine quantization: `Quantization(bits=8, group_size=64)`."""
Progress = Callable[[str, int, int], None]
"""progress(what, bytes done, bytes in all), called as a part is written."""
DEFAULT_SHARD_SIZE = 5 << 30  # mlx-lm's


@dataclass
class ConvertOptions:
    out: Path | None = None
    moshi_weights: Path | Source | None = None
    """A file, or (for --dry-run) a tensor table already read; so are mimi/vision_weights."""
    kyutai_config: Path | None = None
    mimi_weights: Path | Source | None = None
    mimi_config: Path | None = None
    """Kyutai's Mimi config (JSON); default: the released Mimi."""
    tokenizer: Path | None = None
    """Kyutai's SentencePiece model, copied into the bundle as tokenizer.model."""
    dtype: str | None = None
    """Float dtype; default bfloat16 (for one of our bundles: the bundle's own)."""
    quantization: Quantization | None = PRESETS["q8"]
    force: bool = False
    # The SigLIP image encoder (default: the tower inside --moshi-weights, if any).
    vision_weights: Path | Source | None = None
    vision_config: Path | None = None
    vision_float: bool = False
    bundle: Path | None = None
    """One of our bundles as the source (everything in it is converted)."""
    manifest: Path | None = None
    """A manifest instead of weights: planning (--dry-run) only."""
    shard_size: int = DEFAULT_SHARD_SIZE
    origin: dict[str, Any] = field(default_factory=dict)
    """Where the files came from (hf_repo, revision): recorded in config.json."""
    adapters: Path | None = None
    """With `bundle`: trained adapters (moshivis-train's OUT/adapters) merged in."""


@dataclass
class Job:
    """One tensor of ours: where it comes from, what is done on the way, and what is
    written (the tensor, or its packed weight, scales and biases)."""

    srcs: list[str]
    dst: str
    shape: tuple[int, ...]
    stored: str
    """How the bundle stores it: a dtype, or a quantization (q8/g64)."""
    how: str
    outputs: list[tuple[str, str, tuple[int, ...]]]
    """(name, safetensors dtype, shape) of each tensor written."""
    run: Callable[[], list[mx.array]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * ITEMSIZE[code] for _, code, shape in self.outputs)


@dataclass
class Part:
    """One weights file of the bundle (`{stem}.safetensors`, or shards and an index)."""

    stem: str
    title: str
    jobs: list[Job]
    view: FloatView
    notes: list[str] = field(default_factory=list)
    """What else the source holds and why it is not stored (for --dry-run)."""

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass
class Plan:
    parts: list[Part]
    config: dict[str, Any]
    tokenizer: Path | None
    checks: list[Callable[[], None]]
    found: list[str]
    """What the sources hold, in words (for --dry-run)."""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


# -- jobs ------------------------------------------------------------------------------------

def _notes(es: list[Entry], view: FloatView) -> list[str]:
    """What happens to the source on the way, in words."""
    e = es[0]
    notes = [f"{len(es)} concatenated"] if len(es) > 1 else []
    if e.rows is not None:
        notes.append(f"rows {e.rows[0]}:{e.rows[1]}")
    if e.note:
        notes.append(e.note)
    elif len(es) == 1 and e.rows is None and tuple(view.shapes[e.src]) != tuple(e.shape):
        notes.append("reshaped")
    return notes


def _is_plain(e: Entry, view: FloatView) -> bool:
    """Whether `e` only takes rows of its source: then a packed tensor can be sliced as is."""
    src = view.shapes[e.src]
    rows = (e.rows[1] - e.rows[0],) if e.rows else src[:1]
    return (e.perm is None and e.aux is None and len(src) == 2
            and tuple(e.shape) == rows + tuple(src[1:]))


def _outputs(dst: str, shape: tuple[int, ...], q: QuantSpec | None, code: str
             ) -> list[tuple[str, str, tuple[int, ...]]]:
    if q is None:
        return [(dst, code, tuple(shape))]
    rows, cols = shape
    base = dst[: -len(".weight")]
    groups = (rows, cols // q.group_size)
    return [(dst, "U32", (rows, cols * q.bits // 32)), (base + ".scales", code, groups),
            (base + ".biases", code, groups)]


def _converted(es: list[Entry], view: FloatView, dtype: mx.Dtype, q: QuantSpec | None
               ) -> list[mx.array]:
    parts = [entry_value(e, view.__getitem__) for e in es]
    a = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).astype(dtype)
    _refuse_non_finite([e.src for e in es], [a], view.source.label, dtype)
    return [a] if q is None else list(mx.quantize(a, group_size=q.group_size, bits=q.bits))


def _packed(e: Entry, view: FloatView, dtype: mx.Dtype) -> list[mx.array]:
    w, s, b = view.packed(e.src)
    if e.rows is not None:
        w, s, b = (x[e.rows[0]: e.rows[1]] for x in (w, s, b))
    s, b = s.astype(dtype), b.astype(dtype)
    _refuse_non_finite([e.src], [s, b], view.source.label, dtype)
    return [w, s, b]


def _refuse_non_finite(srcs: list[str], arrays: list[mx.array], label: str,
                       dtype: mx.Dtype) -> None:
    """NaN or infinite values (or values beyond the target dtype's range, which become
    infinite) make a model that speaks noise: refused, naming the source tensor. Checked
    before quantizing, which would hide them in finite scales."""
    if non_finite({str(i): a for i, a in enumerate(arrays)}):
        raise WeightsError(f"{label}: {' + '.join(srcs)} holds NaN or infinite values (or "
                           f"values beyond {DTYPE_NAMES[dtype_code(dtype)]}'s range): a "
                           f"damaged checkpoint?", "download it again")


def plan_jobs(mapping: Mapping, view: FloatView, dtype: mx.Dtype, quant: QuantSpec | None,
              quantized: set[str]) -> list[Job]:
    """A job per destination (entries sharing one are concatenated); the weights of the
    modules in `quantized` are quantized with `quant`."""
    _check_float_sources(mapping, view)
    groups: dict[str, list[Entry]] = {}
    for e in mapping.entries:
        groups.setdefault(e.dst, []).append(e)
    code = dtype_code(dtype)
    jobs = []
    for dst, es in groups.items():
        shape = es[0].shape
        if len(es) > 1:
            shape = (sum(e.shape[0] for e in es),) + tuple(shape[1:])
        module, leaf = dst.rsplit(".", 1)
        q = quant if leaf == "weight" and module in quantized else None
        srcs = [e.src for e in es] + [e.aux for e in es if e.aux]
        stored_q = view.spec if es[0].src in view.quantized else None
        notes = _notes(es, view)
        if q is not None and stored_q == q and len(es) == 1 and _is_plain(es[0], view):
            notes.append(f"kept {q.label} (copied packed)")
            run = partial(_packed, es[0], view, dtype)
        else:
            if q is not None:
                notes.append(f"quantized {q.label}")
            elif view.stored_dtype(srcs[0]) != DTYPE_NAMES[code]:
                notes.append(f"{view.stored_dtype(srcs[0])} -> {DTYPE_NAMES[code]}")
            if stored_q is not None:
                notes.insert(0, "dequantized")
            run = partial(_converted, es, view, dtype, q)
        jobs.append(Job(srcs, dst, shape, q.label if q else DTYPE_NAMES[code],
                        ", ".join(notes) or "copied", _outputs(dst, shape, q, code), run))
    # Jobs reading one source tensor run one after another (the view keeps the last read).
    first: dict[str, int] = {}
    for j in jobs:
        first.setdefault(j.srcs[0], len(first))
    return sorted(jobs, key=lambda j: first[j.srcs[0]])


def _check_float_sources(mapping: Mapping, view: FloatView) -> None:
    """Every weight comes from a float tensor (or MLX's packed quantization): an int8 or
    float64 tensor where a weight belongs is another format, not something to cast."""
    bad = []
    used = {e.src for e in mapping.entries} | {e.aux for e in mapping.entries if e.aux}
    for name in sorted(used):
        if name in view.quantized:
            continue
        info = view.source.info(name)
        if info.dtype not in FLOAT_CODES:
            bad.append(f"{name} {info.dtype_name}")
    if bad:
        raise WeightsError(f"{view.source.label}: weights stored as integers or in an unsupported "
                           f"float type, expected bfloat16, float16 or float32 (or MLX's 8/4-bit "
                           f"quantization): {listing(bad, 8, ', ')}")


def _quantized_modules(tensors: dict[str, tuple[int, ...]]) -> set[str]:
    return {k[: -len(".scales")] for k in tensors if k.endswith(".scales")}


# -- the models ------------------------------------------------------------------------------

def _in_bundle(source: Source, cfg: Any, tensors: dict[str, tuple[int, ...]], quant: Any
               ) -> Found:
    """A part of one of our bundles: our names already, maybe quantized."""
    view = FloatView(source, source.keys(), QuantSpec.from_dict(quant))
    mapping = identity_mapping(tensors)
    check_mapping(mapping, view.shapes, source.label)
    return Found(BUNDLE, cfg, mapping, view)


def check_copies(source: Source, copies: list[tuple[str, str]]) -> None:
    """Every stored copy of a shared tensor holds exactly the original's data."""
    differ = [c for c, o in copies if not source.same_bytes(c, o)]
    if differ:
        raise WeightsError(
            f"{source.label}: {len(differ)} copies of shared tensors differ from the original "
            f"(the cross-attention is shared by all layers, the depformer norms by all "
            f"steps): {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}")


def check_tokenizer(path: Path) -> int:
    """A SentencePiece model that SentencePiece loads (not, say, an HTML error page saved
    under its name); returns its number of pieces."""
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such tokenizer file")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        raise WeightsError(f"{path}: not a SentencePiece model (expected Kyutai's "
                           f"tokenizer_spm_32k_3.model)") from None
    return sp.get_piece_size()


# -- the parts ------------------------------------------------------------------------------

def _lm_part(m: Found, dtype: str, quant: QuantSpec | None, tower: str) -> Part:
    quantized = _quantized_modules(expected_lm_tensors(m.cfg, quant)) if quant else set()
    notes = [f"  {c} -> not stored: a copy of {o} (checked equal when converting)"
             for c, o in m.mapping.copies]
    if m.mapping.ignored:
        names = m.mapping.ignored
        notes.append(f"  {len(names)} tensors ({_common_prefix(names)}*) -> {tower}")
    jobs = plan_jobs(m.mapping, m.view, DTYPES[dtype], quant, quantized)
    return Part("model", "language model", jobs, m.view, notes)


def _lm_section(cfg: LmConfig, dtype: str, quant: QuantSpec | None) -> dict[str, Any]:
    return {"model_type": "moshivis" if cfg.cross_attention else "moshi", "lm": cfg.to_dict(),
            "dtype": dtype, "quantization": quant.to_dict() if quant else None}


def _vision_part(m: Found, dtype: str, quant: QuantSpec | None) -> Part:
    quantized = set()
    if quant:
        quantized = _quantized_modules(expected_vision_tensors(m.cfg, quant.to_dict()))
    notes = [f"  {k} -> not stored: not used (HF's pooling head, position ids)"
             for k in m.mapping.ignored]
    jobs = plan_jobs(m.mapping, m.view, DTYPES[dtype], quant, quantized)
    return Part("vision", "image encoder", jobs, m.view, notes)


def _vision_section(m: Found, dtype: str, quant: QuantSpec | None) -> dict[str, Any]:
    return {"siglip": m.cfg.to_dict(), "dtype": dtype,
            "quantization": quant.to_dict() if quant else None,
            "source": {"layout": m.layout, "weights": Path(m.view.source.label).name}}


def _mimi_part(m: Found) -> Part:
    """Always float32, never quantized (the codec is small and its numerics matter)."""
    notes = [f"  {k} -> not stored: must be non-zero, a trained codebook (checked when "
             f"converting)" for k in m.mapping.ignored]
    return Part("mimi", "Mimi codec", plan_jobs(m.mapping, m.view, mx.float32, None, set()),
                m.view, notes)


# -- planning --------------------------------------------------------------------------------

def _open(weights: Path | Source) -> Source:
    """A weights file's validated table (or a table already read: a remote header)."""
    return weights if isinstance(weights, Source) else Source.from_files([Path(weights)])


def _manifest_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _converter() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("moshivis-mlx")
    except PackageNotFoundError:
        v = "unknown"
    return {"name": "moshivis-convert", "version": v}


def plan_conversion(opts: ConvertOptions) -> Plan:
    """The whole conversion, from headers (or a manifest) only; raises on any bad input."""
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise WeightsError(f"unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})")
    if opts.bundle is not None:
        return _plan_bundle(opts)
    kc = read_kyutai_config(opts.kyutai_config)
    vision_hf = read_vision_config(opts.vision_config)
    mimi_config: Path | MimiConfig | None = opts.mimi_config
    weights = (opts.moshi_weights, opts.mimi_weights, opts.vision_weights)
    lm_src = mimi_src = vision_src = None
    if opts.manifest is not None:
        if any(w is not None for w in weights):
            raise WeightsError("--manifest describes the weights: give no weights files with it")
        src = Source.from_manifest(opts.manifest)
        doc, keys = _manifest_doc(opts.manifest), src.keys()
        if is_lm(keys):
            lm_src = src
            if kc is None and isinstance(doc.get("lm_kwargs"), dict):
                kc = doc["lm_kwargs"]
                check_kyutai_types(kc, opts.manifest)
        if is_mimi(keys):
            mimi_src = src
            if mimi_config is None and isinstance(doc.get("mimi_config"), dict):
                mimi_config = mimi_config_from_kyutai(doc["mimi_config"])
        if find_tower(keys) is not None:
            vision_src = src
            if vision_hf is None and isinstance(doc.get("hf_config"), dict):
                vision_hf = doc["hf_config"]
        if lm_src is None and mimi_src is None and vision_src is None:
            raise WeightsError(f"{opts.manifest}: neither a language model, a Mimi codec nor "
                               f"a SigLIP tower")
    else:
        if all(w is None for w in weights):
            raise WeightsError("nothing to convert: give --hf-repo, --bundle, or --moshi-weights, "
                               "--mimi-weights and/or --vision-weights")
        lm_src, mimi_src, vision_src = (_open(w) if w is not None else None for w in weights)
        if vision_src is None and lm_src is not None and find_tower(lm_src.keys()) is not None:
            vision_src = lm_src
    if vision_src is None and opts.vision_config is not None:
        raise WeightsError("--vision-config given but no vision tower to convert "
                           "(give --vision-weights)")
    tokenizer = Path(opts.tokenizer) if opts.tokenizer is not None else None
    pieces = check_tokenizer(tokenizer) if tokenizer is not None else None

    # Every part is planned before anything is written: bad inputs fail first.
    lm = find_lm(lm_src, kc) if lm_src is not None else None
    vision = find_vision(vision_src, vision_hf) if vision_src is not None else None
    mimi = find_mimi(mimi_src, mimi_config) if mimi_src is not None else None
    dtype, quant = opts.dtype or "bfloat16", opts.quantization
    plan = Plan([], {}, tokenizer, [], [])
    source_info: dict[str, Any] = dict(opts.origin)
    if lm is not None:
        cfg = lm.cfg
        if pieces is not None and pieces != cfg.text_card:
            raise WeightsError(f"{tokenizer}: {pieces} text pieces, but the language model's "
                               f"text vocabulary has {cfg.text_card}: not this model's "
                               f"tokenizer")
        if vision is not None and cfg.cross_attention and cfg.image_dim != vision.cfg.dim:
            raise WeightsError(f"the language model takes {cfg.image_dim}-wide image tokens, "
                               f"the vision tower makes {vision.cfg.dim}")
        tower = ("the image encoder (listed there)" if vision_src is lm_src
                 else "not stored (the image encoder comes from another file)")
        plan.parts.append(_lm_part(lm, dtype, quant, tower))
        if lm.mapping.copies and lm_src.has_data:
            plan.checks.append(partial(check_copies, lm_src, lm.mapping.copies))
        plan.config.update(_lm_section(cfg, dtype, quant))
        plan.config["generation"] = kyutai_generation_defaults(kc)
        stored = f", stored {lm.view.spec.label}" if lm.view.spec else ""
        plan.found.append(f"language model: {'MoshiVis' if cfg.cross_attention else 'Moshi'}, "
                          f"{lm.layout} layout{stored} ({lm_src.label})")
        source_info.update({"layout": lm.layout, "lm_weights": Path(lm_src.label).name})
        if opts.kyutai_config is not None:
            source_info["kyutai_config"] = Path(opts.kyutai_config).name
    if vision is not None:
        vquant = vision_quantization(quant, opts.vision_float)
        plan.parts.append(_vision_part(vision, dtype, vquant))
        plan.config["vision"] = _vision_section(vision, dtype, vquant)
        plan.found.append(f"image encoder: SigLIP, {vision.layout} layout ({vision_src.label})")
    if mimi is not None:
        plan.parts.append(_mimi_part(mimi))
        if mimi_src.has_data:
            plan.checks.append(partial(check_codebooks_trained, mimi_src, mimi.mapping))
        plan.config["mimi"] = mimi.cfg.to_dict()
        source_info["mimi_weights"] = Path(mimi_src.label).name
        plan.found.append(f"Mimi codec ({mimi_src.label})")
    if tokenizer is not None:
        source_info["tokenizer"] = tokenizer.name
    plan.config["tokenizer"] = TOKENIZER_NAME if tokenizer is not None else None
    plan.config["source"] = source_info
    plan.config["converter"] = _converter()
    return plan


def _plan_bundle(opts: ConvertOptions) -> Plan:
    """One of our bundles, converted as a whole (re-quantized, dequantized, re-typed)."""
    others = {"--moshi-weights": opts.moshi_weights, "--mimi-weights": opts.mimi_weights,
              "--vision-weights": opts.vision_weights, "--config": opts.kyutai_config,
              "--mimi-config": opts.mimi_config, "--vision-config": opts.vision_config,
              "--tokenizer": opts.tokenizer, "--manifest": opts.manifest}
    given = [k for k, v in others.items() if v is not None]
    if given:
        raise WeightsError(f"--bundle converts a bundle as it is: {', '.join(given)} cannot "
                           f"be combined with it")
    bundle = Path(opts.bundle)
    bcfg = read_config(bundle)
    sources = {stem: Source.from_files(weight_files(bundle, stem), f"{bundle}/{stem}.safetensors")
               for stem, key in (("model", "lm"), ("vision", "vision"), ("mimi", "mimi"))
               if bcfg.get(key)}
    quant = opts.quantization
    plan = Plan([], {k: v for k, v in bcfg.items() if k != "format_version"}, None, [], [])
    if "model" in sources:
        try:
            cfg = LmConfig.from_dict(bcfg["lm"], "lm.")
        except (TypeError, ValueError, ConfigError) as e:
            raise WeightsError(f"{bundle}/config.json: invalid lm section ({e})") from None
        lm = _in_bundle(sources["model"], cfg, expected_lm_tensors(cfg, None),
                        bcfg.get("quantization"))
        dtype = opts.dtype or bcfg.get("dtype") or "bfloat16"
        plan.parts.append(_lm_part(lm, dtype, quant, ""))
        plan.config.update(_lm_section(cfg, dtype, quant))
        stored = f", stored {lm.view.spec.label}" if lm.view.spec else ""
        plan.found.append(f"language model: {plan.config['model_type']}, bundle layout{stored}")
        if opts.adapters is not None:
            plan.found.append(merge_adapters(plan.parts[-1], opts.adapters, cfg, dtype, quant,
                                             str(bundle)))
    if "vision" in sources:
        section = bcfg["vision"]
        try:
            vcfg = SiglipConfig.from_dict(section["siglip"], "vision.siglip.")
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise WeightsError(f"{bundle}/config.json: invalid vision section ({e})") from None
        vision = _in_bundle(sources["vision"], vcfg, expected_vision_tensors(vcfg, None),
                            section.get("quantization"))
        dtype = opts.dtype or section.get("dtype") or "bfloat16"
        vquant = vision_quantization(quant, opts.vision_float)
        plan.parts.append(_vision_part(vision, dtype, vquant))
        plan.config["vision"] = {**_vision_section(vision, dtype, vquant),
                                 "source": section.get("source")}
        plan.found.append("image encoder: SigLIP, bundle layout")
    if "mimi" in sources:
        src = sources["mimi"]
        try:
            MimiConfig.from_dict(bcfg["mimi"], "mimi.")
        except (TypeError, ValueError, ConfigError) as e:
            raise WeightsError(f"{bundle}/config.json: invalid mimi section ({e})") from None
        mimi = _in_bundle(src, bcfg["mimi"], src.shapes(sorted(src.keys())), None)
        plan.parts.append(_mimi_part(mimi))
        plan.found.append("Mimi codec (copied)")
    if not plan.parts:
        raise WeightsError(f"{bundle}: the bundle holds no model")
    if opts.adapters is not None and "model" not in sources:
        raise WeightsError(f"{bundle}: no language model to merge --adapters into")
    tokenizer = bundle / TOKENIZER_NAME
    plan.tokenizer = tokenizer if tokenizer.exists() else None
    if plan.tokenizer is not None:
        pieces = check_tokenizer(tokenizer)
        text_card = plan.config.get("lm", {}).get("text_card")
        if "model" in sources and pieces != text_card:
            raise WeightsError(f"{tokenizer}: {pieces} text pieces, but the language model's "
                               f"text vocabulary has {text_card}: not this model's tokenizer")
    plan.config["tokenizer"] = TOKENIZER_NAME if plan.tokenizer is not None else None
    plan.config["source"] = {**opts.origin, "layout": BUNDLE, "bundle": bundle.name,
                             "from": bcfg.get("source")}
    if opts.adapters is not None:
        plan.config["source"]["adapters"] = str(Path(opts.adapters).expanduser())
    plan.config["converter"] = _converter()
    return plan


def merge_adapters(part: Part, path: Path, cfg: LmConfig, dtype: str, quant: QuantSpec | None,
                   where: str) -> str:
    """The language model's adapter tensors taken from a trained set instead of the bundle
    (stored as the rest: `dtype`, quantized with `quant` where the layer is); refused with
    one line if the set does not fit the bundle's backbone."""
    from moshivis_mlx.adapters import expected_adapter_shapes, read_adapters

    adapters = read_adapters(path)
    adapters.check_fits(cfg, where)
    adapters.check_tensors(expected_adapter_shapes(cfg))
    merged = 0
    for i, job in enumerate(part.jobs):
        value = adapters.weights.get(job.dst)
        if value is None:
            continue
        q = quant if len(job.outputs) > 1 else None
        how = "from the adapters" + (f", quantized {q.label}" if q else f", {dtype}")
        part.jobs[i] = replace(job, how=how, run=partial(_adapter_tensor, value, DTYPES[dtype], q))
        merged += 1
    trained_on = adapters.training.get("bundle", "?")
    return f"adapters: {merged} tensors from {path} (trained on {trained_on})"


def _adapter_tensor(value: mx.array, dtype: mx.Dtype, q: QuantSpec | None) -> list[mx.array]:
    a = value.astype(dtype)
    return [a] if q is None else list(mx.quantize(a, group_size=q.group_size, bits=q.bits))


# -- writing ---------------------------------------------------------------------------------

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
    """Writes the part's files into `out_dir`, tensor by tensor; returns their names."""
    shards = shard_jobs(part.jobs, max_shard_bytes)
    names = shard_names(part.stem, len(shards))
    total, done = part.nbytes, 0
    weight_map: dict[str, str] = {}
    if progress:
        progress(part.title, 0, total)
    try:
        for name, jobs in zip(names, shards):
            outputs = [o for j in jobs for o in j.outputs]
            with SafetensorsWriter(out_dir / name, outputs) as writer:
                for job in jobs:
                    arrays = job.run()
                    mx.eval(*arrays)
                    for (tensor, _, _), a in zip(job.outputs, arrays, strict=True):
                        writer.write(tensor, a)
                        weight_map[tensor] = name
                    del arrays
                    mx.clear_cache()
                    done += job.nbytes
                    if progress:
                        progress(part.title, done, total)
    finally:
        part.view.release()
    if len(names) > 1:
        (out_dir / f"{part.stem}.safetensors.index.json").write_text(
            index_text(total, weight_map))
    return names


def index_text(total: int, weight_map: dict[str, str]) -> str:
    index = {"metadata": {"total_size": total, "format": "mlx"},
             "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2) + "\n"


def part_files(part: Part, max_shard_bytes: int) -> dict[str, int]:
    """The files a part is written as, and their exact sizes (headers and index too)."""
    shards = shard_jobs(part.jobs, max_shard_bytes)
    names = shard_names(part.stem, len(shards))
    files = {n: file_size([o for j in jobs for o in j.outputs]) for n, jobs in zip(names, shards)}
    if len(names) > 1:
        weight_map = {o[0]: n for n, jobs in zip(names, shards) for j in jobs for o in j.outputs}
        files[f"{part.stem}.safetensors.index.json"] = len(
            index_text(part.nbytes, weight_map).encode())
    return files


def bundle_size(plan: Plan, max_shard_bytes: int) -> int | None:
    """What the bundle takes on disk, to the byte, as `convert` writes it (None: the
    tokenizer's size is not known here: a dry run from a remote repository)."""
    size = sum(sum(part_files(p, max_shard_bytes).values()) for p in plan.parts)
    size += len(config_text({"format_version": FORMAT_VERSION, **plan.config}).encode())
    if plan.tokenizer is not None:
        size += Path(plan.tokenizer).stat().st_size
    elif plan.config.get("source", {}).get("tokenizer"):
        return None  # named by the repository, not fetched for the dry run
    return size


def is_bundle(path: Path) -> bool:
    """Whether `path` is a bundle directory (what --force may replace)."""
    return path.is_dir() and (path / "config.json").is_file() and \
        "format_version" in _manifest_doc(path / "config.json")


def _replaceable(force: bool) -> Callable[[Path], None]:
    """The check made under the output's lock: `out` is free, or --force replaces a
    bundle (never a file or a folder of something else: that is someone's data)."""
    def check(out: Path) -> None:
        if not (out.exists() or out.is_symlink()):
            return
        if not force:
            raise WeightsError(f"{out} already exists (use --force to replace it)")
        if out.is_symlink() or not (is_bundle(out) or (out.is_dir() and not any(out.iterdir()))):
            kind = "a directory" if out.is_dir() else "a file"
            raise WeightsError(f"{out} is {kind}, not a moshivis-mlx bundle: --force replaces "
                               f"only a bundle (or an empty directory)",
                               "remove it yourself, or choose another --out")
    return check


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A directory next to `out`, renamed to `out` when the block completes and removed
    if anything (an error, Ctrl-C, SIGTERM, SIGHUP) stops it; `out` is locked meanwhile,
    so a second conversion to it is refused (fileio.staged_dir)."""
    with staged_dir(out, _replaceable(force),
                    fix="wait for it to finish, or choose another --out") as tmp:
        yield tmp


def _inputs(opts: ConvertOptions) -> dict[str, Path | None]:
    def path(x: Path | Source | None) -> Path | None:
        return Path(x) if isinstance(x, (str, Path)) else None

    return {"--moshi-weights": path(opts.moshi_weights), "--mimi-weights": path(opts.mimi_weights),
            "--vision-weights": path(opts.vision_weights), "--config": path(opts.kyutai_config),
            "--mimi-config": path(opts.mimi_config), "--vision-config": path(opts.vision_config),
            "--tokenizer": path(opts.tokenizer), "--bundle": path(opts.bundle),
            "--hf-repo": _local_repo(opts.origin.get("hf_repo"))}


def _local_repo(repo: str | None) -> Path | None:
    """A folder given as --hf-repo (an input like any other)."""
    return Path(repo) if repo and Path(repo).is_dir() else None


def _write_error(out: Path, e: OSError) -> WeightsError:
    """A failed write, as what to do: the disk is full, read-only, not ours."""
    fixes = {errno.ENOSPC: "free some space or choose another --out",
             errno.EDQUOT: "free some space or choose another --out",
             errno.EROFS: "choose an --out on a writable disk",
             errno.EACCES: "choose an --out you may write to",
             errno.EPERM: "choose an --out you may write to"}
    where = f" ({e.filename})" if e.filename else ""
    return WeightsError(f"cannot write the bundle {out}: {e.strerror or e}{where}",
                        fixes.get(e.errno, "choose another --out"))


def convert(opts: ConvertOptions, progress: Progress | None = None) -> Path:
    """Writes the bundle; returns its path."""
    if opts.manifest is not None:
        raise WeightsError("a manifest holds no data: use it with --dry-run")
    if opts.out is None:
        raise WeightsError("no output directory given (--out DIR)")
    out = Path(os.path.abspath(Path(opts.out).expanduser()))
    plan = plan_conversion(opts)  # headers only: every bad input is refused here
    check_outputs({"--out": out}, _inputs(opts), replaced=True)
    _replaceable(opts.force)(out)  # fail fast; checked again under the lock
    for check in plan.checks:
        check()
    try:
        with staging_dir(out, opts.force) as tmp:
            for part in plan.parts:
                write_part(part, tmp, opts.shard_size, progress)
            if plan.tokenizer is not None:
                shutil.copyfile(plan.tokenizer, tmp / TOKENIZER_NAME)
            write_config(tmp, plan.config)
    except OSError as e:
        raise _write_error(out, e) from None
    return out


# -- describing ------------------------------------------------------------------------------

def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]


def describe_part(part: Part, max_shard_bytes: int) -> list[str]:
    """One line per source tensor: where it goes, as what, and the size it takes."""
    n = len(shard_jobs(part.jobs, max_shard_bytes))
    files = shard_names(part.stem, n)
    where = files[0] if n == 1 else f"{n} shards {files[0]} .. {files[-1]} + index"
    lines = [f"{part.title} -> {where} ({human(part.nbytes)})"]
    view = part.view
    for j in part.jobs:
        src = " + ".join(f"{s} {_shape(view.shapes[s])} {view.stored_dtype(s)}" for s in j.srcs)
        extra = " (+ scales, biases)" if len(j.outputs) > 1 else ""
        lines.append(f"  {src} -> {j.dst} {_shape(j.shape)} {j.stored}{extra} [{j.how}] "
                     f"{human(j.nbytes)}")
    return lines + part.notes


def size_table(opts: ConvertOptions) -> list[tuple[str, int]]:
    """The bundle's size on disk at bfloat16, q8 and q4 (the presets the app converts
    to: groups of 64 and 32), the tokenizer left out when its size is not known."""
    rows = []
    for label in ("bf16", "q8", "q4"):
        q = PRESETS[label]
        name = "bfloat16" if q is None else f"{label} (group {q.group_size})"
        plan = plan_conversion(replace(opts, dtype="bfloat16", quantization=q))
        size = bundle_size(plan, opts.shard_size)
        rows.append((name, size if size is not None else _known_size(plan, opts.shard_size)))
    return rows


def _known_size(plan: Plan, max_shard_bytes: int) -> int:
    return sum(sum(part_files(p, max_shard_bytes).values()) for p in plan.parts) + len(
        config_text({"format_version": FORMAT_VERSION, **plan.config}).encode())


def _label(x: Path | Source | None) -> str | None:
    return x.label if isinstance(x, Source) else (str(x) if x is not None else None)


def dry_run(opts: ConvertOptions) -> list[str]:
    """The plan in words: every source tensor, its destination, dtype and size; totals."""
    plan = plan_conversion(opts)
    source = opts.origin.get("hf_repo") or _label(
        opts.manifest or opts.bundle or opts.moshi_weights or opts.mimi_weights
        or opts.vision_weights)
    lines = [f"plan for {source} (headers only, nothing written)"]
    lines += [f"  {f}" for f in plan.found]
    for part in plan.parts:
        lines += describe_part(part, opts.shard_size)
    if plan.tokenizer is not None:
        lines.append(f"tokenizer -> {TOKENIZER_NAME} (copied from {plan.tokenizer})")
    q = opts.quantization
    size = bundle_size(plan, opts.shard_size)
    on_disk = (f"{human(size)} on disk" if size is not None else
               f"{human(_known_size(plan, opts.shard_size))} on disk + the tokenizer")
    if any(p.stem != "mimi" for p in plan.parts):
        dtype = plan.config.get("dtype") or plan.config.get("vision", {}).get("dtype")
        lines.append(f"this conversion ({dtype}, {q.label if q else 'no quantization'}): "
                     f"{on_disk}")
    else:
        lines.append(f"this conversion (Mimi is always float32): {on_disk}")
    unknown = " (+ the tokenizer)" if size is None else ""
    lines.append("bundle size: " + " | ".join(f"{name} {human(n)}"
                                              for name, n in size_table(opts)) + unknown)
    return lines
