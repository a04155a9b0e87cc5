"""Kyutai checkpoints (or one of our bundles) -> a moshivis-mlx bundle directory.

Planning reads headers only: every source file is validated, its layout recognised, every
tensor mapped (nothing missing, nothing left over, every shape right) and every output
tensor named and sized before a byte of data is read (`plan_conversion`; `--dry-run`
prints that plan). Then the data checks run (copies of shared tensors equal, Mimi's
codebooks trained), and the parts are written tensor by tensor, in shards (see plan.py),
into a temporary directory renamed into place only when complete: an interrupted
conversion leaves nothing behind, and an existing bundle is only replaced with `force`.

Sources and how they are recognised (by their tensor names):

    moshi-pytorch     Kyutai's Moshi (kyutai/moshiko-pytorch-bf16, moshika-pytorch-bf16)
    moshivis-pytorch  Kyutai's MoshiVis (kyutai/moshika-vis-pytorch-bf16), tower included
    kyuteye-mlx       Kyutai's MLX MoshiVis (kyutai/moshika-vis-mlx), bf16, q8 or q4
    bundle            one of ours (config.json): re-quantized, dequantized or re-typed
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from moshivis_mlx.bundle import DTYPES, read_config, weight_files, write_config
from moshivis_mlx.errors import BundleError
from moshivis_mlx.models.lm import LM, LmConfig
from moshivis_mlx.models.mimi import MimiConfig
from moshivis_mlx.models.siglip import SiglipConfig
from moshivis_mlx.quant import quantize_model, quantized_paths
from moshivis_mlx.sampling import GenerationConfig

from .lm_layout import Entry, Mapping, check_mapping, detect_lm_layout, infer_lm_config, lm_mapping
from .mimi_layout import (
    check_codebooks_trained,
    is_mimi,
    mimi_config_from_kyutai,
    mimi_part,
    plan_mimi,
)
from .mlx_layout import (
    KYUTEYE_MLX,
    infer_kyuteye_config,
    is_kyuteye_mlx,
    kyuteye_mapping,
    lm_keys,
    shared_copies,
)
from .plan import (
    DEFAULT_SHARD_SIZE,
    Part,
    Progress,
    copy_jobs,
    describe_part,
    entry_jobs,
    human,
    write_part,
)
from .safetensors_io import WeightsError, read_json_config
from .source import FloatView, QuantSpec, Source, infer_quant_spec
from .vision_convert import (
    VisionPlan,
    has_vision_tower,
    plan_bundle_vision,
    plan_vision,
    read_vision_config,
    vision_part,
    vision_quantization,
    vision_section,
)

Quantization = QuantSpec
"""Blockwise affine quantization: `Quantization(bits=8, group_size=64)`."""

TOKENIZER_NAME = "tokenizer.model"
BUNDLE = "bundle"
SIZE_PRESETS = (("bfloat16", None), ("q8", 8), ("q4", 4))


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
    quantization: Quantization | None = field(default_factory=Quantization)
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


# -- configs ----------------------------------------------------------------------------

def read_kyutai_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    cfg = read_json_config(path)
    if "format_version" in cfg:
        raise WeightsError(f"{path}: this is the config of a moshivis-mlx bundle; convert the "
                           f"bundle with --bundle DIR")
    # Kyutai's repos nest the model kwargs under lm_kwargs in some versions.
    return {**cfg, **cfg.get("lm_kwargs", {})}


def kyutai_generation_defaults(kyutai_config: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's generation settings: Kyutai's config's `lm_gen_config` and `xa_start`
    where it gives them, else Kyutai's defaults."""
    kc = kyutai_config or {}
    d = GenerationConfig()
    xa_start = kc.get("xa_start")
    gen = kc.get("lm_gen_config") if isinstance(kc.get("lm_gen_config"), dict) else {}
    return GenerationConfig(
        text_temperature=float(gen.get("temp_text", d.text_temperature)),
        text_top_k=int(gen.get("top_k_text", d.text_top_k)),
        audio_temperature=float(gen.get("temp", d.audio_temperature)),
        audio_top_k=int(gen.get("top_k", d.audio_top_k)),
        xa_start=xa_start if isinstance(xa_start, int) else d.xa_start,
    ).to_dict()


def expected_lm_tensors(cfg: LmConfig, quant: Quantization | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's LM tensors, from the model skeleton (nothing allocated)."""
    model = LM(cfg)
    if quant:
        quantize_model(model, quant)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_tokenizer(path: Path) -> None:
    """A SentencePiece model (a protobuf whose first field is the pieces), not, say, an
    HTML error page saved under its name."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        head = f.read(1)
    if head != b"\x0a":
        raise WeightsError(f"{path}: not a SentencePiece model (expected Kyutai's "
                           f"tokenizer_spm_32k_3.model)")


# -- the output directory ----------------------------------------------------------------

@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed to `out` on success, removed otherwise."""
    out = Path(out)
    if out.exists() and not force:
        raise WeightsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- planning ----------------------------------------------------------------------------

def _lm_plan(source: Source, kc: dict[str, Any] | None
             ) -> tuple[LmConfig, Mapping, FloatView, str]:
    """Layout, config, checked mapping and view of the language model in `source`."""
    keys = source.keys()
    if is_kyuteye_mlx(keys):
        layout = KYUTEYE_MLX
        names = lm_keys(keys)
        copies = shared_copies(names)
        names -= {c for c, _ in copies}
        if "out_norm.weight" not in names:
            raise WeightsError(f"{source.label}: missing tensor 'out_norm.weight'")
        spec = infer_quant_spec(source, names, "text_linear.weight",
                                source.info("out_norm.weight").shape[0])
        view = FloatView(source, names, spec)
        try:
            cfg = infer_kyuteye_config(view.shapes, kc)
        except WeightsError as e:
            raise WeightsError(f"{source.label}: {e}") from None
        mapping = kyuteye_mapping(view.shapes, cfg)
        mapping.copies = copies
    else:
        try:
            layout = detect_lm_layout(keys)
            view = FloatView(source, keys, None)
            cfg = infer_lm_config(view.shapes, layout, kc)
        except WeightsError as e:
            raise WeightsError(f"{source.label}: {e}") from None
        mapping = lm_mapping(view.shapes, layout, cfg)
    check_mapping(mapping, view.shapes, source.label)
    bad = [f"{c} {list(source.info(c).shape)} vs {o} {list(source.info(o).shape)}"
           for c, o in mapping.copies
           if (source.info(c).shape, source.info(c).dtype)
           != (source.info(o).shape, source.info(o).dtype)]
    if bad:
        raise WeightsError(f"{source.label}: mis-shaped copies of shared tensors: "
                           + "; ".join(bad))
    return cfg, mapping, view, layout


def check_copies(source: Source, copies: list[tuple[str, str]]) -> None:
    """Every stored copy of a shared tensor holds exactly the original's data."""
    differ = [c for c, o in copies if not source.same_bytes(c, o)]
    if differ:
        raise WeightsError(
            f"{source.label}: {len(differ)} copies of shared tensors differ from the original "
            f"(the cross-attention is shared by all layers, the depformer norms by all "
            f"steps): {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}")


def _lm_part(cfg: LmConfig, mapping: Mapping, view: FloatView, dtype_name: str,
             quant: Quantization | None, tower_title: str) -> Part:
    qpaths = quantized_paths(LM(cfg), quant.group_size) if quant else set()
    jobs = entry_jobs(mapping.entries, view, DTYPES[dtype_name], quant, qpaths)
    return Part("model", "language model", jobs, view, list(mapping.copies),
                {k: tower_title for k in mapping.ignored})


def _lm_section(cfg: LmConfig, dtype_name: str, quant: Quantization | None) -> dict[str, Any]:
    return {
        "model_type": "moshivis" if cfg.cross_attention else "moshi",
        "lm": cfg.to_dict(),
        "dtype": dtype_name,
        "quantization": quant.to_dict() if quant else None,
    }


def _manifest_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def plan_conversion(opts: ConvertOptions) -> Plan:
    """The whole conversion, from headers (or a manifest) only; raises on any bad input."""
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise WeightsError(f"unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})")
    if opts.bundle is not None:
        return _plan_bundle(opts)
    dtype_name = opts.dtype or "bfloat16"
    quant = opts.quantization
    kc = read_kyutai_config(opts.kyutai_config)
    vision_hf = read_vision_config(opts.vision_config)
    mimi_config: Path | MimiConfig | None = opts.mimi_config
    weights = (opts.moshi_weights, opts.mimi_weights, opts.vision_weights)
    lm_src = mimi_src = vision_src = None
    if opts.manifest is not None:
        if any(w is not None for w in weights):
            raise WeightsError("--manifest describes the weights: give no weights files with it")
        src = Source.from_manifest(opts.manifest)
        doc = _manifest_doc(opts.manifest)
        keys = src.keys()
        if is_kyuteye_mlx(keys) or {"text_emb.weight", "llm.text_emb.weight"} & keys:
            lm_src = src
            kc = kc if kc is not None else doc.get("lm_kwargs")
        if is_mimi(keys):
            mimi_src = src
            if mimi_config is None and isinstance(doc.get("mimi_config"), dict):
                mimi_config = mimi_config_from_kyutai(doc["mimi_config"])
        if has_vision_tower(src):
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
        if opts.moshi_weights is not None:
            lm_src = _open(opts.moshi_weights)
        if opts.mimi_weights is not None:
            mimi_src = _open(opts.mimi_weights)
        if opts.vision_weights is not None:
            vision_src = _open(opts.vision_weights)
        elif lm_src is not None and has_vision_tower(lm_src):
            vision_src = lm_src
    if vision_src is None and opts.vision_config is not None:
        raise WeightsError("--vision-config given but no vision tower to convert "
                           "(give --vision-weights)")
    tokenizer = Path(opts.tokenizer) if opts.tokenizer is not None else None
    if tokenizer is not None:
        check_tokenizer(tokenizer)

    parts: list[Part] = []
    checks: list[Callable[[], None]] = []
    found: list[str] = []
    config: dict[str, Any] = {}
    source_info: dict[str, Any] = dict(opts.origin)
    # Every part is planned before anything is written: bad inputs fail first.
    lm = _lm_plan(lm_src, kc) if lm_src is not None else None
    vision = plan_vision(vision_src, vision_hf) if vision_src is not None else None
    mimi = plan_mimi(mimi_src, mimi_config) if mimi_src is not None else None
    if lm is not None:
        cfg, mapping, view, layout = lm
        if vision is not None and cfg.cross_attention and cfg.image_dim != vision.cfg.dim:
            raise WeightsError(f"the language model takes {cfg.image_dim}-wide image tokens, "
                               f"the vision tower makes {vision.cfg.dim}")
        tower_title = "image encoder" if vision is not None and vision.source is lm_src \
            else "nothing (not converted)"
        parts.append(_lm_part(cfg, mapping, view, dtype_name, quant, tower_title))
        if mapping.copies and lm_src.has_data:
            checks.append(lambda: check_copies(lm_src, mapping.copies))
        config.update(_lm_section(cfg, dtype_name, quant))
        config["generation"] = kyutai_generation_defaults(kc)
        kind = "MoshiVis" if cfg.cross_attention else "Moshi"
        quantized = f", stored {view.spec.label}" if view.spec else ""
        found.append(f"language model: {kind}, {layout} layout{quantized} ({lm_src.label})")
        source_info.update({"layout": layout, "lm_weights": Path(lm_src.label).name})
        if opts.kyutai_config is not None:
            source_info["kyutai_config"] = Path(opts.kyutai_config).name
    if vision is not None:
        vquant = vision_quantization(quant.to_dict() if quant else None, opts.vision_float)
        parts.append(vision_part(vision, DTYPES[dtype_name], vquant))
        config["vision"] = vision_section(vision, dtype_name, vquant)
        found.append(f"image encoder: SigLIP, {vision.layout} layout ({vision.source.label})")
    if mimi is not None:
        mcfg, mmapping, mview = mimi
        parts.append(mimi_part(mmapping, mview))
        if mimi_src.has_data:
            checks.append(lambda: check_codebooks_trained(mmapping, mview, mimi_src.label))
        config["mimi"] = mcfg.to_dict()
        source_info["mimi_weights"] = Path(mimi_src.label).name
        found.append(f"Mimi codec ({mimi_src.label})")
    if tokenizer is not None:
        source_info["tokenizer"] = tokenizer.name
    config["tokenizer"] = TOKENIZER_NAME if tokenizer is not None else None
    config["source"] = source_info
    config["converter"] = _converter()
    return Plan(parts, config, tokenizer, checks, found)


def _open(weights: Path | Source) -> Source:
    """A weights file's validated table (or a table already read: a remote header)."""
    return weights if isinstance(weights, Source) else Source.from_files([Path(weights)])


def _label(x: Path | Source | None) -> str | None:
    return x.label if isinstance(x, Source) else (str(x) if x is not None else None)


def _converter() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("moshivis-mlx")
    except PackageNotFoundError:
        v = "unknown"
    return {"name": "moshivis-convert", "version": v}


def _bundle_source(bundle: Path, stem: str) -> Source:
    try:
        return Source.from_files(weight_files(bundle, stem), f"{bundle}/{stem}.safetensors")
    except BundleError as e:
        raise WeightsError(str(e)) from None


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
    try:
        bcfg = read_config(bundle)
    except BundleError as e:
        raise WeightsError(str(e)) from None
    quant = opts.quantization
    config = {k: v for k, v in bcfg.items() if k != "format_version"}
    parts: list[Part] = []
    found: list[str] = []
    if "lm" in bcfg:
        source = _bundle_source(bundle, "model")
        dtype_name = opts.dtype or bcfg.get("dtype") or "bfloat16"
        q = bcfg.get("quantization")
        view = FloatView(source, source.keys(), QuantSpec(**q) if q else None)
        try:
            cfg = LmConfig.from_dict(bcfg["lm"])
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{bundle}/config.json: invalid lm section ({e})") from None
        names = expected_lm_tensors(cfg, None)
        mapping = Mapping([Entry(k, k, v) for k, v in names.items()], [])
        check_mapping(mapping, view.shapes, source.label)
        parts.append(_lm_part(cfg, mapping, view, dtype_name, quant, ""))
        config.update(_lm_section(cfg, dtype_name, quant))
        found.append(f"language model: {config['model_type']}, bundle layout"
                     + (f", stored {view.spec.label}" if view.spec else ""))
    if bcfg.get("vision"):
        section = bcfg["vision"]
        source = _bundle_source(bundle, "vision")
        try:
            vcfg = SiglipConfig.from_dict(section["siglip"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{bundle}/config.json: invalid vision section ({e})") from None
        vplan: VisionPlan = plan_bundle_vision(source, vcfg, section.get("quantization"))
        vdtype = opts.dtype or section.get("dtype") or "bfloat16"
        vquant = vision_quantization(quant.to_dict() if quant else None, opts.vision_float)
        parts.append(vision_part(vplan, DTYPES[vdtype], vquant))
        config["vision"] = {**vision_section(vplan, vdtype, vquant),
                            "source": section.get("source")}
        found.append("image encoder: SigLIP, bundle layout")
    if "mimi" in bcfg:
        source = _bundle_source(bundle, "mimi")
        view = FloatView(source, source.keys(), None)
        parts.append(Part("mimi", "Mimi codec", copy_jobs(view, sorted(view.shapes)), view))
        found.append("Mimi codec (copied)")
    if not parts:
        raise WeightsError(f"{bundle}: the bundle holds no model")
    tokenizer = bundle / TOKENIZER_NAME
    tokenizer = tokenizer if tokenizer.exists() else None
    config["tokenizer"] = TOKENIZER_NAME if tokenizer is not None else None
    config["source"] = {**opts.origin, "layout": BUNDLE, "bundle": bundle.name,
                        "from": bcfg.get("source")}
    config["converter"] = _converter()
    return Plan(parts, config, tokenizer, [], found)


# -- doing -------------------------------------------------------------------------------

def convert(opts: ConvertOptions, progress: Progress | None = None) -> Path:
    """Writes the bundle; returns its path."""
    if opts.manifest is not None:
        raise WeightsError("a manifest holds no data: use it with --dry-run")
    if opts.out is None:
        raise WeightsError("no output directory given (--out DIR)")
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise WeightsError(f"{out} already exists (use --force to replace it)")
    plan = plan_conversion(opts)
    for check in plan.checks:
        check()
    with staging_dir(out, opts.force) as tmp:
        for part in plan.parts:
            write_part(part, tmp, opts.shard_size, progress)
        if plan.tokenizer is not None:
            shutil.copyfile(plan.tokenizer, tmp / TOKENIZER_NAME)
        write_config(tmp, plan.config)
    return out


def size_table(opts: ConvertOptions) -> list[tuple[str, int]]:
    """The bundle's size at bfloat16, q8 and q4 (group size of `opts`), and as asked."""
    group = opts.quantization.group_size if opts.quantization else 64
    rows = []
    for label, bits in SIZE_PRESETS:
        q = Quantization(bits, group) if bits else None
        name = label if bits is None else f"{label} (group {group})"
        rows.append((name, plan_conversion(replace(opts, dtype="bfloat16", quantization=q)).nbytes))
    return rows


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
    if any(p.stem != "mimi" for p in plan.parts):
        what = f"{q.label}" if q else "no quantization"
        dtype = plan.config.get("dtype") or plan.config.get("vision", {}).get("dtype")
        lines.append(f"this conversion ({dtype}, {what}): {human(plan.nbytes)}")
    else:
        lines.append(f"this conversion (Mimi is always float32): {human(plan.nbytes)}")
    lines.append("bundle size: " + " | ".join(f"{name} {human(n)}"
                                              for name, n in size_table(opts)))
    return lines
