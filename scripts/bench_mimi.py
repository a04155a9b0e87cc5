"""Time Mimi's streaming encoder and decoder per 80 ms frame, at full size.

Random weights (the released architecture, float32): the cost does not depend on the
values. Usage: python scripts/bench_mimi.py [--frames 50] [--warmup 5]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from moshivis_mlx import Mimi, MimiConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    mx.random.seed(0)
    mimi = Mimi(MimiConfig.released())
    for cb in mimi.quantizer.rvq_first.codebooks + mimi.quantizer.rvq_rest.codebooks:
        cb.embedding = mx.random.normal(cb.embedding.shape)
    mx.eval(mimi.parameters())
    enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((args.warmup + args.frames, mimi.frame_size)))
    audio = [mx.array(a.astype(np.float32)) for a in audio]

    for a in audio[: args.warmup]:
        dec.step(enc.step(a))
    t_enc = t_dec = 0.0
    for a in audio[args.warmup:]:
        t0 = time.perf_counter()
        codes = enc.step(a)  # evaluates the codes and the stream state
        t1 = time.perf_counter()
        dec.step(codes)
        t2 = time.perf_counter()
        t_enc += t1 - t0
        t_dec += t2 - t1
    n = args.frames
    frame_ms = 1000 * mimi.frame_size / mimi.sample_rate
    print(f"device: {mx.default_device()}, {n} frames after {args.warmup} warm-up frames")
    print(f"encode {1000 * t_enc / n:.1f} ms/frame, decode {1000 * t_dec / n:.1f} ms/frame, "
          f"both {1000 * (t_enc + t_dec) / n:.1f} ms/frame (a frame is {frame_ms:.0f} ms)")


if __name__ == "__main__":
    main()
