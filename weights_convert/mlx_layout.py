"""Kyutai's MLX checkpoint layout (kyuteye_mlx: `kyutai/moshika-vis-mlx`) -> ours.

What kyuteye_mlx's converter did to the MoshiVis PyTorch checkpoint, and how we undo it:

* the LM lost its `llm.` prefix; audio embeddings are `audio_embs.{i}`; RMSNorm gains are
  1-D `.weight` [d] (PyTorch: `.alpha` [1, 1, d]); the FFN is `gating.linear_in/out`;
* the shared cross-attention is `transformer.layers.0.cross_attention.mha.{q_proj,kv_proj,
  out_proj}` (q split from k, v, as ours); the per-layer gate is `gate.alpha.layers.{0,2}`;
  Kyutai's quantizer (quantize.py) stores copies of the shared module under layers 1..n-1
  (all but `kv_proj.weight`): they must equal layer 0's, which alone is converted;
* the image projection is `transformer.image_prefix.{proj_xa,norm_xa}`, and the SigLIP
  tower is `img_embedder.model.*` (see vision_layout);
* the depth transformer is one `depformer.slices.{k}` per codebook k: `linear_in` (ours:
  `depformer.in_proj.{k}`), `emb` (slice 0: the text table, slice k: audio table k-1),
  `linear_out` (ours: `depformer.heads.{k}`) and a whole transformer holding step k's
  attention and FFN weights. The per-layer norms, shared by all steps in PyTorch and in
  ours, were copied into every slice: slice 0's are converted, the others must equal them.

Kyutai also ships the same layout quantized (`model.q8.safetensors`: 8 bits, groups of 64;
`model.q4.safetensors`: 4 bits, groups of 32, as its server loads them): every linear and
embedding weight as MLX's packed `weight` + `scales` + `biases`. `source.FloatView` shows
those as float tensors, so this mapping serves all three files.
"""

from __future__ import annotations

import re
from typing import Any

from moshivis_mlx.models.lm import LmConfig

from .lm_layout import Entry, Mapping, _shape, config_from_measured, count_indices
from .safetensors_io import WeightsError

KYUTEYE_MLX = "kyuteye-mlx"
TOWER_PREFIX = "img_embedder."
SHARED_XA = re.compile(r"transformer\.layers\.(\d+)\.cross_attention\.mha\.(.+)")
SLICE_NORM = re.compile(r"depformer\.slices\.(\d+)\.(transformer\.layers\.\d+\.norm[12]\.weight)")


def is_kyuteye_mlx(keys: set[str] | list[str]) -> bool:
    keys = set(keys)
    return "depformer.slices.0.linear_in.weight" in keys or "audio_embs.0.weight" in keys


def shared_copies(keys: set[str]) -> list[tuple[str, str]]:
    """(copy, original) for every stored copy of a shared tensor (see the module docstring).
    A copy whose original is absent is no copy: it is left for the checks to report."""
    out = []
    for k in sorted(keys):
        m = SHARED_XA.fullmatch(k)
        if m and m.group(1) != "0":
            original = f"transformer.layers.0.cross_attention.mha.{m.group(2)}"
            if original in keys:
                out.append((k, original))
            continue
        m = SLICE_NORM.fullmatch(k)
        if m and m.group(1) != "0":
            original = f"depformer.slices.0.{m.group(2)}"
            if original in keys:
                out.append((k, original))
    return out


def lm_keys(keys: set[str]) -> set[str]:
    """The LM's tensors: all but the SigLIP tower's."""
    return {k for k in keys if not k.startswith(TOWER_PREFIX)}


def infer_kyuteye_config(shapes: dict[str, tuple[int, ...]],
                         kyutai_config: dict[str, Any] | None = None) -> LmConfig:
    """The LM config from the (float) shapes of this layout, copies excluded."""
    keys = set(shapes)
    dim = _shape(shapes, "out_norm.weight")[0]
    text_rows, emb_dim = _shape(shapes, "text_emb.weight")
    if emb_dim != dim:
        raise WeightsError(f"text_emb.weight is {emb_dim} wide but out_norm.weight {dim}")
    slice0 = "depformer.slices.0."
    cross = "transformer.layers.0.cross_attention.mha.q_proj.weight" in keys
    m: dict[str, Any] = {
        "dim": dim,
        "text_rows": text_rows,
        "text_card": _shape(shapes, "text_linear.weight")[0],
        "n_q": count_indices(keys, r"audio_embs\.(\d+)\.weight"),
        "card": _shape(shapes, "audio_embs.0.weight")[0] - 1,
        "num_layers": count_indices(keys, r"transformer\.layers\.(\d+)\.norm1\.weight"),
        "ffn_hidden": _shape(shapes, "transformer.layers.0.gating.linear_out.weight")[1],
        "dep_q": count_indices(keys, r"depformer\.slices\.(\d+)\.linear_in\.weight"),
        "dep_dim": _shape(shapes, slice0 + "linear_in.weight")[0],
        "dep_layers": count_indices(
            keys, r"depformer\.slices\.0\.transformer\.layers\.(\d+)\.norm1\.weight"),
        "dep_ffn_hidden": _shape(
            shapes, slice0 + "transformer.layers.0.gating.linear_out.weight")[1],
        "weights_per_step": True,  # one transformer per slice
        "multi_linear": True,  # one linear_in per slice
        "cross_attention": cross,
    }
    if cross:
        m["xa_gate_hidden"] = _shape(
            shapes, "transformer.layers.0.cross_attention.gate.alpha.layers.0.weight")[0]
        m["image_dim"] = _shape(shapes, "transformer.image_prefix.proj_xa.weight")[1]
    return config_from_measured(m, kyutai_config)


def kyuteye_mapping(shapes: dict[str, tuple[int, ...]], cfg: LmConfig) -> Mapping:
    """Every destination tensor of our LM and where it comes from in this layout."""
    entries: list[Entry] = []
    d, dd = cfg.dim, cfg.depformer.dim

    def add(dst: str, src: str, shape: tuple[int, ...]):
        entries.append(Entry(dst, src, tuple(shape)))

    add("text_emb.weight", "text_emb.weight", (cfg.text_card + 1, d))
    for i in range(cfg.n_q):
        add(f"audio_emb.{i}.weight", f"audio_embs.{i}.weight", (cfg.card + 1, d))
    add("text_linear.weight", "text_linear.weight", (cfg.text_card, d))
    add("out_norm.weight", "out_norm.weight", (d,))
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}."
        add(p + "self_attn.in_proj.weight", p + "self_attn.in_proj.weight", (3 * d, d))
        add(p + "self_attn.out_proj.weight", p + "self_attn.out_proj.weight", (d, d))
        add(p + "norm1.weight", p + "norm1.weight", (d,))
        add(p + "norm2.weight", p + "norm2.weight", (d,))
        add(p + "ffn.linear_in.weight", p + "gating.linear_in.weight", (2 * cfg.ffn_hidden, d))
        add(p + "ffn.linear_out.weight", p + "gating.linear_out.weight", (d, cfg.ffn_hidden))
        if cfg.cross_attention:
            g = cfg.xa_gate_hidden
            gate = p + "cross_attention.gate.alpha.layers."
            add(p + "norm_cross.weight", p + "norm_cross.weight", (d,))
            add(p + "xa_gate.linear_in.weight", gate + "0.weight", (g, d))
            add(p + "xa_gate.linear_out.weight", gate + "2.weight", (d, g))
    if cfg.cross_attention:
        xa = "transformer.layers.0.cross_attention.mha."
        add("xa.q_proj.weight", xa + "q_proj.weight", (d, d))
        add("xa.kv_proj.weight", xa + "kv_proj.weight", (2 * d, d))
        add("xa.out_proj.weight", xa + "out_proj.weight", (d, d))
        pre = "transformer.image_prefix."
        add("image_prefix.proj_xa.weight", pre + "proj_xa.weight", (d, cfg.image_dim))
        add("image_prefix.proj_xa.bias", pre + "proj_xa.bias", (d,))
        add("image_prefix.norm_xa.weight", pre + "norm_xa.weight", (d,))

    dep = cfg.depformer
    for k in range(cfg.dep_q):
        s = f"depformer.slices.{k}."
        add(f"depformer.in_proj.{k}.weight", s + "linear_in.weight", (dd, d))
        if k == 0:
            add("depformer.text_emb.weight", s + "emb.weight", (cfg.text_card + 1, dd))
        else:
            add(f"depformer.audio_emb.{k - 1}.weight", s + "emb.weight", (cfg.card + 1, dd))
        add(f"depformer.heads.{k}.weight", s + "linear_out.weight", (cfg.card, dd))
        for layer in range(dep.num_layers):
            src = f"{s}transformer.layers.{layer}."
            dst = f"depformer.transformer.layers.{layer}."
            if k == 0:
                add(dst + "norm1.weight", src + "norm1.weight", (dd,))
                add(dst + "norm2.weight", src + "norm2.weight", (dd,))
            add(f"{dst}self_attn.{k}.in_proj.weight", src + "self_attn.in_proj.weight",
                (3 * dd, dd))
            add(f"{dst}self_attn.{k}.out_proj.weight", src + "self_attn.out_proj.weight",
                (dd, dd))
            add(f"{dst}ffn.{k}.linear_in.weight", src + "gating.linear_in.weight",
                (2 * dep.ffn_hidden, dd))
            add(f"{dst}ffn.{k}.linear_out.weight", src + "gating.linear_out.weight",
                (dd, dep.ffn_hidden))
    ignored = [k for k in shapes if k.startswith(TOWER_PREFIX)]
    return Mapping(entries, ignored)
