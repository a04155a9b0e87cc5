"""Kyutai's released Mimi checkpoint (PyTorch layout, fp32) -> our Mimi.

What changes on the way:

* conv weights: PyTorch [out, in/groups, kernel] -> MLX [out, kernel, in/groups];
  transposed convs: PyTorch [in, out/groups, kernel] -> MLX [out, kernel, in/groups];
* the quantizer's 1x1 projection convs [out, in, 1] become linear weights [out, in];
* each codebook is stored as training statistics; we keep only the centroids,
  `embedding_sum / max(cluster_usage, 1e-5)`, after checking `_initialized` is set
  (an uninitialised codebook never saw data: the checkpoint is unusable);
* Kyutai's sequential module indices (`encoder.model.3`) become names (`encoder.blocks.0
  .downsample`), and the transformers' fused `in_proj_weight` is our `in_proj.weight`.

Kyutai's module indices follow from the config, so the mapping is derived from the config
alone and checked against the file's header (every tensor used, every shape exact) before
any data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from moshivis_mlx.bundle import listing
from moshivis_mlx.models.config import check_value
from moshivis_mlx.models.mimi import MimiConfig
from moshivis_mlx.models.quantizer import QuantizerConfig
from moshivis_mlx.models.seanet import SeanetConfig
from moshivis_mlx.models.transformer import TransformerConfig

from .mapping import Entry, Found, Mapping, check_mapping
from .safetensors_io import WeightsError, read_json
from .source import FloatView, Source

CONV = "conv axes to MLX order"


# -- Kyutai's Mimi config (`mimi_config` of moshi.models.loaders) ------------------------

def _require(section: dict[str, Any], name: str, **expected: Any) -> None:
    """Pops each key, checking it has the only value Mimi supports (absent is fine)."""
    for key, want in expected.items():
        got = section.pop(key, want)
        if got != want:
            raise ValueError(f"unsupported Mimi setting {name}.{key}={got!r} (expected {want!r})")


def mimi_config_from_kyutai(d: dict[str, Any]) -> MimiConfig:
    """Reads Kyutai's Mimi config dict; settings Mimi never uses are refused, not ignored."""
    try:
        s, q, t = dict(d["seanet"]), dict(d["quantizer"]), dict(d["transformer"])
    except (KeyError, TypeError):
        raise ValueError("a Kyutai Mimi config needs 'seanet', 'quantizer' and "
                         "'transformer' sections") from None
    _require(s, "seanet", causal=True, activation="ELU", norm="none", pad_mode="constant",
             true_skip=True)
    if s.pop("activation_params", {"alpha": 1.0}) != {"alpha": 1.0}:
        raise ValueError("unsupported Mimi setting seanet.activation_params (ELU alpha 1 only)")
    s.pop("disable_norm_outer_blocks", None)  # no norm at all
    seanet = SeanetConfig.from_dict(s)
    quantizer = QuantizerConfig.from_dict(q)
    _require(t, "transformer", causal=True, gating="none", norm="layer_norm",
             positional_embedding="rope")
    t.pop("conv_layout", None)  # a PyTorch tensor-layout detail
    layer_scale = t.pop("layer_scale", None)
    in_dim = t.pop("input_dimension", seanet.dimension)
    out_dims = t.pop("output_dimensions", [seanet.dimension])
    keys = {"d_model", "num_heads", "num_layers", "dim_feedforward", "context", "max_period"}
    unknown = set(t) - keys
    if unknown:
        raise ValueError(f"unsupported Mimi transformer settings: {sorted(unknown)}")
    if in_dim != t["d_model"] or list(out_dims) != [t["d_model"]]:
        raise ValueError("projected Mimi transformers (input_dimension or "
                         "output_dimensions != d_model) are not supported")
    transformer = TransformerConfig.from_dict(dict(
        d_model=t["d_model"], num_heads=t["num_heads"], num_layers=t["num_layers"],
        ffn_hidden=t.get("dim_feedforward", 2048), ffn="gelu", norm="layer_norm",
        norm_eps=1e-5, bias=False, causal=True, context=t.get("context"), rope=True,
        max_period=t.get("max_period", 10000.0), layer_scale=layer_scale is not None),
        "transformer.")
    channels = d.get("channels", seanet.channels)
    if channels != seanet.channels:
        raise ValueError(f"channels {channels} != seanet.channels {seanet.channels}")
    cfg = MimiConfig(sample_rate=check_value("sample_rate", d["sample_rate"], int),
                     frame_rate=check_value("frame_rate", d["frame_rate"], float),
                     seanet=seanet, quantizer=quantizer, transformer=transformer)
    cfg.check()
    return cfg


def mimi_config_to_kyutai(cfg: MimiConfig) -> dict[str, Any]:
    """Kyutai's Mimi config dict for this model (e.g. for `loaders.get_mimi`)."""
    s, q, t = cfg.seanet, cfg.quantizer, cfg.transformer
    seanet = {
        "channels": s.channels, "dimension": s.dimension, "causal": True,
        "n_filters": s.n_filters, "n_residual_layers": s.n_residual_layers,
        "activation": "ELU", "compress": s.compress, "dilation_base": s.dilation_base,
        "disable_norm_outer_blocks": 0, "kernel_size": s.kernel_size,
        "residual_kernel_size": s.residual_kernel_size,
        "last_kernel_size": s.last_kernel_size, "norm": "none", "pad_mode": "constant",
        "ratios": list(s.ratios), "true_skip": True,
    }
    quantizer = q.to_dict()
    if quantizer["n_q_semantic"] == 1:
        del quantizer["n_q_semantic"]  # Kyutai's default; its released config omits it
    transformer = {
        "d_model": t.d_model, "num_heads": t.num_heads, "num_layers": t.num_layers,
        "causal": True, "layer_scale": 0.01 if t.layer_scale else None,
        "context": t.context, "conv_layout": True, "max_period": t.max_period,
        "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
        "dim_feedforward": t.ffn_hidden, "input_dimension": s.dimension,
        "output_dimensions": [s.dimension],
    }
    return {"sample_rate": cfg.sample_rate, "channels": s.channels,
            "frame_rate": cfg.frame_rate, "seanet": seanet, "quantizer": quantizer,
            "transformer": transformer}


def read_mimi_config(path: Path | None) -> MimiConfig:
    """Kyutai's Mimi config JSON (bare, or under a `mimi_config` key); None: the released one."""
    if path is None:
        return MimiConfig.released()
    d = read_json(path)
    if isinstance(d.get("mimi_config"), dict):
        d = d["mimi_config"]
    try:
        return mimi_config_from_kyutai(d)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a usable Mimi config: {e}") from None


def mimi_mapping(cfg: MimiConfig) -> Mapping:
    """Every tensor of our Mimi and where it comes from in Kyutai's layout."""
    entries: list[Entry] = []
    ignored: list[str] = []

    def add(dst, src, shape, src_shape=None, **how):
        entries.append(Entry(dst, src, tuple(shape), src_shape=tuple(src_shape or shape), **how))

    def conv(dst, src, c_in, c_out, k, bias=True, groups=1):
        add(f"{dst}.weight", f"{src}.weight", (c_out, k, c_in // groups),
            (c_out, c_in // groups, k), perm=(0, 2, 1), note=CONV)
        if bias:
            add(f"{dst}.bias", f"{src}.bias", (c_out,))

    def conv_transpose(dst, src, c_in, c_out, k, bias=True, groups=1):
        # Mimi's are plain or depthwise (one channel per group): either way a transpose.
        if groups != 1 and not c_in == c_out == groups:
            raise ValueError(f"{dst}: grouped transposed convolutions are not supported")
        add(f"{dst}.weight", f"{src}.weight", (c_out, k, c_in // groups),
            (c_in, c_out // groups, k), perm=(1, 2, 0) if groups == 1 else (0, 2, 1),
            note="transposed-conv axes to MLX order")
        if bias:
            add(f"{dst}.bias", f"{src}.bias", (c_out,))

    def residual(dst, src, dim):
        hidden = dim // s.compress
        conv(f"{dst}.conv1", f"{src}.block.1.conv.conv", dim, hidden, s.residual_kernel_size)
        conv(f"{dst}.conv2", f"{src}.block.3.conv.conv", hidden, dim, 1)

    s, q, t = cfg.seanet, cfg.quantizer, cfg.transformer
    n_res, nf = s.n_residual_layers, s.n_filters
    top = nf * 2 ** len(s.ratios)

    # SEANet encoder: conv, then per ratio [residual units, ELU, strided conv], ELU, conv.
    conv("encoder.conv_in", "encoder.model.0.conv.conv", s.channels, nf, s.kernel_size)
    idx = 1
    for i, ratio in enumerate(reversed(s.ratios)):
        dim = nf * 2**i
        for j in range(n_res):
            residual(f"encoder.blocks.{i}.residuals.{j}", f"encoder.model.{idx + j}", dim)
        conv(f"encoder.blocks.{i}.downsample", f"encoder.model.{idx + n_res + 1}.conv.conv",
             dim, 2 * dim, 2 * ratio)
        idx += n_res + 2
    conv("encoder.conv_out", f"encoder.model.{idx + 1}.conv.conv", top, s.dimension,
         s.last_kernel_size)

    # SEANet decoder: conv, then per ratio [ELU, transposed conv, residual units], ELU, conv.
    conv("decoder.conv_in", "decoder.model.0.conv.conv", s.dimension, top, s.kernel_size)
    idx = 1
    for i, ratio in enumerate(s.ratios):
        dim = top // 2**i
        conv_transpose(f"decoder.blocks.{i}.upsample", f"decoder.model.{idx + 1}.convtr.convtr",
                       dim, dim // 2, 2 * ratio)
        for j in range(n_res):
            residual(f"decoder.blocks.{i}.residuals.{j}", f"decoder.model.{idx + 2 + j}",
                     dim // 2)
        idx += n_res + 2
    conv("decoder.conv_out", f"decoder.model.{idx + 1}.conv.conv", nf, s.channels,
         s.last_kernel_size)

    # Transformers.
    d, h = t.d_model, t.ffn_hidden
    for side in ("encoder", "decoder"):
        for i in range(t.num_layers):
            src = f"{side}_transformer.transformer.layers.{i}."
            dst = f"{side}_transformer.layers.{i}."
            add(dst + "self_attn.in_proj.weight", src + "self_attn.in_proj_weight", (3 * d, d))
            add(dst + "self_attn.out_proj.weight", src + "self_attn.out_proj.weight", (d, d))
            for norm in ("norm1", "norm2"):
                add(f"{dst}{norm}.weight", f"{src}{norm}.weight", (d,))
                add(f"{dst}{norm}.bias", f"{src}{norm}.bias", (d,))
            add(dst + "ffn.linear_in.weight", src + "linear1.weight", (h, d))
            add(dst + "ffn.linear_out.weight", src + "linear2.weight", (d, h))
            if t.layer_scale:
                add(dst + "layer_scale_1.scale", src + "layer_scale_1.scale", (d,))
                add(dst + "layer_scale_2.scale", src + "layer_scale_2.scale", (d,))

    # Frame-rate conversion: a full conv down, a depthwise transposed conv up, no biases.
    dim, k = s.dimension, 2 * cfg.downsample_stride
    conv("downsample", "downsample.conv.conv.conv", dim, dim, k, bias=False)
    conv_transpose("upsample", "upsample.convtr.convtr.convtr", dim, dim, k, bias=False,
                   groups=dim)

    # Quantizer.
    for name, n in (("rvq_first", q.n_q_semantic), ("rvq_rest", q.n_q - q.n_q_semantic)):
        pre = f"quantizer.{name}"
        add(f"{pre}.input_proj.weight", f"{pre}.input_proj.weight",
            (q.dimension, q.input_dimension), (q.dimension, q.input_dimension, 1))
        add(f"{pre}.output_proj.weight", f"{pre}.output_proj.weight",
            (q.output_dimension, q.dimension), (q.output_dimension, q.dimension, 1))
        for i in range(n):
            cb = f"{pre}.vq.layers.{i}._codebook."
            add(f"{pre}.codebooks.{i}.embedding", cb + "embedding_sum", (q.bins, q.dimension),
                aux=cb + "cluster_usage", note="centroids = embedding_sum / cluster_usage")
            ignored.append(cb + "_initialized")
    return Mapping(entries, ignored)


def check_mimi_mapping(mapping: Mapping, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """As `check_mapping` (all used, none missing), and every source shape exact."""
    try:
        check_mapping(mapping, shapes, what)
    except WeightsError as e:
        raise WeightsError(f"{e} (if this is another Mimi, pass its config with "
                           f"--mimi-config)") from None
    bad = []
    for e in mapping.entries:
        if tuple(shapes[e.src]) != e.src_shape:
            bad.append(f"{e.src} is {list(shapes[e.src])}, expected {list(e.src_shape)}")
        if e.aux is not None:
            if e.aux not in shapes:
                bad.append(f"{e.aux} is missing")
            elif tuple(shapes[e.aux]) != e.src_shape[:1]:
                bad.append(f"{e.aux} is {list(shapes[e.aux])}, expected {list(e.src_shape[:1])}")
    if bad:
        raise WeightsError(f"{what}: the tensors do not match the Mimi config (pass the "
                           f"checkpoint's config with --mimi-config): " + listing(bad, 8, "; "))


def find_mimi(source: Source, config: Path | MimiConfig | None) -> Found:
    cfg = config if isinstance(config, MimiConfig) else read_mimi_config(config)
    view = FloatView(source, source.keys(), None)
    mapping = mimi_mapping(cfg)
    check_mimi_mapping(mapping, view.shapes, source.label)
    return Found("kyutai", cfg, mapping, view)


def is_mimi(keys: set[str]) -> bool:
    """Whether a checkpoint looks like Kyutai's Mimi (its first conv and its quantizer)."""
    return "encoder.model.0.conv.conv.weight" in keys and any(
        k.startswith("quantizer.rvq_first.") for k in keys)


def check_codebooks_trained(source: Source, mapping: Mapping) -> None:
    """Refuses checkpoints with an untrained codebook (`_initialized` is 0)."""
    for key in mapping.ignored:
        if key.endswith("._initialized") and key in source.tensors:
            if not mx.any(source.read(key) != 0).item():
                raise WeightsError(
                    f"{source.label}: {key} is 0: this codebook was never trained (is this a "
                    f"freshly initialised model rather than a released checkpoint?)")


def mimi_to_kyutai(params: dict[str, mx.array], cfg: MimiConfig) -> dict[str, mx.array]:
    """Our Mimi's tensors (flattened names) back in Kyutai's released layout, float32: the
    inverse of `mimi_mapping` (axes back to PyTorch's order, the quantizer's projections as
    1x1 convs, each codebook as statistics whose ratio is the centroids: `embedding_sum` the
    centroids, `cluster_usage` 1, `_initialized` 1). What Kyutai's own codecs read
    (rustymimi, the Rust Mimi its clients run)."""
    mapping = mimi_mapping(cfg)
    out: dict[str, mx.array] = {}
    for e in mapping.entries:
        value = params[e.dst].astype(mx.float32)
        src_shape = e.src_shape or e.shape
        if e.perm is not None:
            permuted = tuple(src_shape[p] for p in e.perm)
            inverse = [e.perm.index(i) for i in range(len(e.perm))]
            value = value.reshape(permuted).transpose(inverse)
        out[e.src] = mx.contiguous(value.reshape(src_shape))
        if e.aux is not None:
            out[e.aux] = mx.ones(src_shape[:1], dtype=mx.float32)
    for key in mapping.ignored:
        if key.endswith("._initialized"):
            out[key] = mx.ones((1,), dtype=mx.float32)
    return out
