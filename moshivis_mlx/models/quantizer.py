"""Mimi's split residual vector quantizer.

The 512-wide latent is quantized twice, independently: `rvq_first` (one codebook, trained
to carry semantic content) and `rvq_rest` (the acoustic codebooks). Each projects the
latent to the codebook width, quantizes it residually (every codebook encodes what the
previous ones left) and projects back; decoding sums both. Codebook 0 of the output is
`rvq_first`'s, codebooks 1.. are `rvq_rest`'s, so the first K codes of a frame always
make a valid coarser encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigBase


@dataclass
class QuantizerConfig(ConfigBase):
    dimension: int = 256
    """Width of the codebook vectors."""
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1



class _Norms:
    """|c|^2 of a codebook's centroids, computed once per embedding (not a parameter)."""

    def __init__(self, embedding: mx.array):
        self.of = embedding
        self.value = (embedding * embedding).sum(axis=-1)
        mx.eval(self.value)


class Codebook(nn.Module):
    """`bins` centroids; a vector's code is its nearest centroid (Euclidean)."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.embedding = mx.zeros((bins, dim))
        self._norms: _Norms | None = None

    def prepare(self) -> None:
        """Computes |c|^2 once, so a streaming step reads it instead of computing it (two
        kernels a codebook and frame). Call it outside a compiled function."""
        if self._norms is None or self._norms.of is not self.embedding:
            self._norms = _Norms(self.embedding)

    def encode(self, x: mx.array) -> mx.array:
        """[..., D] -> [...] uint32 (the index type of argmin)."""
        # argmin |x - c|^2 = argmin |c|^2 - 2 x.c (|x|^2 is the same for every c).
        e = self.embedding
        norms = self._norms
        sq = norms.value if norms is not None and norms.of is e else (e * e).sum(axis=-1)
        return mx.argmin(sq - 2.0 * (x @ e.T), axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embedding[codes]


class ResidualVectorQuantizer(nn.Module):
    """Input projection, `n_q` residual codebooks, output projection (1x1 convs, no bias)."""

    def __init__(self, cfg: QuantizerConfig, n_q: int):
        super().__init__()
        self.input_proj = nn.Linear(cfg.input_dimension, cfg.dimension, bias=False)
        self.output_proj = nn.Linear(cfg.dimension, cfg.output_dimension, bias=False)
        self.codebooks = [Codebook(cfg.bins, cfg.dimension) for _ in range(n_q)]

    def encode(self, x: mx.array, n_q: int) -> mx.array:
        """[B, T, input_dimension] -> codes [B, n_q, T]."""
        residual = self.input_proj(x)
        codes = []
        for cb in self.codebooks[:n_q]:
            c = cb.encode(residual)
            residual = residual - cb.decode(c)
            codes.append(c)
        return mx.stack(codes, axis=1).astype(mx.int32)  # one cast for all codebooks

    def prepare(self) -> None:
        for cb in self.codebooks:
            cb.prepare()

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, K, T] -> [B, T, output_dimension]."""
        q = self.codebooks[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            q = q + self.codebooks[k].decode(codes[:, k])
        return self.output_proj(q)


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        if not 0 < cfg.n_q_semantic < cfg.n_q:
            raise ValueError(f"need 0 < n_q_semantic < n_q, got {cfg.n_q_semantic}, {cfg.n_q}")
        self.n_q = cfg.n_q
        self.n_q_semantic = cfg.n_q_semantic
        self.bins = cfg.bins
        self.rvq_first = ResidualVectorQuantizer(cfg, cfg.n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(cfg, cfg.n_q - cfg.n_q_semantic)

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        """[B, T, D] -> codes [B, num_codebooks, T] int32."""
        ns = self.n_q_semantic
        if not ns <= num_codebooks <= self.n_q:
            raise ValueError(f"num_codebooks must be in [{ns}, {self.n_q}], got {num_codebooks}")
        codes = self.rvq_first.encode(x, ns)
        if num_codebooks > ns:
            codes = mx.concatenate([codes, self.rvq_rest.encode(x, num_codebooks - ns)], axis=1)
        return codes

    def prepare(self) -> None:
        """What streaming encoding reads instead of computing every frame (`Codebook`)."""
        self.rvq_first.prepare()
        self.rvq_rest.prepare()

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, K, T] (ns <= K <= n_q) -> [B, T, D]."""
        ns = self.n_q_semantic
        x = self.rvq_first.decode(codes[:, :ns])
        if codes.shape[1] > ns:
            x = x + self.rvq_rest.decode(codes[:, ns:])
        return x
