"""Kyutai's language-model checkpoint layouts -> ours.

Two PyTorch layouts are known: plain Moshi (`kyutai/moshiko-pytorch-bf16`, keys at the
top level, audio embeddings `emb.{i}`) and MoshiVis (`kyutai/moshika-vis-pytorch-bf16`,
the temporal model under `llm.`, audio embeddings `audio_emb.{i}`, the shared
cross-attention stored under layer 0 and the image projection under `image_prefix.`).

A mapping is a list of `Entry`s: where each destination tensor comes from and how (a row
range of a fused tensor, a reshape). The same list drives the conversion, `--dry-run`
and the manifest checks, so what is printed is what is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moshivis_mlx.models.lm import DepformerConfig, LmConfig

from .safetensors_io import WeightsError


@dataclass(frozen=True)
class Entry:
    """Destination `dst` [shape] is rows `rows` of source `src`, reshaped."""

    dst: str
    src: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


@dataclass
class Mapping:
    entries: list[Entry]
    ignored: list[str]
    """Source tensors deliberately not used here (another part of the bundle takes them)."""
    copies: list[tuple[str, str]] = field(default_factory=list)
    """(copy, original): stored copies of one shared tensor (the cross-attention under every
    layer). Only the original is converted; each copy must hold exactly its data."""


MOSHI_PT = "moshi-pytorch"
MOSHIVIS_PT = "moshivis-pytorch"


def detect_lm_layout(keys: set[str] | list[str]) -> str:
    keys = set(keys)
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


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.fullmatch(k))}
    n = len(found)
    if found and found != set(range(n)):
        raise WeightsError(f"indices of {pattern!r} are not contiguous: {sorted(found)}")
    return n


def _names(layout: str) -> dict[str, str]:
    """Source-name templates of the layout."""
    if layout == MOSHI_PT:
        llm, audio_emb, heads = "", "emb.{i}", "linears.{k}"
    elif layout == MOSHIVIS_PT:
        llm, audio_emb, heads = "llm.", "audio_emb.{i}", "audio_linears.{k}"
    else:
        raise WeightsError(f"unknown layout {layout}")
    return {
        "text_emb": llm + "text_emb.weight",
        "audio_emb": audio_emb + ".weight",
        "text_linear": llm + "text_linear.weight",
        "out_norm": llm + "out_norm.alpha",
        "layer": llm + "transformer.layers.{l}.",
        "depformer_in": "depformer_in.{k}.weight",
        "depformer_emb": "depformer_emb.{k}.weight",
        "depformer_text_emb": "depformer_text_emb.weight",
        "dep_layer": "depformer.layers.{l}.",
        "heads": heads + ".weight",
    }


def _shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(f"missing tensor {key!r}")
    return tuple(shapes[key])


def count_indices(keys: set[str], pattern: str) -> int:
    """How many contiguous indices 0..n-1 the regex `pattern` (one group) finds among keys."""
    return _count(keys, pattern)


def _measure_pytorch(shapes: dict[str, tuple[int, ...]], layout: str) -> dict[str, Any]:
    """What Kyutai's PyTorch layouts tell of the model through their tensor shapes."""
    n = _names(layout)
    keys = set(shapes)
    text_rows, dim = _shape(shapes, n["text_emb"])
    layer = n["layer"]
    dep_q = _count(keys, re.escape(n["heads"]).replace(r"\{k\}", r"(\d+)"))
    dep_dim = _shape(shapes, n["depformer_in"].format(k=0))[0]
    dep_in_rows = _shape(shapes, "depformer.layers.0.self_attn.in_proj_weight")[0]
    weights_per_step = dep_in_rows // (3 * dep_dim)
    if weights_per_step not in (1, dep_q):
        raise WeightsError(f"depformer in_proj has {dep_in_rows} rows: neither 1 nor {dep_q} steps")
    dep_gating = "depformer.layers.0.gating.0.linear_out.weight"
    if weights_per_step == 1:
        dep_gating = "depformer.layers.0.gating.linear_out.weight"
    cross = layout == MOSHIVIS_PT
    m = {
        "dim": dim,
        "text_rows": text_rows,
        "text_card": _shape(shapes, n["text_linear"])[0],
        "n_q": _count(keys, re.escape(n["audio_emb"]).replace(r"\{i\}", r"(\d+)")),
        "card": _shape(shapes, n["audio_emb"].format(i=0))[0] - 1,
        "num_layers": _count(keys, re.escape(layer).replace(r"\{l\}", r"(\d+)") + r"norm1\.alpha"),
        "ffn_hidden": _shape(shapes, layer.format(l=0) + "gating.linear_out.weight")[1],
        "dep_q": dep_q,
        "dep_dim": dep_dim,
        "dep_layers": _count(keys, r"depformer\.layers\.(\d+)\.norm1\.alpha"),
        "dep_ffn_hidden": _shape(shapes, dep_gating)[1],
        "weights_per_step": weights_per_step > 1,
        "multi_linear": _count(keys, r"depformer_in\.(\d+)\.weight") > 1,
        "cross_attention": cross,
    }
    if cross:
        m["xa_gate_hidden"] = _shape(
            shapes, layer.format(l=0) + "cross_attention.gate.alpha.0.weight")[0]
        m["image_dim"] = _shape(shapes, "image_prefix.proj_xa.weight")[1]
    return m


def infer_lm_config(
    shapes: dict[str, tuple[int, ...]],
    layout: str,
    kyutai_config: dict[str, Any] | None = None,
) -> LmConfig:
    """Everything the shapes determine comes from them; the rest from Kyutai's config
    (flat `lm_kwargs` style, MoshiVis extras allowed) or else the 7B defaults."""
    return config_from_measured(_measure_pytorch(shapes, layout), kyutai_config)


def config_from_measured(m: dict[str, Any], kyutai_config: dict[str, Any] | None) -> LmConfig:
    """The LM config from measured sizes (`_measure_pytorch` and its kin) and Kyutai's config:
    where both give a size they must agree; the config alone gives heads, context, delays."""
    kc = dict(kyutai_config or {})

    def pick(key: str, inferred: Any) -> Any:
        if key in kc and kc[key] is not None and kc[key] != inferred:
            raise WeightsError(f"config says {key}={kc[key]} but the weights have {inferred}")
        return inferred

    if m["text_rows"] != m["text_card"] + 1:
        raise WeightsError(f"the text embedding has {m['text_rows']} rows but the text output "
                           f"{m['text_card']}: expected one more (the initial token)")
    defaults = LmConfig()
    dim, dep_dim = m["dim"], m["dep_dim"]
    num_heads = kc.get("num_heads") or (defaults.num_heads if dim == defaults.dim else None)
    dep_heads = kc.get("depformer_num_heads") or (
        defaults.depformer.num_heads if dep_dim == defaults.depformer.dim else None)
    if not num_heads or not dep_heads:
        raise WeightsError(
            f"the number of attention heads cannot be read from the weights (dim {dim}, "
            f"depformer dim {dep_dim}): pass Kyutai's config.json with num_heads and "
            f"depformer_num_heads")
    card = pick("audio_card", pick("card", m["card"]))
    cross = m["cross_attention"]
    return LmConfig(
        dim=pick("dim", dim),
        num_heads=int(num_heads),
        num_layers=pick("num_layers", m["num_layers"]),
        ffn_hidden=m["ffn_hidden"],
        context=int(kc.get("context") or defaults.context),
        max_period=float(kc.get("max_period") or defaults.max_period),
        text_card=pick("text_card", m["text_card"]),
        card=card,
        n_q=pick("n_q", m["n_q"]),
        dep_q=pick("dep_q", m["dep_q"]),
        delays=list(kc.get("delays") or defaults.delays),
        text_padding_id=int(kc.get("existing_text_padding_id", kc.get("padding_token_id", 3))),
        end_of_text_padding_id=int(kc.get("existing_text_end_padding_id", 0)),
        depformer=DepformerConfig(
            dim=pick("depformer_dim", dep_dim),
            num_heads=int(dep_heads),
            num_layers=pick("depformer_num_layers", m["dep_layers"]),
            ffn_hidden=m["dep_ffn_hidden"],
            weights_per_step=m["weights_per_step"],
            multi_linear=m["multi_linear"],
        ),
        cross_attention=cross,
        image_dim=m.get("image_dim", defaults.image_dim) if cross else defaults.image_dim,
        xa_gate_hidden=m.get("xa_gate_hidden", defaults.xa_gate_hidden) if cross
        else defaults.xa_gate_hidden,
    )


def lm_mapping(shapes: dict[str, tuple[int, ...]], layout: str, cfg: LmConfig) -> Mapping:
    """Every destination tensor of our LM and where it comes from."""
    n = _names(layout)
    entries: list[Entry] = []
    d, dd = cfg.dim, cfg.depformer.dim

    def add(dst: str, src: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None):
        entries.append(Entry(dst, src, tuple(shape), rows))

    add("text_emb.weight", n["text_emb"], (cfg.text_card + 1, d))
    for i in range(cfg.n_q):
        add(f"audio_emb.{i}.weight", n["audio_emb"].format(i=i), (cfg.card + 1, d))
    add("text_linear.weight", n["text_linear"], (cfg.text_card, d))
    add("out_norm.weight", n["out_norm"], (d,))
    for i in range(cfg.num_layers):
        src, dst = n["layer"].format(l=i), f"transformer.layers.{i}."
        add(dst + "self_attn.in_proj.weight", src + "self_attn.in_proj_weight", (3 * d, d))
        add(dst + "self_attn.out_proj.weight", src + "self_attn.out_proj.weight", (d, d))
        add(dst + "norm1.weight", src + "norm1.alpha", (d,))
        add(dst + "norm2.weight", src + "norm2.alpha", (d,))
        add(dst + "ffn.linear_in.weight", src + "gating.linear_in.weight", (2 * cfg.ffn_hidden, d))
        add(dst + "ffn.linear_out.weight", src + "gating.linear_out.weight", (d, cfg.ffn_hidden))
        if cfg.cross_attention:
            g = cfg.xa_gate_hidden
            add(dst + "norm_cross.weight", src + "norm_cross.alpha", (d,))
            gate = src + "cross_attention.gate.alpha."
            add(dst + "xa_gate.linear_in.weight", gate + "0.weight", (g, d))
            add(dst + "xa_gate.linear_out.weight", gate + "2.weight", (d, g))
    ignored: list[str] = []
    copies: list[tuple[str, str]] = []
    if cfg.cross_attention:
        xa = n["layer"].format(l=0) + "cross_attention.mha."
        add("xa.q_proj.weight", xa + "in_proj_weight", (d, d), (0, d))
        add("xa.kv_proj.weight", xa + "in_proj_weight", (2 * d, d), (d, 3 * d))
        add("xa.out_proj.weight", xa + "out_proj.weight", (d, d))
        add("image_prefix.proj_xa.weight", "image_prefix.proj_xa.weight", (d, cfg.image_dim))
        add("image_prefix.proj_xa.bias", "image_prefix.proj_xa.bias", (d,))
        add("image_prefix.norm_xa.weight", "image_prefix.norm_xa.alpha", (d,))
        # The shared module may also be saved under every layer: those are copies.
        for i in range(1, cfg.num_layers):
            for name in ("in_proj_weight", "out_proj.weight"):
                key = n["layer"].format(l=i) + "cross_attention.mha." + name
                if key in shapes:
                    copies.append((key, xa + name))
        # The SigLIP tower stored with the model is the image encoder's (vision_layout).
        ignored += [k for k in shapes if k.startswith("image_prefix.enc.")]

    dep = cfg.depformer
    steps = cfg.dep_q if dep.weights_per_step else 1
    for k in range(cfg.dep_q if dep.multi_linear else 1):
        add(f"depformer.in_proj.{k}.weight", n["depformer_in"].format(k=k), (dd, d))
    add("depformer.text_emb.weight", n["depformer_text_emb"], (cfg.text_card + 1, dd))
    for k in range(cfg.dep_q - 1):
        add(f"depformer.audio_emb.{k}.weight", n["depformer_emb"].format(k=k), (cfg.card + 1, dd))
    for i in range(dep.num_layers):
        src, dst = n["dep_layer"].format(l=i), f"depformer.transformer.layers.{i}."
        add(dst + "norm1.weight", src + "norm1.alpha", (dd,))
        add(dst + "norm2.weight", src + "norm2.alpha", (dd,))
        for k in range(steps):
            sd = f"{dst}self_attn.{k}." if steps > 1 else dst + "self_attn."
            fd = f"{dst}ffn.{k}." if steps > 1 else dst + "ffn."
            fs = f"{src}gating.{k}." if steps > 1 else src + "gating."
            add(sd + "in_proj.weight", src + "self_attn.in_proj_weight", (3 * dd, dd),
                (3 * dd * k, 3 * dd * (k + 1)))
            add(sd + "out_proj.weight", src + "self_attn.out_proj.weight", (dd, dd),
                (dd * k, dd * (k + 1)))
            add(fd + "linear_in.weight", fs + "linear_in.weight", (2 * dep.ffn_hidden, dd))
            add(fd + "linear_out.weight", fs + "linear_out.weight", (dd, dep.ffn_hidden))
    for k in range(cfg.dep_q):
        add(f"depformer.heads.{k}.weight", n["heads"].format(k=k), (cfg.card, dd))
    return Mapping(entries, ignored, copies)


def check_mapping(mapping: Mapping, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every source tensor used or deliberately ignored, every entry's source present and of
    a shape that gives the destination; else one error listing all the problems."""
    used = {e.src for e in mapping.entries} | set(mapping.ignored)
    used |= {c for c, _ in mapping.copies}
    missing = sorted({e.src for e in mapping.entries if e.src not in shapes})
    unexpected = sorted(set(shapes) - used)
    bad = []
    for e in mapping.entries:
        if e.src not in shapes:
            continue
        src = tuple(shapes[e.src])
        rows = src[0] if src else 0
        lo, hi = e.rows if e.rows else (0, rows)
        sliced = (hi - lo,) + src[1:] if e.rows else src
        if hi > rows or _numel(sliced) != _numel(e.shape):
            bad.append(f"{e.src} {list(src)} -> {e.dst} {list(e.shape)}")
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected, ', ')}")
    if bad:
        problems.append(f"mis-shaped tensors: {listing(bad, '; ')}")
    if problems:
        raise WeightsError(f"{what}: " + " | ".join(problems))


def listing(items: list[str], sep: str, limit: int = 8) -> str:
    """The first `limit` items and how many more (an error message stays readable)."""
    head = sep.join(items[:limit])
    return head if len(items) <= limit else f"{head}{sep}... ({len(items) - limit} more)"


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
