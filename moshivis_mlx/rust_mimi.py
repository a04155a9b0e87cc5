"""Mimi in Rust on the CPU: Kyutai's own streaming codec (`rustymimi`), as Kyutai's clients
run it beside the GPU step (`--codec-device rust`).

rustymimi reads Kyutai's released checkpoint layout, so our bundle's Mimi is written back
in that layout once (`weights_convert.mimi_layout.mimi_to_kyutai`), into the cache, named
by a hash of the weights, and read from there afterwards. Its configuration is built into
it: only the released Mimi runs there.

The codec runs on the host, outside the frame's graph: encoding gives the step its codes
at once, decoding waits for the step's tokens. A frame is then two evaluations, not one;
where the Rust codec is faster than MLX's on the machine at hand (a CPU without a fast BLAS)
that still pays. `moshivis-bench --codec-device rust` tells.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import UsageError
from .models.mimi import Mimi, MimiConfig


def _rustymimi():
    try:
        import rustymimi
    except ImportError:
        raise UsageError("--codec-device rust needs Kyutai's Rust Mimi: pip install rustymimi "
                         "(or pip install 'moshivis-mlx[rust]')") from None
    return rustymimi


def kyutai_mimi_file(mimi: Mimi, folder: Path | None = None) -> Path:
    """Our Mimi's weights in Kyutai's layout, written once (atomically) and reused."""
    from .weights_convert.hub import cache_root
    from .weights_convert.mimi_layout import mimi_to_kyutai

    params = dict(tree_flatten(mimi.parameters()))
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(np.asarray(params[name].astype(mx.float32)).tobytes())
    folder = folder or cache_root() / "rust-mimi"
    path = folder / f"mimi-{digest.hexdigest()[:16]}.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.stem}.{os.getpid()}.tmp.safetensors"
        try:  # whole or not at all: written aside, then renamed
            mx.save_safetensors(str(tmp), mimi_to_kyutai(params, mimi.cfg))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


class RustMimi:
    """One rustymimi tokenizer: `encoder` and `decoder` behave as Mimi's streaming ones
    (`__call__` on MLX arrays, `step`, `state_arrays`, `reset`)."""

    def __init__(self, mimi: Mimi, num_codebooks: int, folder: Path | None = None):
        if mimi.cfg != MimiConfig.released():
            raise UsageError("--codec-device rust runs Kyutai's released Mimi only (its "
                             "configuration is built into rustymimi); this one differs")
        self._module = _rustymimi()
        self.path = kyutai_mimi_file(mimi, folder)
        self.num_codebooks = num_codebooks
        self.frame_size = mimi.frame_size
        self._fresh = False
        self._tokenizer = None
        self.reset()
        self.encoder = _Direction(self, self.encode)
        self.decoder = _Direction(self, self.decode)

    def reset(self) -> None:
        # A new tokenizer, not Tokenizer.reset(): in rustymimi 0.4.1 the first frame
        # encoded after reset() differs from a fresh tokenizer's.
        if not self._fresh:
            self._tokenizer = self._module.Tokenizer(str(self.path),
                                                     num_codebooks=self.num_codebooks)
            self._fresh = True

    def encode(self, pcm: mx.array) -> mx.array:
        """[frame_size] samples -> [num_codebooks] int32 codes (evaluated)."""
        frame = np.asarray(pcm, dtype=np.float32).reshape(1, 1, self.frame_size)
        self._fresh = False
        codes = self._tokenizer.encode_step(frame)
        return mx.array(np.asarray(codes, dtype=np.int32).reshape(-1))

    def decode(self, codes: mx.array) -> mx.array:
        """[num_codebooks] codes (reading them waits for the step) -> [frame_size] samples."""
        c = np.asarray(codes, dtype=np.uint32).reshape(1, -1, 1)
        self._fresh = False
        return mx.array(np.asarray(self._tokenizer.decode_step(c), dtype=np.float32).reshape(-1))


class _Direction:
    """The encoder or the decoder of a `RustMimi`, as `Stream` drives Mimi's."""

    def __init__(self, codec: RustMimi, fn):
        self._codec = codec
        self._fn = fn

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x)

    def step(self, x) -> np.ndarray:
        return np.array(self._fn(mx.array(np.asarray(x))))

    def state_arrays(self) -> list[mx.array]:
        return []  # the state lives in Rust

    def reset(self) -> None:
        self._codec.reset()

