"""Per-step latency of the model, as in the paper's Figure 6, on random weights.

Nothing is downloaded: the full-size Moshi / MoshiVis configurations are built with random
weights (the cost of a step does not depend on their values), cast and quantized as a
converted bundle would be. A real bundle can be timed with `weights=`.

Scenarios run on one MoshiVis model: `moshi` without an image (with no image the
cross-attention block is skipped, so this is exactly plain Moshi's computation) and
`moshivis` with an image (1024 SigLIP tokens).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .bundle import load_lm
from .generate import Generator
from .image import ImageEncoder
from .models import siglip
from .models.lm import LM, PRESETS, LmConfig
from .models.mimi import Mimi, MimiConfig
from .quant import PRESETS as QUANT_PRESETS
from .quant import QuantSpec, quantize_model
from .sampling import KYUTAI_GENERATION, kyutai_audio_sampler, kyutai_text_sampler

BUDGET_MS = 80.0
SCENARIOS = ("moshi", "moshivis")
IMAGE_TOKENS = 1024


@dataclass
class BenchOptions:
    config: str = "moshivis-7b"
    quant: str = "q8"
    steps: int = 3750
    warmup: int = 32
    scenarios: tuple[str, ...] = SCENARIOS
    weights: Path | None = None
    pipelined: bool = False
    seed: int = 0
    codec_frames: int = 50
    """Frames of streaming Mimi encode + decode to time (0: skip)."""
    image_encodes: int = 3
    """Photos to encode with the SigLIP tower, after one warm-up (0: skip)."""


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def random_lm(cfg: LmConfig, quant: str, dtype: mx.Dtype = mx.bfloat16) -> LM:
    """An LM with random weights, cast and quantized like a converted bundle.

    Weights are materialised layer by layer, so the peak stays near the final size.
    """
    lm = LM(cfg)
    lm.set_dtype(dtype)
    if QUANT_PRESETS[quant]:
        quantize_model(lm, QUANT_PRESETS[quant])
    for _, module in lm.named_modules():
        if not module.children():
            mx.eval(module.parameters())
    return lm


def machine_info() -> dict[str, Any]:
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def time_steps(gen: Generator, codes: np.ndarray, steps: int, pipelined: bool,
               tick: Callable[[], None]) -> list[float]:
    """Milliseconds per step. Synchronous: from submitting a frame to having its output
    (a live frame's latency). Pipelined: between consecutive outputs when the next frame
    is submitted before the current one is collected (file mode's throughput)."""
    out: list[float] = []
    if not pipelined:
        for t in range(steps):
            start = time.perf_counter()
            gen.step(codes[t % len(codes)])
            out.append((time.perf_counter() - start) * 1e3)
            tick()
        return out
    pending = gen.step_async(codes[0])
    last = time.perf_counter()
    for t in range(1, steps + 1):
        nxt = gen.step_async(codes[t % len(codes)]) if t < steps else None
        pending.result()
        now = time.perf_counter()
        out.append((now - last) * 1e3)
        last = now
        pending = nxt
        tick()
    return out


def run(opts: BenchOptions, progress: Callable[[str, int], Callable[[], None]] | None = None
        ) -> dict[str, Any]:
    """Runs the benchmark; `progress(label, total)` returns a per-step callback."""
    progress = progress or (lambda label, total: (lambda: None))
    report: dict[str, Any] = {
        "tool": "moshivis-bench", "machine": machine_info(), "config": opts.config,
        "quant": opts.quant, "steps": opts.steps, "warmup": opts.warmup,
        "pipelined": opts.pipelined, "budget_ms": BUDGET_MS,
    }
    mx.reset_peak_memory()
    start = time.perf_counter()
    if opts.weights:
        lm = load_lm(opts.weights)
        report["config"] = str(opts.weights)
        report["quant"] = "bundle"
    else:
        if opts.config not in PRESETS:
            raise ValueError(f"unknown config {opts.config!r} (choose from {', '.join(PRESETS)})")
        mx.random.seed(opts.seed)
        lm = random_lm(PRESETS[opts.config](), opts.quant)
    report["load_s"] = time.perf_counter() - start
    report["weights_gb"] = sum(v.nbytes for _, v in nn.utils.tree_flatten(lm.parameters())) / 1e9

    rng = np.random.default_rng(opts.seed)
    codes = rng.integers(0, lm.cfg.card, size=(256, lm.cfg.n_q - lm.cfg.dep_q))
    image = mx.random.normal((IMAGE_TOKENS, lm.cfg.image_dim), key=mx.random.key(opts.seed))
    report["scenarios"] = {}
    for name in opts.scenarios:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
        with_image = name == "moshivis"
        if with_image and not lm.cfg.cross_attention:
            raise ValueError("the moshivis scenario needs a MoshiVis model (cross-attention)")
        gen = Generator(lm, kyutai_text_sampler(opts.seed), kyutai_audio_sampler(opts.seed))
        if with_image:
            t0 = time.perf_counter()
            gen.set_image(image)
            report.setdefault("image_kv_ms", (time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        gen.step(codes[0])
        first = (time.perf_counter() - t0) * 1e3
        # Compile both variants before timing.
        warm = max(opts.warmup, KYUTAI_GENERATION.xa_start + 8)
        for t in range(1, warm):
            gen.step(codes[t % len(codes)])
        mx.reset_peak_memory()
        ms = time_steps(gen, codes, opts.steps, opts.pipelined, progress(name, opts.steps))
        report["scenarios"][name] = {
            "first_step_ms": first, **percentiles(ms),
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "steps_ms": ms,
        }
    if opts.codec_frames > 0:
        report.update(time_codec(opts.config == "tiny", opts.codec_frames, opts.seed))
    if opts.image_encodes > 0:
        report.update(time_image_encoder(opts.config == "tiny", opts.quant, opts.image_encodes))
    return report


def time_image_encoder(tiny: bool, quant: str, runs: int) -> dict[str, float]:
    """One photo through preprocessing and the SigLIP tower, as a converted bundle holds it:
    bfloat16, and 8-bit where the LM is quantized (layers the group size cannot divide
    stay float)."""
    from PIL import Image

    cfg = siglip.tiny() if tiny else siglip.paligemma2_448()
    model = siglip.SiglipVision(cfg)
    model.set_dtype(mx.bfloat16)
    if QUANT_PRESETS[quant]:
        quantize_model(model, QuantSpec(8, QUANT_PRESETS[quant].group_size))
    mx.eval(model.parameters())
    encoder = ImageEncoder(model)
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    encoder.encode_image(photo)  # warm-up
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        encoder.encode_image(photo)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"image_encode_ms": float(np.median(ms))}


def time_codec(tiny: bool, frames: int, seed: int, warmup: int = 5) -> dict[str, float]:
    """Streaming Mimi per 80 ms frame (random weights, float32 as Mimi always runs)."""
    mx.random.seed(seed)
    mimi = Mimi(MimiConfig.tiny() if tiny else MimiConfig.released())
    for cb in mimi.quantizer.rvq_first.codebooks + mimi.quantizer.rvq_rest.codebooks:
        cb.embedding = mx.random.normal(cb.embedding.shape)
    mx.eval(mimi.parameters())
    enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()
    audio = 0.1 * np.random.default_rng(seed).standard_normal((warmup + frames, mimi.frame_size))
    audio = [mx.array(a.astype(np.float32)) for a in audio]
    for a in audio[:warmup]:
        dec.step(enc.step(a))
    t_enc = t_dec = 0.0
    for a in audio[warmup:]:
        t0 = time.perf_counter()
        codes = enc.step(a)  # evaluates the codes and the stream state
        t1 = time.perf_counter()
        dec.step(codes)
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
    return {"mimi_encode_ms": 1e3 * t_enc / frames, "mimi_decode_ms": 1e3 * t_dec / frames,
            "mimi_frame_ms": 1e3 * (t_enc + t_dec) / frames}


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['config']} {report['quant']} on {report['machine']['device']} "
             f"(mlx {report['machine']['mlx']}), {report['steps']} steps"
             f"{' pipelined' if report.get('pipelined') else ''}, load {report['load_s']:.1f} s, "
             f"weights {_size(report['weights_gb'])}"]
    for name, s in report["scenarios"].items():
        lines.append(f"  {name:9s} p50 {s['p50']:7.2f}  p90 {s['p90']:7.2f}  p99 {s['p99']:7.2f}  "
                     f"max {s['max']:7.2f} ms  first {s['first_step_ms']:8.1f} ms  "
                     f"peak {_size(s['peak_memory_gb'])}")
    sc = report["scenarios"]
    if "moshi" in sc and "moshivis" in sc:
        lines.append(f"  image adds {sc['moshivis']['p50'] - sc['moshi']['p50']:+.2f} ms at p50")
    for key, label in (("image_kv_ms", "image K/V (once per image)"),
                       ("image_encode_ms", "image encode (SigLIP)"),
                       ("mimi_encode_ms", "Mimi streaming encode per frame"),
                       ("mimi_decode_ms", "Mimi streaming decode per frame"),
                       ("mimi_frame_ms", "Mimi encode+decode per frame")):
        if key in report:
            lines.append(f"  {label}: {report[key]:.2f} ms")
    return "\n".join(lines)


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A side-by-side table of two reports."""
    def title(r: dict[str, Any]) -> str:
        return f"{r['config']} {r['quant']} on {r['machine']['device']} (mlx {r['machine']['mlx']})"

    lines = [f"A: {title(a)}", f"B: {title(b)}",
             f"{'scenario':10s} {'stat':5s} {'A ms':>9s} {'B ms':>9s} {'B/A':>7s}"]
    for name in a["scenarios"]:
        if name not in b["scenarios"]:
            continue
        for stat in ("p50", "p90", "p99", "max"):
            x, y = a["scenarios"][name][stat], b["scenarios"][name][stat]
            lines.append(f"{name:10s} {stat:5s} {x:9.2f} {y:9.2f} {y / x:7.2f}")
    return "\n".join(lines)


def save_json(report: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a benchmark report ({e})") from None
    if report.get("tool") != "moshivis-bench":
        raise ValueError(f"{path}: not a moshivis-bench report")
    return report
