"""Kyutai's language-model checkpoint layouts -> ours.

Our model is described once, by its skeleton (`expected_lm_tensors`: names and shapes from
the `LmConfig`, nothing allocated); each layout is a table of renames from our names to its
own, plus the few real transforms:

    moshi-pytorch     kyutai/moshiko-pytorch-bf16: keys at the top level, audio embeddings
                      `emb.{i}`, heads `linears.{k}`, RMSNorm gains `.alpha` [1, 1, d]
    moshivis-pytorch  kyutai/moshika-vis-pytorch-bf16: the same under `llm.`, `audio_emb.{i}`,
                      `audio_linears.{k}`; the shared cross-attention stored under layer 0
                      (and maybe copied under the others), the image projection under
                      `image_prefix.`, the SigLIP tower under `image_prefix.enc.`
    kyuteye-mlx       kyutai/moshika-vis-mlx (bf16, q8 or q4), made by kyuteye_mlx's converter
                      from the MoshiVis file: no `llm.`, 1-D norm `.weight`s, the
                      cross-attention's q split from k and v as ours, the image projection
                      under `transformer.image_prefix.`, the tower under `img_embedder.`

The PyTorch files fuse what we keep apart: the shared cross-attention's [q; k; v] (ours:
`xa.q_proj` and `xa.kv_proj`, row blocks of it) and the depformer's attention of all 8 steps,
concatenated step-major (ours: one module per step, each a row block). kyuteye_mlx stores one
`depformer.slices.{k}` per step instead, each with a copy of the per-layer norms that all
steps share; Kyutai's quantizer also copies the shared cross-attention under every layer.
Copies are not converted: each must equal its original (checked when converting).

Kyutai's quantized MLX files store every linear and embedding weight as MLX's packed
`weight` + `scales` + `biases`; `source.FloatView` shows them as float tensors, so one
table serves the three files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moshivis_mlx.models.config import ConfigError, check_value
from moshivis_mlx.models.lm import LM, DepformerConfig, LmConfig
from moshivis_mlx.quant import QuantSpec
from moshivis_mlx.sampling import GenerationConfig

from .mapping import Entry, Found, Mapping, about, check_mapping, model_tensors, rename, renames
from .safetensors_io import WeightsError, read_json
from .source import FloatView, Source, infer_quant_spec

MOSHI_PT = "moshi-pytorch"
MOSHIVIS_PT = "moshivis-pytorch"
KYUTEYE_MLX = "kyuteye-mlx"
BUNDLE = "bundle"


def _pytorch(llm: str, emb: str, heads: str) -> list[tuple[str, str]]:
    layer = llm + r"transformer.layers.\1."
    xa = llm + "transformer.layers.0.cross_attention.mha."
    return [
        (r"(text_emb|text_linear)\.weight", llm + r"\1.weight"),
        (r"audio_emb\.(\d+)\.weight", emb + r".\1.weight"),
        (r"out_norm\.weight", llm + "out_norm.alpha"),
        (r"transformer\.layers\.(\d+)\.(norm1|norm2|norm_cross)\.weight", layer + r"\2.alpha"),
        (r"transformer\.layers\.(\d+)\.self_attn\.in_proj\.weight",
         layer + "self_attn.in_proj_weight"),
        (r"transformer\.layers\.(\d+)\.ffn\.(\w+)\.weight", layer + r"gating.\2.weight"),
        (r"transformer\.layers\.(\d+)\.xa_gate\.linear_in\.weight",
         layer + "cross_attention.gate.alpha.0.weight"),
        (r"transformer\.layers\.(\d+)\.xa_gate\.linear_out\.weight",
         layer + "cross_attention.gate.alpha.2.weight"),
        (r"transformer\.(.+)", llm + r"transformer.\1"),
        (r"xa\.(q|kv)_proj\.weight", xa + "in_proj_weight"),  # row blocks, see _rows
        (r"xa\.out_proj\.weight", xa + "out_proj.weight"),
        (r"image_prefix\.norm_xa\.weight", "image_prefix.norm_xa.alpha"),
        (r"depformer\.in_proj\.(\d+)\.weight", r"depformer_in.\1.weight"),
        (r"depformer\.text_emb\.weight", "depformer_text_emb.weight"),
        (r"depformer\.audio_emb\.(\d+)\.weight", r"depformer_emb.\1.weight"),
        (r"depformer\.heads\.(\d+)\.weight", heads + r".\1.weight"),
        (r"depformer\.transformer\.layers\.(\d+)\.(norm1|norm2)\.weight",
         r"depformer.layers.\1.\2.alpha"),
        (r"depformer\.transformer\.layers\.(\d+)\.self_attn(?:\.\d+)?\.in_proj\.weight",
         r"depformer.layers.\1.self_attn.in_proj_weight"),  # per step: row blocks
        (r"depformer\.transformer\.layers\.(\d+)\.self_attn(?:\.\d+)?\.out_proj\.weight",
         r"depformer.layers.\1.self_attn.out_proj.weight"),
        (r"depformer\.transformer\.layers\.(\d+)\.ffn(\.\d+)?\.(\w+)\.weight",
         r"depformer.layers.\1.gating\2.\3.weight"),
    ]


_SLICE_LAYER = r"depformer\.transformer\.layers\.(\d+)"
RENAMES = {
    MOSHI_PT: renames(_pytorch("", "emb", "linears")),
    MOSHIVIS_PT: renames(_pytorch("llm.", "audio_emb", "audio_linears")),
    KYUTEYE_MLX: renames([
        (r"audio_emb\.(\d+)\.weight", r"audio_embs.\1.weight"),
        (r"transformer\.layers\.(\d+)\.ffn\.(\w+)\.weight",
         r"transformer.layers.\1.gating.\2.weight"),
        (r"transformer\.layers\.(\d+)\.xa_gate\.linear_in\.weight",
         r"transformer.layers.\1.cross_attention.gate.alpha.layers.0.weight"),
        (r"transformer\.layers\.(\d+)\.xa_gate\.linear_out\.weight",
         r"transformer.layers.\1.cross_attention.gate.alpha.layers.2.weight"),
        (r"xa\.(\w+)\.weight", r"transformer.layers.0.cross_attention.mha.\1.weight"),
        (r"image_prefix\.(.+)", r"transformer.image_prefix.\1"),
        (r"depformer\.in_proj\.(\d+)\.weight", r"depformer.slices.\1.linear_in.weight"),
        (r"depformer\.text_emb\.weight", "depformer.slices.0.emb.weight"),
        (r"depformer\.audio_emb\.(\d+)\.weight",
         lambda m: f"depformer.slices.{int(m[1]) + 1}.emb.weight"),
        (r"depformer\.heads\.(\d+)\.weight", r"depformer.slices.\1.linear_out.weight"),
        (_SLICE_LAYER + r"\.(norm1|norm2)\.weight",
         r"depformer.slices.0.transformer.layers.\1.\2.weight"),
        (_SLICE_LAYER + r"\.self_attn\.(\d+)\.(.+)",
         r"depformer.slices.\2.transformer.layers.\1.self_attn.\3"),
        (_SLICE_LAYER + r"\.ffn\.(\d+)\.(.+)",
         r"depformer.slices.\2.transformer.layers.\1.gating.\3"),
    ]),
    BUNDLE: [],
}
TOWERS = {MOSHIVIS_PT: "image_prefix.enc.", KYUTEYE_MLX: "img_embedder."}
"""Where a layout keeps the SigLIP tower (the image encoder's, see vision_layout)."""
_STEP = re.compile(r"depformer\.transformer\.layers\.\d+\.self_attn\.(\d+)\.(in|out)_proj\.weight")
_COPIES = [  # (copy, its original)
    (re.compile(r"((?:llm\.)?transformer\.layers\.)[1-9]\d*(\.cross_attention\.mha\..+)"),
     r"\g<1>0\2"),
    (re.compile(r"(depformer\.slices\.)[1-9]\d*(\.transformer\.layers\.\d+\.norm[12]\.weight)"),
     r"\g<1>0\2"),
]


def detect_lm_layout(keys: Iterable[str]) -> str:
    keys = set(keys)
    if "depformer.slices.0.linear_in.weight" in keys or "audio_embs.0.weight" in keys:
        return KYUTEYE_MLX
    if "llm.text_emb.weight" in keys:
        return MOSHIVIS_PT
    if "text_emb.weight" in keys and "emb.0.weight" in keys:
        return MOSHI_PT
    if any(re.fullmatch(r"depformer\.\d+\.emb\.weight", k) for k in keys):
        raise WeightsError(
            "this is Kyutai's Rust (candle) layout; convert the PyTorch or MLX release of the "
            "same model instead (kyutai/moshika-vis-pytorch-bf16, kyutai/moshika-vis-mlx)")
    raise WeightsError(
        "unrecognised language-model checkpoint: expected Kyutai's Moshi "
        "(text_emb.weight, emb.0.weight, ...), MoshiVis (llm.text_emb.weight, ...) or MLX "
        "(audio_embs.0.weight, depformer.slices.0...) keys")


def is_lm(keys: set[str]) -> bool:
    return bool({"text_emb.weight", "llm.text_emb.weight",
                 "depformer.slices.0.linear_in.weight"} & keys)


def expected_lm_tensors(cfg: LmConfig, quant: QuantSpec | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bundle's LM tensors, from the model skeleton (nothing allocated)."""
    return model_tensors(LM(cfg), quant)


def source_name(layout: str, ours: str) -> str:
    return rename(RENAMES[layout], ours)


def _rows(layout: str, dst: str, shape: tuple[int, ...], cfg: LmConfig
          ) -> tuple[int, int] | None:
    """The row block of a fused PyTorch tensor that `dst` is (see the module docstring)."""
    if layout not in (MOSHI_PT, MOSHIVIS_PT):
        return None
    if dst == "xa.q_proj.weight":
        return (0, cfg.dim)
    if dst == "xa.kv_proj.weight":
        return (cfg.dim, 3 * cfg.dim)
    m = _STEP.fullmatch(dst)
    if m:
        k = int(m[1])
        return (k * shape[0], (k + 1) * shape[0])
    return None


def shared_copies(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(copy, original) for every stored copy of a shared tensor whose original is there
    (one whose original is absent is no copy: it is left for the checks to report)."""
    keys = set(keys)
    out = []
    for k in sorted(keys):
        for pattern, repl in _COPIES:
            m = pattern.fullmatch(k)
            if m and m.expand(repl) in keys:
                out.append((k, m.expand(repl)))
    return out


def lm_mapping(shapes: dict[str, tuple[int, ...]], layout: str, cfg: LmConfig,
               stored: Iterable[str] | None = None) -> Mapping:
    """Every tensor of our LM and where it comes from in `layout`; the tower and the copies
    of shared tensors are set aside (copies are found among the `stored` names, by default
    those of `shapes`: a quantized copy's original is a packed triple)."""
    entries = [Entry(dst, source_name(layout, dst), shape, _rows(layout, dst, shape, cfg))
               for dst, shape in expected_lm_tensors(cfg, None).items()]
    tower = TOWERS.get(layout)
    ignored = [k for k in shapes if tower and k.startswith(tower)]
    return Mapping(entries, ignored, shared_copies(shapes if stored is None else stored))


def find_lm(source: Source, kc: dict[str, Any] | None) -> Found:
    """The language model in `source` (any Kyutai layout, float or quantized)."""
    keys = source.keys()
    with about(source.label):
        layout = detect_lm_layout(keys)
        tower = TOWERS.get(layout)
        aside = {c for c, _ in shared_copies(keys)}
        aside |= {k for k in keys if tower and k.startswith(tower)}
        norm = source_name(layout, "out_norm.weight")
        if norm not in keys:
            raise WeightsError(f"missing tensor {norm!r}")
    names = keys - aside
    spec = infer_quant_spec(source, names, source_name(layout, "text_linear.weight"),
                            source.info(norm).shape[-1])
    view = FloatView(source, names, spec)
    shapes = {**source.shapes(aside), **view.shapes}
    with about(source.label):
        cfg = infer_lm_config(shapes, layout, kc)
    mapping = lm_mapping(shapes, layout, cfg, keys)
    check_mapping(mapping, shapes, source.label)
    bad = [f"{c} {list(source.info(c).shape)} vs {o} {list(source.info(o).shape)}"
           for c, o in mapping.copies
           if (source.info(c).shape, source.info(c).dtype)
           != (source.info(o).shape, source.info(o).dtype)]
    if bad:
        raise WeightsError(f"{source.label}: mis-shaped copies of shared tensors: "
                           + "; ".join(bad))
    return Found(layout, cfg, mapping, view)


# -- the config ----------------------------------------------------------------------------

def infer_lm_config(shapes: dict[str, tuple[int, ...]], layout: str,
                    kyutai_config: dict[str, Any] | None = None) -> LmConfig:
    """Every size the shapes determine comes from them (through the layout's renames);
    heads, context and delays from Kyutai's config (flat `lm_kwargs` style) or else the 7B
    defaults. Where both give a size they must agree."""
    kc = dict(kyutai_config or {})

    def shape(ours: str) -> tuple[int, ...]:
        key = source_name(layout, ours)
        if key not in shapes:
            raise WeightsError(f"missing tensor {key!r}")
        return tuple(shapes[key])

    def has(ours: str) -> bool:
        return source_name(layout, ours) in shapes

    def count(template: str) -> int:
        n = 0
        while has(template.format(n)):
            n += 1
        return n

    def given(key: str, default: Any) -> Any:
        return default if kc.get(key) is None else kc[key]

    def pick(key: str, inferred: Any) -> Any:
        if key in kc and kc[key] is not None and kc[key] != inferred:
            raise WeightsError(f"config says {key}={kc[key]} but the weights have {inferred}")
        return inferred

    text_rows, dim = shape("text_emb.weight")
    text_card = shape("text_linear.weight")[0]
    if text_rows != text_card + 1:
        raise WeightsError(f"the text embedding has {text_rows} rows but the text output "
                           f"{text_card}: expected one more (the initial token)")
    defaults = LmConfig()
    dep_dim = shape("depformer.in_proj.0.weight")[0]
    num_heads = kc.get("num_heads") or (defaults.num_heads if dim == defaults.dim else None)
    dep_heads = kc.get("depformer_num_heads") or (
        defaults.depformer.num_heads if dep_dim == defaults.depformer.dim else None)
    if not num_heads or not dep_heads:
        raise WeightsError(
            f"the number of attention heads cannot be read from the weights (dim {dim}, "
            f"depformer dim {dep_dim}): pass Kyutai's config.json with num_heads and "
            f"depformer_num_heads")
    per_step = has("depformer.transformer.layers.0.ffn.0.linear_out.weight")
    dep_ffn = f"depformer.transformer.layers.0.{'ffn.0' if per_step else 'ffn'}.linear_out.weight"
    cross = has("xa.q_proj.weight")
    try:
        return LmConfig(
            dim=pick("dim", dim),
            num_heads=int(num_heads),
            num_layers=pick("num_layers", count("transformer.layers.{}.norm1.weight")),
            ffn_hidden=shape("transformer.layers.0.ffn.linear_out.weight")[1],
            context=int(kc.get("context") or defaults.context),
            max_period=float(kc.get("max_period") or defaults.max_period),
            text_card=pick("text_card", text_card),
            card=pick("audio_card", pick("card", shape("audio_emb.0.weight")[0] - 1)),
            n_q=pick("n_q", count("audio_emb.{}.weight")),
            dep_q=pick("dep_q", count("depformer.heads.{}.weight")),
            delays=list(kc.get("delays") or defaults.delays),
            text_padding_id=given("existing_text_padding_id", given("padding_token_id", 3)),
            end_of_text_padding_id=given("existing_text_end_padding_id", 0),
            depformer=DepformerConfig(
                dim=pick("depformer_dim", dep_dim),
                num_heads=int(dep_heads),
                num_layers=pick("depformer_num_layers",
                                count("depformer.transformer.layers.{}.norm1.weight")),
                ffn_hidden=shape(dep_ffn)[1],
                weights_per_step=per_step,
                multi_linear=has("depformer.in_proj.1.weight"),
            ),
            cross_attention=cross,
            image_dim=shape("image_prefix.proj_xa.weight")[1] if cross else defaults.image_dim,
            xa_gate_hidden=(shape("transformer.layers.0.xa_gate.linear_in.weight")[0] if cross
                            else defaults.xa_gate_hidden),
        )
    except ConfigError as e:  # a bound or a relation: name the file the value came from
        raise ConfigError(f"{kc.get(CONFIG_PATH) or 'the weights'}: {e}") from None


KYUTAI_TYPES: dict[str, Any] = {
    **{k: int for k in ("dim", "num_heads", "num_layers", "context", "text_card", "card",
                        "audio_card", "n_q", "dep_q", "existing_text_padding_id",
                        "existing_text_end_padding_id", "padding_token_id", "depformer_dim",
                        "depformer_num_heads", "depformer_num_layers")},
    "max_period": float,
    "delays": list[int],
    **{k: str for k in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name",
                        "model", "mimi_codec", "text_tokenizer")},
}
"""The keys of Kyutai's config.json that are read, and their types (others are ignored)."""
CONFIG_PATH = "__path__"
"""Where read_kyutai_config found the settings (for messages about them)."""
GEN_TYPES: dict[str, Any] = {"temp_text": float, "top_k_text": int, "temp": float, "top_k": int}
XA_SCOPE: dict[str, tuple[str, ...]] = {"xa_start": ("start", "boi", "eoi"),
                                        "xa_end": ("end", "eoi")}
"""Kyutai's cross-attention scope (MoshiVis' fusion settings): the markers of the first and
last token cross-attention covers, or integers (xa_end counted from xa_start). Not our
generation setting `xa_start`, the steps before the image counts, which a bundle takes
from its own generation settings (and the command line)."""
WHOLE_STREAM: dict[str, tuple[Any, ...]] = {"xa_start": ("start", 0), "xa_end": ("end",)}
"""The scope this port's cross-attention covers: every token (what Kyutai's released
MoshiVis is trained with: xa_start "start", xa_end "end")."""


def check_xa_scope(cfg: dict[str, Any], where: str | Path) -> None:
    """Kyutai's xa_start / xa_end, read for what they mean: a marker or a token index,
    and a scope this port runs as trained, or a ConfigError naming the file and the key."""
    for key, markers in XA_SCOPE.items():
        value = cfg.get(key)
        if value is None:
            continue
        index = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not index and not (isinstance(value, str) and value in markers):
            raise ConfigError(f"{where}: {key}: expected {', '.join(map(repr, markers))} or a "
                              f"token index, got {value!r}")
        if value not in WHOLE_STREAM[key]:
            raise ConfigError(f"{where}: {key}: {value!r} limits cross-attention to part of "
                              f"the stream; this port's covers all of it ({key} "
                              f"{WHOLE_STREAM[key][0]!r}); the steps before the image counts "
                              f"are a generation setting (--xa-start)")


def check_kyutai_types(cfg: dict[str, Any], where: str | Path) -> None:
    """Each key that is read has its type (`"four"` or `true` is no number of heads),
    or a ConfigError naming the file and the key."""
    def check(key: str, value: Any, tp: Any) -> None:
        if value is not None:
            check_value(f"{where}: {key}", value, tp)

    for key, tp in KYUTAI_TYPES.items():
        check(key, cfg.get(key), tp)
    check_xa_scope(cfg, where)
    gen = cfg.get("lm_gen_config")
    if gen is not None:
        if not isinstance(gen, dict):
            raise ConfigError(f"{where}: lm_gen_config: expected a JSON object, got {gen!r}")
        for key, tp in GEN_TYPES.items():
            check(f"lm_gen_config.{key}", gen.get(key), tp)


def read_kyutai_config(path: Path | None) -> dict[str, Any] | None:
    """Kyutai's config.json (flat, or with the model's settings under `lm_kwargs`), its
    types checked."""
    if path is None:
        return None
    cfg = read_json(path)
    if "format_version" in cfg:
        raise WeightsError(f"{path}: this is the config of a moshivis-mlx bundle; convert the "
                           f"bundle with --bundle DIR")
    kwargs = cfg.get("lm_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{path}: lm_kwargs: expected a JSON object, got {kwargs!r}")
    cfg = {**cfg, **kwargs}
    check_kyutai_types(cfg, path)
    return {**cfg, CONFIG_PATH: str(path)}


def kyutai_generation_defaults(kyutai_config: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's generation settings: Kyutai's config's `lm_gen_config` where it gives
    them, else Kyutai's defaults (bounds checked: GenerationConfig). The generation's
    `xa_start` is always the default: the config's xa_start is another thing (XA_SCOPE)."""
    kc = kyutai_config or {}
    d = GenerationConfig()
    gen = kc.get("lm_gen_config") if isinstance(kc.get("lm_gen_config"), dict) else {}

    def get(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        return GenerationConfig.from_dict({
            "text_temperature": get(gen.get("temp_text"), d.text_temperature),
            "text_top_k": get(gen.get("top_k_text"), d.text_top_k),
            "audio_temperature": get(gen.get("temp"), d.audio_temperature),
            "audio_top_k": get(gen.get("top_k"), d.audio_top_k),
            "xa_start": d.xa_start,
        }).to_dict()
    except ConfigError as e:
        raise ConfigError(f"{kc.get(CONFIG_PATH)}: lm_gen_config: {e}") from None
