"""Latency of the model step and of the whole frame, as in the paper's Figure 6.

Nothing is downloaded: the full-size Moshi / MoshiVis configurations, Mimi and SigLIP are
built with random weights (the cost of a step does not depend on their values), cast and
quantized as a converted bundle would be. A real bundle is timed with `weights=`, its own
codec and image encoder included.

Scenarios, on one MoshiVis model:

    moshi        the LM step without an image (exactly plain Moshi's computation)
    moshivis     the LM step with an image (1024 SigLIP tokens)
    frame        what a user feels every 80 ms: Mimi encoder + LM step + Mimi decoder,
    frame-image  one graph evaluated once (`Stream`), without / with the image

Each scenario compiles every variant of its step first (`warm_up`), then runs `warmup`
untimed steps, then times `steps`. The frame scenarios also report the host's share of
each frame, and each stage timed on its own (the serial reference path evaluates the
encoder, the step and the decoder separately).
"""

from __future__ import annotations

import gc
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

from . import kernels
from .bundle import read_config
from .errors import UsageError
from .fileio import atomic_write
from .generate import Generator
from .image import ImageEncoder
from .memory import weight_bytes, wire_weights
from .models import siglip
from .models.lm import LM, PRESETS, LmConfig
from .models.mimi import Mimi, MimiConfig
from .quant import PRESETS as QUANT_PRESETS
from .quant import QuantSpec, quantize_model
from .sampling import KYUTAI_GENERATION, Sampler
from .stream import RUST, FrameGeometry, Stream, codec_device

STEP_SCENARIOS = ("moshi", "moshivis")
FRAME_SCENARIOS = ("frame", "frame-image")
MAX_STEPS = 1_000_000
"""About 22 hours of audio: more is a typo, not a benchmark."""
SCENARIOS = STEP_SCENARIOS + FRAME_SCENARIOS
IMAGE_TOKENS = 1024
STAGE_FRAMES = 200
"""Frames of the serial pass that times each stage of the frame on its own."""

Progress = Callable[[str, int], Callable[[], None]]
"""progress(label, total) -> tick(): one call per unit of work done."""


@dataclass
class BenchOptions:
    config: str = "moshivis-7b"
    quant: str = "q8"
    steps: int = 3750
    warmup: int = 32
    """Untimed steps after each variant of the step has compiled once."""
    scenarios: tuple[str, ...] = SCENARIOS
    weights: Path | None = None
    pipelined: bool = False
    seed: int = 0
    codec_frames: int = 50
    """Frames of streaming Mimi encode + decode to time on their own (0: skip)."""
    image_encodes: int = 3
    """Photos to encode with the SigLIP tower, after one warm-up (0: skip)."""
    codec_device: str = "default"
    """'default' (Mimi on the LM's device) or 'cpu' (Mimi on the CPU, the LM on the GPU)."""
    adapters: Path | None = None
    """Fine-tuned adapters put on the model (they must fit its shape)."""
    kv_bits: int | None = None
    """Attention caches quantized to 8 bits (None: the model's dtype)."""


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def materialise(model: nn.Module) -> None:
    """Evaluates the weights layer by layer, so the peak stays near the final size."""
    for _, module in model.named_modules():
        if not module.children():
            mx.eval(module.parameters())


def random_lm(cfg: LmConfig, quant: str, dtype: mx.Dtype = mx.bfloat16) -> LM:
    """An LM with random weights, cast and quantized like a converted bundle."""
    lm = LM(cfg)
    lm.set_dtype(dtype)
    if QUANT_PRESETS[quant]:
        quantize_model(lm, QUANT_PRESETS[quant])
    materialise(lm)
    return lm


def random_mimi(tiny: bool, seed: int) -> Mimi:
    """Mimi with random weights (float32, as Mimi always runs); codebooks filled."""
    mx.random.seed(seed)
    mimi = Mimi(MimiConfig.tiny() if tiny else MimiConfig.released())
    for cb in mimi.quantizer.rvq_first.codebooks + mimi.quantizer.rvq_rest.codebooks:
        cb.embedding = mx.random.normal(cb.embedding.shape)
    materialise(mimi)
    return mimi


def random_vision(tiny: bool, quant: str) -> ImageEncoder:
    """The SigLIP tower as a converted bundle holds it: bfloat16, 8-bit where the LM is
    quantized (layers the group size cannot divide stay float)."""
    model = siglip.SiglipVision(siglip.tiny() if tiny else siglip.paligemma2_448())
    model.set_dtype(mx.bfloat16)
    if QUANT_PRESETS[quant]:
        quantize_model(model, QuantSpec(8, QUANT_PRESETS[quant].group_size))
    materialise(model)
    return ImageEncoder(model)


def device_name() -> str:
    """The device in plain words, e.g. 'Apple M4 Pro (gpu)'."""
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or "unknown"
    return f"{name} ({mx.default_device().type.name})"


def machine_info() -> dict[str, Any]:
    return {
        "mlx": mx.__version__,
        "device": device_name(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def _no_progress(label: str, total: int) -> Callable[[], None]:
    return lambda: None


def time_steps(gen: Generator, codes: np.ndarray, steps: int, pipelined: bool,
               tick: Callable[[], None]) -> list[float]:
    """Milliseconds per LM step. Synchronous: from submitting a frame to having its output
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


def time_frames(stream: Stream, audio: np.ndarray, steps: int, pipelined: bool,
                tick: Callable[[], None]) -> tuple[list[float], list[float]]:
    """Milliseconds per whole frame (as `time_steps`), and the host's share of each."""
    frames = len(audio)
    total: list[float] = []
    host: list[float] = []
    if not pipelined:
        for t in range(steps):
            r = stream.step(audio[t % frames])
            total.append(r.latency_ms)
            host.append(r.host_ms)
            tick()
        return total, host
    pending = stream.submit(audio[0])
    last = time.perf_counter()
    for t in range(1, steps + 1):
        nxt = stream.submit(audio[t % frames]) if t < steps else None
        host.append(pending.result().host_ms)
        now = time.perf_counter()
        total.append((now - last) * 1e3)
        last = now
        pending = nxt
        tick()
    return total, host


def time_stages(stream: Stream, audio: np.ndarray, steps: int,
                tick: Callable[[], None]) -> dict[str, dict[str, float]]:
    """Each stage of the frame evaluated and timed on its own (the serial path)."""
    stages: dict[str, list[float]] = {"encode": [], "model": [], "decode": []}
    for t in range(steps):
        r = stream.step(audio[t % len(audio)])
        stages["encode"].append(r.encode_ms)
        stages["model"].append(r.model_ms)
        stages["decode"].append(r.decode_ms)
        tick()
    return {k: percentiles(v) for k, v in stages.items()}


@dataclass
class _Models:
    lm: LM
    mimi: Mimi | None
    vision: ImageEncoder | None


def _models(opts: BenchOptions, report: dict[str, Any], progress: Progress) -> _Models:
    """The bundle's models (`weights`), or random ones at the configuration's size; only
    what the asked scenarios use is built."""
    need_mimi = opts.codec_frames > 0 or any(s in FRAME_SCENARIOS for s in opts.scenarios)
    tiny = opts.config == "tiny"
    if opts.weights:
        from .loader import load

        cfg = read_config(opts.weights)
        report["config"] = str(opts.weights)
        q = cfg.get("quantization")
        report["quant"] = f"q{q['bits']}/g{q['group_size']}" if q else cfg.get("dtype", "?")
        tick = progress("loading the bundle", 1)
        model = load(opts.weights, adapters=opts.adapters, codec=need_mimi, tokenizer=False,
                     vision=None if opts.image_encodes else False)
        tick()
        return _Models(model.lm, model.mimi, model.vision)
    if opts.config not in PRESETS:
        raise UsageError(f"unknown config {opts.config!r} (choose from {', '.join(PRESETS)})")
    tick = progress(f"building {opts.config} {opts.quant} (random weights)", 3)
    mx.random.seed(opts.seed)
    lm = random_lm(PRESETS[opts.config](), opts.quant)
    _put_adapters(lm, opts)
    tick()
    mimi = random_mimi(tiny, opts.seed) if need_mimi else None
    tick()
    vision = random_vision(tiny, opts.quant) if opts.image_encodes else None
    tick()
    return _Models(lm, mimi, vision)


def _put_adapters(lm: LM, opts: BenchOptions) -> None:
    if opts.adapters is not None:
        from .adapters import apply_adapters

        apply_adapters(lm, opts.adapters, str(opts.weights or f"--config {opts.config}"))


def _scenario(name: str, opts: BenchOptions, models: _Models, codes: np.ndarray,
              audio: np.ndarray, image: mx.array, report: dict[str, Any],
              progress: Progress) -> dict[str, Any]:
    """One scenario: a fresh conversation (its own caches), compiled, warmed up, timed."""
    lm = models.lm
    with_image = name in ("moshivis", "frame-image")
    codec = codec_device(opts.codec_device)
    try:
        gen = Generator(lm, KYUTAI_GENERATION.text_sampler(opts.seed),
                        KYUTAI_GENERATION.audio_sampler(opts.seed), kv_bits=opts.kv_bits)
    except ValueError as e:
        raise UsageError(f"--kv-bits {opts.kv_bits}: {e}") from None
    if with_image:
        t0 = time.perf_counter()
        gen.set_image(image)
        report.setdefault("image_kv_ms", (time.perf_counter() - t0) * 1e3)
    stream = Stream(models.mimi, gen, codec_device=codec) if name in FRAME_SCENARIOS else None
    t0 = time.perf_counter()
    stream.step(audio[0]) if stream else gen.step(codes[0])
    first = (time.perf_counter() - t0) * 1e3
    tick = progress(f"{name}: compiling and {opts.warmup} warm-up steps", opts.warmup + 1)
    gen.warm_up(image_tokens=IMAGE_TOKENS if with_image else None)
    gen.xa_start = 0 if with_image else gen.xa_start
    tick()
    for t in range(opts.warmup):
        stream.step(audio[t % len(audio)]) if stream else gen.step(codes[t % len(codes)])
        tick()
    mx.reset_peak_memory()
    tick = progress(f"{name}: timing {opts.steps} steps", opts.steps)
    entry: dict[str, Any] = {"first_step_ms": first}
    if stream is None:
        ms = time_steps(gen, codes, opts.steps, opts.pipelined, tick)
    else:
        ms, host = time_frames(stream, audio, opts.steps, opts.pipelined, tick)
        entry["host_ms"] = percentiles(host)
    entry.update(percentiles(ms))
    entry["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    if stream is not None:
        serial = Stream(models.mimi, gen, codec_device=codec, serial=True)
        for f in audio[:3]:  # its own codec steps compile first
            serial.step(f)
        n = min(opts.steps, STAGE_FRAMES)
        entry["stages"] = time_stages(serial, audio, n, progress(f"{name}: stages", n))
    entry["steps_ms"] = ms
    return entry


def run(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Runs the benchmark; `progress(label, total)` returns a per-unit callback."""
    progress = progress or _no_progress
    for name in opts.scenarios:
        if name not in SCENARIOS:
            raise UsageError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
    if not 1 <= opts.steps <= MAX_STEPS or not 0 <= opts.warmup <= MAX_STEPS:
        raise UsageError(f"--steps must be in [1, {MAX_STEPS}] and --warmup in [0, {MAX_STEPS}]")
    if not 0 <= opts.codec_frames <= MAX_STEPS or not 0 <= opts.image_encodes <= 10_000:
        raise UsageError(f"--codec-frames must be in [0, {MAX_STEPS}] and --image-encodes in "
                         f"[0, 10000]")
    try:
        codec_device(opts.codec_device)  # refused before minutes of loading
    except ValueError as e:
        raise UsageError(str(e)) from None
    report: dict[str, Any] = {
        "tool": "moshivis-bench", "machine": machine_info(), "config": opts.config,
        "quant": opts.quant, "steps": opts.steps, "warmup": opts.warmup,
        "pipelined": opts.pipelined, "codec_device": opts.codec_device,
        "kv_bits": opts.kv_bits,
    }
    mx.reset_peak_memory()
    start = time.perf_counter()
    models = _models(opts, report, progress)
    lm = models.lm
    report["load_s"] = time.perf_counter() - start
    report["weights_gb"] = weight_bytes(lm) / 1e9
    warning = wire_weights(lm, models.mimi, models.vision.model if models.vision else None)
    if warning:
        report["warning"] = warning
    geometry = FrameGeometry.of(models.mimi.cfg if models.mimi else MimiConfig())
    report["budget_ms"] = geometry.budget_ms

    rng = np.random.default_rng(opts.seed)
    codes = rng.integers(0, lm.cfg.card, size=(256, lm.cfg.n_q - lm.cfg.dep_q))
    audio = (0.1 * rng.standard_normal((64, geometry.frame_size))).astype(np.float32)
    image = mx.random.normal((IMAGE_TOKENS, lm.cfg.image_dim), key=mx.random.key(opts.seed))
    report["scenarios"] = {}
    for name in opts.scenarios:
        if name in ("moshivis", "frame-image") and not lm.cfg.cross_attention:
            raise UsageError(f"the {name} scenario needs a MoshiVis model (cross-attention)")
        if name in FRAME_SCENARIOS and models.mimi is None:
            raise UsageError(f"the {name} scenario needs Mimi (the bundle holds none)")
        entry = _scenario(name, opts, models, codes, audio, image, report, progress)
        report["scenarios"][name] = entry
        gc.collect()  # this scenario's caches go before the next one's peak is measured
        mx.clear_cache()
    if opts.codec_frames > 0 and models.mimi is not None:
        report.update(time_codec(models.mimi, opts.codec_frames, opts.seed,
                                 progress=progress, codec=opts.codec_device))
    if opts.image_encodes > 0 and models.vision is not None:
        report.update(time_image_encoder(models.vision, opts.image_encodes, progress))
    return report


def time_image_encoder(encoder: ImageEncoder, runs: int,
                       progress: Progress = _no_progress) -> dict[str, float]:
    """One photo through preprocessing and the SigLIP tower, after one warm-up."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    tick = progress("image encoder (SigLIP)", runs + 1)
    encoder.encode_image(photo)  # warm-up
    tick()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        encoder.encode_image(photo)
        ms.append((time.perf_counter() - t0) * 1e3)
        tick()
    return {"image_encode_ms": float(np.median(ms))}


def time_codec(mimi: Mimi, frames: int, seed: int, warmup: int = 5,
               progress: Progress = _no_progress, codec: str = "default") -> dict[str, float]:
    """Streaming Mimi per 80 ms frame, encoder and decoder each evaluated on its own, where
    `codec` (a `--codec-device`) runs it."""
    device = codec_device(codec)
    if device == RUST:
        from .rust_mimi import RustMimi

        rust = RustMimi(mimi, 8)
        enc, dec = rust.encoder, rust.decoder
    else:
        enc, dec = mimi.streaming_encoder(), mimi.streaming_decoder()
    with mx.stream(device if isinstance(device, mx.Device) else mx.default_device()):
        return _time_codec(enc, dec, mimi.frame_size, frames, seed, warmup, progress)


def _time_codec(enc, dec, frame_size: int, frames: int, seed: int, warmup: int,
                progress: Progress) -> dict[str, float]:
    audio = 0.1 * np.random.default_rng(seed).standard_normal((warmup + frames, frame_size))
    audio = [mx.array(a.astype(np.float32)) for a in audio]
    tick = progress("Mimi alone", warmup + frames)
    for a in audio[:warmup]:
        dec.step(enc.step(a))
        tick()
    t_enc = t_dec = 0.0
    for a in audio[warmup:]:
        t0 = time.perf_counter()
        codes = enc.step(a)  # evaluates the codes and the stream state
        t1 = time.perf_counter()
        dec.step(codes)
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
        tick()
    return {"mimi_encode_ms": 1e3 * t_enc / frames, "mimi_decode_ms": 1e3 * t_dec / frames,
            "mimi_frame_ms": 1e3 * (t_enc + t_dec) / frames}


def summary(report: dict[str, Any]) -> str:
    budget = report.get("budget_ms", 80.0)
    kv = f", KV cache {report['kv_bits']}-bit" if report.get("kv_bits") else ""
    lines = [f"{report['config']} {report['quant']} on {report['machine']['device']} "
             f"(mlx {report['machine']['mlx']}), {report['steps']} steps"
             f"{' pipelined' if report.get('pipelined') else ''}, load {report['load_s']:.1f} s, "
             f"weights {_size(report['weights_gb'])}{kv}, budget {budget:g} ms"]
    for name, s in report["scenarios"].items():
        lines.append(f"  {name:11s} p50 {s['p50']:7.2f}  p90 {s['p90']:7.2f}  p99 {s['p99']:7.2f}  "
                     f"max {s['max']:7.2f} ms  first {s['first_step_ms']:8.1f} ms  "
                     f"peak {_size(s['peak_memory_gb'])}")
        if "host_ms" in s:
            st = s["stages"]
            lines.append(f"  {'':11s} host p50 {s['host_ms']['p50']:.2f} ms; stages alone p50: "
                         f"encode {st['encode']['p50']:.2f}, model {st['model']['p50']:.2f}, "
                         f"decode {st['decode']['p50']:.2f} ms")
    sc = report["scenarios"]
    for plain, vis in (("moshi", "moshivis"), ("frame", "frame-image")):
        if plain in sc and vis in sc:
            lines.append(f"  the image adds {sc[vis]['p50'] - sc[plain]['p50']:+.2f} ms at p50 "
                         f"({plain} -> {vis})")
    for key, label in (("image_kv_ms", "image K/V (once per image)"),
                       ("image_encode_ms", "image encode (SigLIP)"),
                       ("mimi_encode_ms", "Mimi streaming encode per frame"),
                       ("mimi_decode_ms", "Mimi streaming decode per frame"),
                       ("mimi_frame_ms", "Mimi encode+decode per frame")):
        if key in report:
            lines.append(f"  {label}: {report[key]:.2f} ms")
    if "warning" in report:
        lines.append(f"  note: {report['warning']}")
    return "\n".join(lines)


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A side-by-side table of two reports."""
    def title(r: dict[str, Any]) -> str:
        return f"{r['config']} {r['quant']} on {r['machine']['device']} (mlx {r['machine']['mlx']})"

    lines = [f"A: {title(a)}", f"B: {title(b)}",
             f"{'scenario':12s} {'stat':5s} {'A ms':>9s} {'B ms':>9s} {'B/A':>7s}"]
    for name in a["scenarios"]:
        if name not in b["scenarios"]:
            continue
        for stat in ("p50", "p90", "p99", "max"):
            x, y = a["scenarios"][name][stat], b["scenarios"][name][stat]
            lines.append(f"{name:12s} {stat:5s} {x:9.2f} {y:9.2f} {y / x:7.2f}")
    return "\n".join(lines)


def save_json(report: dict[str, Any], path: Path) -> None:
    """Written whole or not at all (a temporary file renamed)."""
    atomic_write(path, json.dumps(report, indent=1) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a benchmark report ({e})") from None
    if not isinstance(report, dict) or report.get("tool") != "moshivis-bench":
        raise UsageError(f"{path}: not a moshivis-bench report")
    return report


# -- kernels per step and per frame -------------------------------------------------------------

KERNEL_ROWS = {
    "step": "step, image, Kyutai's sampler",
    "step-steady": "  the same, window full (after 3000 steps)",
    "step-no-image": "step, no image, Kyutai's sampler",
    "step-greedy": "step, image, greedy",
    "frame": "whole frame with Mimi, image",
}
HOST_STEPS = 20
"""Step builds timed for the host's share (median)."""


def kernel_report(quant: str = "q8", devices: tuple[str, ...] = kernels.DEVICES,
                  progress: Progress | None = None, seed: int = 0) -> dict[str, Any]:
    """The kernels a step and a frame launch on each device's build (`kernels`), at the
    7B's structure with tiny widths (`kernels.counting_lm_config`), and the host's time to
    build a step and a frame here. Nothing is timed on the device: the counts are exact."""
    progress = progress or _no_progress
    if quant not in QUANT_PRESETS:
        raise UsageError(f"unknown quantization {quant!r} ({', '.join(QUANT_PRESETS)})")
    for d in devices:
        if d not in kernels.DEVICES:
            raise UsageError(f"unknown device {d!r} (choose from {', '.join(kernels.DEVICES)})")
    mx.random.seed(seed)
    tick = progress(f"building the 7B's structure at tiny widths ({quant})", 1)
    lm = random_lm(kernels.counting_lm_config(), quant)
    mimi = Mimi(kernels.counting_mimi_config())
    materialise(mimi)
    tick()
    kyutai = (KYUTAI_GENERATION.text_sampler(seed), KYUTAI_GENERATION.audio_sampler(seed))
    greedy = (Sampler(0.0), Sampler(0.0))
    report: dict[str, Any] = {"tool": "moshivis-bench", "kind": "kernels", "quant": quant,
                              "machine": machine_info(), "devices": {}}
    tick = progress("counting kernels", len(devices))
    for device in devices:
        step = kernels.count_step(lm, device, True, *kyutai)
        entry = {
            "step": step["total"],
            "step-steady": kernels.count_step(lm, device, True, *kyutai,
                                              window_full=True)["total"],
            "step-no-image": kernels.count_step(lm, device, False, *kyutai)["total"],
            "step-greedy": kernels.count_step(lm, device, True, *greedy)["total"],
        }
        frame = kernels.count_frame(lm, mimi, device, True, *kyutai)
        entry.update(frame=frame["total"], parts={**step["parts"],
                     "mimi encode": frame["mimi_encode"], "mimi decode": frame["mimi_decode"]},
                     primitives=step["primitives"])
        report["devices"][device] = entry
        tick()
    report["host_ms"] = host_times(lm, mimi, *kyutai, progress=progress)
    return report


def host_times(lm: LM, mimi: Mimi, text_sampler: Sampler, audio_sampler: Sampler,
               steps: int = HOST_STEPS, progress: Progress = _no_progress) -> dict[str, float]:
    """Median host milliseconds to build a step and a whole frame (the graph, through the
    compiled step; evaluated after each is timed), on this machine's build."""
    gen = Generator(lm, text_sampler, audio_sampler, xa_start=0)
    gen.set_image(mx.zeros((16, lm.cfg.image_dim)))
    stream = Stream(mimi, gen)
    codes = np.zeros(gen.num_user_codes, dtype=np.int32)
    pcm = np.zeros(mimi.frame_size, dtype=np.float32)
    step_ms, frame_ms = [], []
    tick = progress("host time to build a step and a frame", 2 * (steps + 3))
    for _ in range(steps + 3):  # the first builds compile
        t0 = time.perf_counter()
        pending = gen.step_async(codes, evaluate=False)
        step_ms.append(1e3 * (time.perf_counter() - t0))
        mx.eval(pending.outputs)
        tick()
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        step, voice, state = stream.build(pcm)
        frame_ms.append(1e3 * (time.perf_counter() - t0))
        mx.eval(step.outputs, voice, state)
        tick()
    return {"step": float(np.median(step_ms[3:])), "frame": float(np.median(frame_ms[3:]))}


def kernel_summary(report: dict[str, Any]) -> str:
    devices = list(report["devices"])
    lines = [f"kernels launched, {report['quant']}, the 7B's structure at tiny widths "
             f"(mlx {report['machine']['mlx']})",
             f"{'':44s}" + "".join(f"{d:>8s}" for d in devices)]
    for key, label in KERNEL_ROWS.items():
        lines.append(f"{label:44s}" + "".join(f"{report['devices'][d][key]:8d}"
                                               for d in devices))
    lines.append("by part (step, image):")
    for part in report["devices"][devices[0]]["parts"]:
        lines.append(f"  {part:42s}" + "".join(f"{report['devices'][d]['parts'][part]:8d}"
                                               for d in devices))
    top = list(report["devices"][devices[0]]["primitives"].items())[:12]
    lines.append(f"by primitive ({devices[0]}, step, image): "
                 + ", ".join(f"{k} {n}" for k, n in top))
    host = report["host_ms"]
    lines.append(f"host time to build (this machine, median of {HOST_STEPS}): "
                 f"step {host['step']:.1f} ms, frame {host['frame']:.1f} ms")
    return "\n".join(lines)
