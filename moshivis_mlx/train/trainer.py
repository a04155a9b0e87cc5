"""moshivis-train's loop, in the manner of mlx-lm's tuner: AdamW with warm-up and cosine
decay, gradient accumulation, one compiled step, validation every N steps, checkpoints,
exact resume, and data parallelism through MLX's own distributed layer.

Data parallel: launched with `mlx.launch -n 2 moshivis-train ...` (the ring backend over
localhost, or several machines), every process loads the model, draws the same global
batch and computes the gradients of its slice; the gradients are summed with
`mx.distributed.all_sum` before the update. Each micro-batch's loss is already divided
by its global totals of the loss weights and by the number of micro-batches (see `loss`),
so the summed gradient is the mean of the micro-batches' gradients, as moshi-finetune
accumulates: N processes give the adapters one process would on the same global batch
(up to float rounding). Process 0 writes checkpoints and logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapters import write_adapters
from ..errors import UsageError, WeightsError
from ..fileio import atomic_write
from ..loader import BundleOptions
from . import checkpoint
from .batches import Order, collate, shard
from .dataset import FRAME_RATE, SPEECHLESS_AUDIO, ImageStore, Preparer, Sample
from .loss import LossConfig, LossScale, batch_loss, loss_weights, weighted_sums
from .manifest import BabillageFiles, read_manifest
from .model import prepare_for_training, trained_adapters

ADAPTERS_DIR = "adapters"
LOG = "log.jsonl"
RUN = "run.json"

RESUME_KEYS = ("bundle", "train", "train_sha1", "steps", "batch_size", "grad_accum",
               "learning_rate", "warmup", "weight_decay", "max_grad_norm", "p_audio",
               "max_seconds", "text_past_audio", "seed", "speechless_audio", "loss")
"""Settings a resumed run must share with the run it continues (the others, such as how
often to validate or how many processes, may change)."""


@dataclass
class TrainOptions:
    train: Path
    out: Path
    valid: Path | None = None
    bundle: BundleOptions = field(default_factory=BundleOptions)
    """The frozen backbone (its `adapters`, if given, are refused: training makes them)."""
    steps: int = 1000
    batch_size: int = 4
    """Samples per optimizer step and micro-batch, all processes together."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    warmup: int | None = None
    """Linear warm-up steps (default 5% of the steps, moshi-finetune's pct_start)."""
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    p_audio: float = 0.25
    max_seconds: float = 30.0
    text_past_audio: bool = False
    """A short last window's text runs on in padding to the window's length
    (moshi-finetune's samples); by default it stops with the audio."""
    seed: int = 0
    val_every: int = 100
    val_batches: int | None = None
    save_every: int = 100
    keep_checkpoints: int = 2
    report_every: int = 10
    grad_checkpoint: bool = True
    speechless_audio: str = "zero"
    cache: Path | None = None
    resume: bool = False
    compiled: bool = True
    loss: LossConfig = field(default_factory=LossConfig)

    def check(self, world: int = 1) -> None:
        for name in ("steps", "batch_size", "grad_accum", "val_every", "save_every",
                     "report_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size % world:
            raise UsageError(f"--batch-size {self.batch_size} does not split over {world} "
                             f"processes (each takes an equal share)")
        if not self.learning_rate > 0:
            raise UsageError("--learning-rate must be > 0")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise UsageError("--warmup must be in 0..--steps")
        if not 0.0 <= self.p_audio <= 1.0:
            raise UsageError(f"--p-audio must be in [0, 1], got {self.p_audio}")
        if not self.max_seconds > 0:
            raise UsageError("--max-seconds must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UsageError("--weight-decay and --max-grad-norm must be >= 0")
        if self.speechless_audio not in SPEECHLESS_AUDIO:
            raise UsageError(f"--speechless-audio must be one of {', '.join(SPEECHLESS_AUDIO)}")
        if self.val_batches is not None and self.val_batches < 1:
            raise UsageError("--val-batches must be at least 1")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, round(0.05 * self.steps))

    @property
    def max_frames(self) -> int:
        return max(1, math.ceil(self.max_seconds * FRAME_RATE))


# -- the pieces -------------------------------------------------------------------------------

def learning_rate_schedule(opts: TrainOptions):
    """Linear warm-up from 0 to the rate, then cosine decay to 0 at the last step."""
    warmup = opts.warmup_steps
    decay = optim.cosine_decay(opts.learning_rate, max(1, opts.steps - warmup), 0.0)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, opts.learning_rate, warmup), decay],
                                [warmup])


def make_optimizer(opts: TrainOptions) -> optim.Optimizer:
    """moshi-finetune's AdamW (betas 0.9 / 0.95, eps 1e-8)."""
    return optim.AdamW(learning_rate=learning_rate_schedule(opts), betas=[0.9, 0.95], eps=1e-8,
                       weight_decay=opts.weight_decay)


def sum_gradients(grads: Any, group: mx.distributed.Group | None,
                  chunk_bytes: int = 64 << 20) -> Any:
    """Sums a gradient tree over the processes: flattened, in a few large all_sums."""
    if group is None or group.size() == 1:
        return grads
    flat = [(k, g) for k, g in tree_flatten(grads)]
    summed: dict[str, mx.array] = {}
    start = 0
    while start < len(flat):
        end, size = start, 0
        while end < len(flat) and (end == start or size < chunk_bytes):
            size += flat[end][1].nbytes
            end += 1
        part = flat[start:end]
        big = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for _, g in part]),
                                     group=group)
        offsets = np.cumsum([g.size for _, g in part])[:-1].tolist()
        for (k, g), piece in zip(part, mx.split(big, offsets)):
            summed[k] = piece.reshape(g.shape)
        start = end
    return tree_map_with_path(lambda k, g: summed[k], grads)


def fingerprint(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


@dataclass
class Batch:
    codes: mx.array
    images: mx.array
    w_text: mx.array
    w_audio: mx.array
    samples: int
    tokens: int
    """Supervised tokens (weight > 0)."""


def make_batch(samples: list[Sample], store: ImageStore, cfg, loss: LossConfig) -> Batch:
    codes, user = collate(samples, 1 + cfg.n_q)
    w_text, w_audio = loss_weights(codes, cfg, loss, np.array([s.speech for s in samples]), user)
    images = mx.stack([store.get(s.image) for s in samples])
    tokens = int((w_text > 0).sum() + (w_audio > 0).sum())
    return Batch(mx.array(codes), images, mx.array(w_text), mx.array(w_audio), len(samples),
                 tokens)


def micro_batch_factors(local: list[Batch], loss: LossConfig,
                        group: mx.distributed.Group | None = None,
                        ) -> tuple[list[mx.array], np.ndarray]:
    """Each micro-batch's loss factors, and the step's totals [text weight, audio weight,
    samples, tokens]. A micro-batch is normalised by its own weights (its slices on every
    process together) and the step averages its micro-batches, as moshi-finetune does."""
    per = mx.array([[float(mx.sum(b.w_text)), float(mx.sum(b.w_audio)), b.samples, b.tokens]
                    for b in local])
    per = np.array(mx.distributed.all_sum(per, group=group))
    factors = [LossScale(t, a, loss, len(local)).factors() for t, a, _, _ in per]
    return factors, per.sum(axis=0)


class Steps:
    """The compiled training step and validation forward of one model and optimizer."""

    def __init__(self, lm, optimizer: optim.Optimizer, opts: TrainOptions,
                 group: mx.distributed.Group | None):
        self.lm, self.optimizer = lm, optimizer
        max_norm = opts.max_grad_norm

        def loss_fn(model, codes, images, w_text, w_audio, factors):
            # The codebooks scored are those the weights hold (none: no speech sample).
            out = model.forward(codes, images, audio_codebooks=w_audio.shape[1])
            return batch_loss(out, codes, w_text, w_audio, factors)

        value_and_grad = nn.value_and_grad(lm, loss_fn)

        def step(codes, images, w_text, w_audio, factors, prev_grad, do_update):
            (loss, sums), grad = value_and_grad(lm, codes, images, w_text, w_audio, factors)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            norm = mx.zeros(())
            if do_update:
                grad = sum_gradients(grad, group)
                if max_norm > 0:
                    grad, norm = optim.clip_grad_norm(grad, max_norm)
                optimizer.update(lm, grad)
                grad = None
            return loss, sums, norm, grad

        def validate(codes, images, w_text, w_audio):
            out = lm.forward(codes, images, audio_codebooks=w_audio.shape[1])
            return weighted_sums(out, codes, w_text, w_audio)

        if opts.compiled:
            state = [lm.state, optimizer.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
            validate = mx.compile(validate, inputs=[lm.state])
        self.step = step
        self.validate = validate


# -- progress ----------------------------------------------------------------------------------

class TrainProgress:
    """Loss, samples/s, tokens/s, peak memory and the time left: the project's progress bar
    on a terminal, a plain line per report elsewhere. Silent on every process but the
    first."""

    def __init__(self, console, total: int, done: int, show: bool):
        from ..progress import Counter

        self.console, self.show = console, show
        terminal = show and console is not None and console.is_terminal
        self.bars = Counter(console, unit="steps", transient=False, show=terminal)
        self.task = self.bars.add("steps", total, done)
        self.terminal = terminal
        self.total = total
        self.t0, self.done0 = time.perf_counter(), done

    def __enter__(self) -> TrainProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def update(self, step: int, stats: str, report: bool) -> None:
        if self.terminal:
            self.bars.update(self.task, step, rate=stats)
        elif self.show and report and self.console is not None:
            rate = (step - self.done0) / max(time.perf_counter() - self.t0, 1e-9)
            left = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(f"step {step}/{self.total}  {stats}  {left / 60:.1f} min left",
                               highlight=False)

    def note(self, text: str) -> None:
        if self.show and self.console is not None:
            self.console.print(text, highlight=False)


# -- the run -------------------------------------------------------------------------------

def run_settings(opts: TrainOptions, bundle: Path) -> dict[str, Any]:
    return {"bundle": str(Path(bundle).resolve()), "train": str(Path(opts.train).resolve()),
            "train_sha1": fingerprint(opts.train),
            "valid": str(Path(opts.valid).resolve()) if opts.valid else None,
            "steps": opts.steps, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
            "learning_rate": opts.learning_rate, "warmup": opts.warmup_steps,
            "weight_decay": opts.weight_decay, "max_grad_norm": opts.max_grad_norm,
            "p_audio": opts.p_audio, "max_seconds": opts.max_seconds,
            "text_past_audio": opts.text_past_audio, "seed": opts.seed,
            "speechless_audio": opts.speechless_audio, "loss": opts.loss.to_dict(),
            "grad_checkpoint": opts.grad_checkpoint}


def check_resumable(out: Path, settings: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh), or a one-line refusal."""
    last = checkpoint.latest(out)
    if last is None:
        return None
    if not resume:
        raise UsageError(f"{out} holds a run (its last checkpoint: {last.name})",
                         "continue it with --resume, or give another --out")
    old = checkpoint.load_state(last).get("settings", {})
    for k in RESUME_KEYS:
        if old.get(k) != settings.get(k):
            raise UsageError(f"--resume: {out} was trained with another {k} ({old.get(k)!r}, "
                             f"now {settings.get(k)!r})", "give the same settings, or another "
                                                           "--out")
    return last


def train(opts: TrainOptions, console=None) -> dict[str, Any]:
    """Runs (or resumes) one training; returns the last metrics."""
    from ..loader import load, resolve
    from ..progress import Counter

    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    opts.check(world)
    out = Path(opts.out).expanduser()
    show = rank == 0
    say = (lambda text: console.print(text, highlight=False, soft_wrap=True)) \
        if show and console is not None else (lambda text: None)

    babillage = BabillageFiles()
    train_entries = read_manifest(opts.train, babillage)
    valid_entries = read_manifest(opts.valid, babillage) if opts.valid else []
    bundle = resolve(opts.bundle.weights, opts.bundle.hf_repo, opts.bundle.quantize, note=say)
    settings = run_settings(opts, bundle)
    resume_from = check_resumable(out, settings, opts.resume)
    if opts.resume and resume_from is None:
        say(f"--resume: {out} has no checkpoint yet; starting from the beginning")

    say(f"loading {bundle} ...")
    model = load(bundle, vision=False, codec=False, cross_attention=True, note=say)
    lm, cfg = model.lm, model.lm.cfg
    if cfg.n_q != 2 * cfg.dep_q:
        raise WeightsError(f"{bundle}: {cfg.n_q} audio streams for {cfg.dep_q} model codebooks; "
                           f"training expects as many user codebooks as model ones")
    opts.loss.check(cfg)
    cache = Path(opts.cache).expanduser() if opts.cache else out / "cache"

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    with Counter(console, show=show and console is not None and console.is_terminal) as bars:
        preparer = Preparer(bundle, cfg, model.tokenizer, cache, opts.max_seconds,
                            opts.speechless_audio, bars.track, rank, world, barrier, babillage,
                            opts.text_past_audio)
        preparer.encode_all(train_entries + valid_entries)
        train_samples = preparer.samples(train_entries)
        valid_samples = preparer.samples(valid_entries)
        preparer.release()
    store = preparer.images
    n_speech = sum(s.speech for s in train_samples)
    say(f"{len(train_samples)} training samples ({n_speech} speech, "
        f"{len(train_samples) - n_speech} speechless), {len(valid_samples)} validation samples")

    n_trainable = prepare_for_training(lm, opts.grad_checkpoint, str(bundle))
    optimizer = make_optimizer(opts)
    optimizer.init(lm.trainable_parameters())
    start = 0
    if resume_from is not None:
        weights = checkpoint.restore(resume_from, optimizer, lm.trainable_parameters())
        lm.load_weights(list(weights.items()), strict=False)
        start = checkpoint.load_state(resume_from)["step"]
        say(f"resuming from {resume_from} (step {start})")
    mx.eval(lm.parameters(), optimizer.state)
    steps = Steps(lm, optimizer, opts, group)
    say(f"training {n_trainable / 1e6:.2f}M adapter parameters for {opts.steps} steps, "
        f"batch {opts.batch_size} x {opts.grad_accum} accumulated"
        + (f", {world} processes" if world > 1 else ""))

    if show:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN, json.dumps({"settings": settings, "processes": world},
                                                indent=2) + "\n")
    order = Order(train_samples, opts.p_audio, opts.seed)
    batches = order.batches(opts.batch_size, start * opts.grad_accum)
    log = _Log(out / LOG if show else None)
    window = _Window()
    metrics: dict[str, Any] = {}
    with TrainProgress(console, opts.steps, start, show) as progress:
        for step in range(start + 1, opts.steps + 1):
            t0 = time.perf_counter()
            micro = [shard(next(batches), rank, world) for _ in range(opts.grad_accum)]
            local = [make_batch([train_samples[i] for i in idx], store, cfg, opts.loss)
                     for idx in micro]
            factors, totals = micro_batch_factors(local, opts.loss, group)
            grad = None
            loss = mx.zeros(())
            sums = mx.zeros((2,))
            for j, b in enumerate(local):
                share, part, norm, grad = steps.step(b.codes, b.images, b.w_text, b.w_audio,
                                                     factors[j], grad, j == len(local) - 1)
                loss, sums = loss + share, sums + part
                mx.eval(loss, sums, grad, norm, lm.trainable_parameters(), optimizer.state)
            reduced = np.array(mx.distributed.all_sum(mx.concatenate([loss[None], sums]),
                                                      group=group))
            window.add(reduced, totals, time.perf_counter() - t0)
            report = step % opts.report_every == 0 or step == opts.steps
            if report:
                metrics = window.flush(step, float(optimizer.learning_rate), float(norm))
                log.write(metrics)
            progress.update(step, window.stats(metrics), report)
            if valid_samples and (step % opts.val_every == 0 or step == opts.steps):
                val = validation_loss(steps, valid_samples, store, cfg, opts, rank, world,
                                      group)
                metrics = {**metrics, **val}
                log.write({"step": step, **val})
                progress.note(f"step {step}: validation loss {val['val_loss']:.4f} "
                              f"(text {val['val_text_loss']:.4f}, audio "
                              f"{val['val_audio_loss']:.4f})")
            if show and (step % opts.save_every == 0 or step == opts.steps):
                summary = {k: metrics[k] for k in ("loss", "val_loss") if k in metrics}
                path = checkpoint.save(out, step, trained_adapters(lm), optimizer, cfg,
                                       {"settings": settings, "summary": summary},
                                       opts.keep_checkpoints)
                write_adapters(out / ADAPTERS_DIR, trained_adapters(lm), cfg,
                               {"step": step, "bundle": str(bundle), **summary,
                                "loss_config": opts.loss.to_dict()})
                if step != opts.steps:
                    progress.note(f"step {step}: checkpoint {path}")
    say(f"adapters: {out / ADAPTERS_DIR}")
    return metrics


def validation_loss(steps: Steps, samples: list[Sample], store: ImageStore, cfg,
                    opts: TrainOptions, rank: int, world: int, group) -> dict[str, float]:
    """The loss over the validation samples (all, or the first `val_batches` batches),
    each process its slice of every batch, normalised over the whole set."""
    size = opts.batch_size
    starts = list(range(0, len(samples), size))[: opts.val_batches or None]
    sums = np.zeros(2)
    totals = np.zeros(2)
    for s in starts:
        chunk = samples[s: s + size]
        mine = chunk[rank::world]
        if not mine:
            continue
        b = make_batch(mine, store, cfg, opts.loss)
        sums += np.array(steps.validate(b.codes, b.images, b.w_text, b.w_audio))
        totals += [float(mx.sum(b.w_text)), float(mx.sum(b.w_audio))]
    both = np.array(mx.distributed.all_sum(mx.array(np.concatenate([sums, totals]),
                                                     dtype=mx.float32), group=group))
    text = both[0] / both[2] if both[2] > 0 else 0.0
    audio = both[1] / both[3] if both[3] > 0 else 0.0
    return {"val_loss": float(opts.loss.text_weight * text + opts.loss.audio_weight * audio),
            "val_text_loss": float(text), "val_audio_loss": float(audio)}


class _Window:
    """Sums over the steps since the last report."""

    def __init__(self) -> None:
        self.reset()
        self.t_start = time.perf_counter()

    def reset(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.sums = np.zeros(2)
        self.totals = np.zeros(2)
        self.samples = 0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, reduced: np.ndarray, totals: np.ndarray, seconds: float) -> None:
        self.n += 1
        self.loss += float(reduced[0])
        self.sums += reduced[1:3]
        self.totals += totals[:2]
        self.samples += int(totals[2])
        self.tokens += int(totals[3])
        self.seconds += seconds

    def flush(self, step: int, lr: float, grad_norm: float) -> dict[str, Any]:
        t = max(self.seconds, 1e-9)
        m = {"step": step, "loss": self.loss / max(self.n, 1),
             "text_loss": self.sums[0] / self.totals[0] if self.totals[0] else 0.0,
             "audio_loss": self.sums[1] / self.totals[1] if self.totals[1] else 0.0,
             "learning_rate": lr, "grad_norm": grad_norm,
             "samples_per_s": self.samples / t, "tokens_per_s": self.tokens / t,
             "peak_memory_gb": mx.get_peak_memory() / 1e9,
             "elapsed_s": time.perf_counter() - self.t_start}
        m = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in m.items()}
        self.reset()
        return m

    @staticmethod
    def stats(m: dict[str, Any]) -> str:
        if not m:
            return ""
        return (f"loss {m['loss']:.3f}  {m['samples_per_s']:.1f} samples/s  "
                f"{m['tokens_per_s']:.0f} tok/s  peak {m['peak_memory_gb']:.2f} GB")


class _Log:
    """OUT/log.jsonl: one JSON object per report and per validation (appended)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

