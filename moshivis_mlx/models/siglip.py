"""SigLIP vision tower: MoshiVis' image encoder.

MoshiVis uses the SigLIP so400m/14 tower of PaliGemma2-3b-pt-448: a 14x14 patch
convolution turns a 448x448 image into 32x32 = 1024 tokens, a learned position table is
added, 27 pre-norm LayerNorm layers with tanh-GELU MLPs follow, and a final LayerNorm
(`post_norm`). MoshiVis takes that last hidden state as is: no pooling head.

The encoder stack is the project's one `Transformer` (bidirectional, no RoPE, biases
everywhere); only the patch and position embeddings are specific to images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigBase, ConfigError, check_divides, check_range
from .transformer import MAX_LAYERS, MAX_WIDTH, Transformer, TransformerConfig


@dataclass
class SiglipConfig(ConfigBase):
    """SigLIP vision tower. Defaults are the PaliGemma2-448 tower MoshiVis uses."""

    dim: int = 1152
    num_heads: int = 16
    num_layers: int = 27
    ffn_hidden: int = 4304
    ffn: str = "gelu_tanh"
    norm_eps: float = 1e-6
    image_size: int = 448
    """Input side in pixels; the position table has one row per patch at this size."""
    patch_size: int = 14
    num_channels: int = 3

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "") -> None:
        check_range(where + "dim", self.dim, 1, MAX_WIDTH)
        check_range(where + "num_heads", self.num_heads, 1, self.dim)
        check_divides(where + "dim", self.dim, where + "num_heads", self.num_heads)
        check_range(where + "num_layers", self.num_layers, 0, MAX_LAYERS)
        check_range(where + "ffn_hidden", self.ffn_hidden, 1, 16 * MAX_WIDTH)
        check_range(where + "norm_eps", self.norm_eps, 0.0, 1.0)
        check_range(where + "patch_size", self.patch_size, 1, 1024)
        check_range(where + "image_size", self.image_size, self.patch_size, 8192)
        check_range(where + "num_channels", self.num_channels, 1, 4)
        check_divides(where + "image_size", self.image_size, where + "patch_size",
                      self.patch_size)
        if self.ffn not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"{where}ffn: unknown kind {self.ffn!r} (SigLIP uses "
                              f"'gelu_tanh')")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            ffn_hidden=self.ffn_hidden,
            ffn=self.ffn,
            norm="layer_norm",
            norm_eps=self.norm_eps,
            bias=True,
            causal=False,
            context=None,
            rope=False,
        )


def paligemma2_448() -> SiglipConfig:
    """SigLIP so400m/14 at 448 px, as in PaliGemma2-3b-pt-448 (MoshiVis)."""
    return SiglipConfig()


def tiny() -> SiglipConfig:
    """A few-hundred-kB tower with the real structure (odd MLP width included), for tests."""
    return SiglipConfig(dim=48, num_heads=4, num_layers=2, ffn_hidden=88, image_size=56,
                        patch_size=14)


PRESETS: dict[str, Callable[[], SiglipConfig]] = {
    "paligemma2-448": paligemma2_448,
    "tiny": tiny,
}


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens, plus one learned position vector per patch."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch = nn.Conv2d(cfg.num_channels, cfg.dim, kernel_size=cfg.patch_size,
                               stride=cfg.patch_size, bias=True)
        # A plain table added to every image: never looked up, so not an nn.Embedding
        # (which quantization would also touch).
        scale = 1.0 / math.sqrt(cfg.dim)
        self.positions = mx.random.normal((cfg.num_tokens, cfg.dim)) * scale

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch(pixels)  # [B, grid, grid, D], row-major patches as in HF's flatten
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d) + self.positions


class SiglipVision(nn.Module):
    """pixels [B, S, S, C] normalised to [-1, 1] -> last hidden state [B, N, D]."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbedding(cfg)
        self.encoder = Transformer(cfg.transformer_config())
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (norm weights are never quantized)."""
        return self.post_norm.weight.dtype

    def __call__(self, pixels: mx.array) -> mx.array:
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            # The position table is only defined at the trained size: no interpolation.
            raise ValueError(f"pixels must be [B, {', '.join(map(str, expected))}] (NHWC), "
                             f"got {list(pixels.shape)}")
        x = self.embeddings(pixels.astype(self.dtype))
        return self.post_norm(self.encoder(x))
