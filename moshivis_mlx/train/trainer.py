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
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_ADAPTER_VALUE, write_adapters
from ..errors import MoshivisError, UsageError, WeightsError, check_option
from ..fileio import atomic_write, output_lock
from ..loader import BundleOptions
from ..sampling import MAX_SEED
from . import checkpoint
from .batches import Order, collate, shard
from .dataset import FRAME_RATE, NOTE_KINDS, SPEECHLESS_AUDIO, ImageStore, Preparer, Sample
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


MAX_COUNT = 10**9
LIMITS: dict[str, tuple[float, float, bool]] = {
    # option: (low, high, whether low itself is refused)
    "steps": (1, MAX_COUNT, False), "batch_size": (1, 1 << 16, False),
    "grad_accum": (1, 1 << 16, False), "learning_rate": (0, 1, True),
    "warmup": (0, MAX_COUNT, False), "weight_decay": (0, 1e6, False),
    "max_grad_norm": (0, 1e6, False), "p_audio": (0, 1, False),
    "max_seconds": (0, 3600, True), "seed": (0, MAX_SEED, False),
    "val_every": (1, MAX_COUNT, False), "val_batches": (1, MAX_COUNT, False),
    "save_every": (1, MAX_COUNT, False), "keep_checkpoints": (1, 1 << 20, False),
    "report_every": (1, MAX_COUNT, False)}
"""The range of every numeric option (None, where allowed, means its default). An hour
is the longest window (a 30 s one is the paper's); a learning rate above 1 only
diverges; a checkpoint must be kept (0 would keep none to resume from)."""
LOSS_LIMITS: dict[str, tuple[float, float, bool]] = {
    "text_padding_weight": (0, 1e4, False), "first_codebook_weight": (0, 1e4, False),
    "audio_codebooks": (1, 64, False), "user_text_weight": (0, 1e4, False),
    "text_loss_weight": (0, 1e4, False), "audio_loss_weight": (0, 1e4, False)}
LOSS_FIELDS = {"text_padding_weight": "text_padding_weight",
               "first_codebook_weight": "first_codebook_weight",
               "audio_codebooks": "audio_codebooks", "user_text_weight": "user_text_weight",
               "text_loss_weight": "text_weight", "audio_loss_weight": "audio_weight"}
"""Option name -> LossConfig field."""


def check_range(name: str, value: float | int | None, low: float, high: float,
                open_low: bool = False) -> None:
    """The option of field `name` (learning_rate: --learning-rate) in its range."""
    check_option("--" + name.replace("_", "-"), value, low, high, open_low)


def check_ranges(values: dict[str, float | int | None], steps: int | None = None) -> None:
    """Each of `values` (option name -> value) in its range of `LIMITS`; the warm-up
    within the steps."""
    for name, value in values.items():
        check_range(name, value, *LIMITS[name])
    warmup = values.get("warmup")
    if warmup is not None and steps is not None and warmup > steps:
        raise UsageError(f"--warmup must be in [0, --steps {steps}], got {warmup}")


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
        """Every option in its range (NaN and infinity fail every range), before anything
        loads; one line naming the option."""
        check_ranges({name: getattr(self, name) for name in LIMITS}, self.steps)
        for name in LOSS_LIMITS:
            check_range(name, getattr(self.loss, LOSS_FIELDS[name]), *LOSS_LIMITS[name])
        if self.batch_size % world:
            raise UsageError(f"--batch-size {self.batch_size} does not split over {world} "
                             f"processes (each takes an equal share)")
        if self.learning_rate * self.weight_decay >= 1:
            raise UsageError(f"--weight-decay {self.weight_decay:g} with --learning-rate "
                             f"{self.learning_rate:g} would shrink the adapters by "
                             f"{self.learning_rate * self.weight_decay:g} of themselves a step "
                             f"(their product must be < 1)")
        if self.speechless_audio not in SPEECHLESS_AUDIO:
            raise UsageError(f"--speechless-audio must be one of {', '.join(SPEECHLESS_AUDIO)}")

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


LOCK_FIX = "wait for it to finish, or give another --out"


class Diverged(MoshivisError):
    """The loss or the adapters stopped being finite: the run stops at that step, before
    anything of it is saved."""


def within_bounds(params: Any) -> mx.array:
    """A lazy scalar: every adapter value within `MAX_ADAPTER_VALUE` (NaN fails), what a
    set must hold to be saved or used."""
    flags = [mx.all(mx.isfinite(v)) & (mx.max(mx.abs(v)) <= MAX_ADAPTER_VALUE)
             for _, v in tree_flatten(params)]
    return mx.all(mx.stack(flags)) if flags else mx.array(True)


def divergence(loss: float, lm, optimizer: optim.Optimizer) -> str | None:
    """Why the step just taken diverged (None: it did not)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    from ..bundle import non_finite

    if not within_bounds(lm.trainable_parameters()).item():
        return (f"the adapters hold NaN, infinite or absurd values (beyond "
                f"{MAX_ADAPTER_VALUE:g} in magnitude)")
    if non_finite(dict(tree_flatten(optimizer.state))):
        return "the optimizer's moments became NaN or infinite"
    return None


def publish(out: Path, step: int, adapters: dict[str, mx.array], cfg, bundle: Path,
            summary: dict[str, Any], loss: LossConfig) -> None:
    """OUT/adapters := the adapters of `step` (a failed write is one line)."""
    try:
        write_adapters(out / ADAPTERS_DIR, adapters, cfg,
                       {"step": step, "bundle": str(bundle), **summary,
                        "loss_config": loss.to_dict()})
    except (OSError, RuntimeError) as e:
        raise checkpoint.write_failed(out / ADAPTERS_DIR, e) from None


def published_step(out: Path) -> int | None:
    """The step of OUT/adapters, if it is there and whole (None otherwise)."""
    try:
        doc = json.loads((out / ADAPTERS_DIR / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        step = doc["training"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    whole = (out / ADAPTERS_DIR / ADAPTER_WEIGHTS).is_file()
    return step if whole and isinstance(step, int) else None


def train(opts: TrainOptions, console=None) -> dict[str, Any]:
    """Runs (or resumes) one training; returns the last metrics. Everything the user
    gives is checked before the model loads, and process 0 holds `--out`'s lock for the
    whole run (a second run on it is refused at once)."""
    from ..loader import resolve
    from ..paths import check_outputs, check_writable

    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    opts.check(world)
    out = Path(os.path.abspath(Path(opts.out).expanduser()))
    cache = Path(opts.cache).expanduser() if opts.cache else out / "cache"
    show = rank == 0
    say = (lambda text: console.print(text, highlight=False, soft_wrap=True)) \
        if show and console is not None else (lambda text: None)

    babillage = BabillageFiles()
    train_entries = read_manifest(opts.train, babillage)
    valid_entries = read_manifest(opts.valid, babillage) if opts.valid else []
    bundle = resolve(opts.bundle.weights, opts.bundle.hf_repo, opts.bundle.quantize, note=say)
    check_outputs({"--out": out, "--cache": cache},
                  {"the bundle": bundle, "--train": opts.train, "--valid": opts.valid})
    check_writable(out, "write the run into", directory=True, fix="give another --out")
    check_writable(cache, "cache the encodings in", directory=True, fix="give another --cache")
    with output_lock(out, LOCK_FIX) if show else nullcontext(out):
        if show:
            left = checkpoint.sweep(out, cache)
            if left:
                say(f"removed {len(left)} half-written file(s) a stopped run left in {out}")
        return _train(opts, out, cache, bundle, train_entries, valid_entries, babillage,
                      group, console, say)


def _train(opts: TrainOptions, out: Path, cache: Path, bundle: Path, train_entries,
           valid_entries, babillage, group, console, say) -> dict[str, Any]:
    from ..loader import load
    from ..progress import Counter

    rank, world = group.rank(), group.size()
    show = rank == 0
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
    log = _Log(out / LOG if show else None)
    for note in preparer.notes:
        log.write({"step": 0, **note})
    if preparer.notes:
        say(f"note: {notes_summary(preparer.notes)} (each in {out / LOG})")

    n_trainable = prepare_for_training(lm, opts.grad_checkpoint, str(bundle))
    optimizer = make_optimizer(opts)
    optimizer.init(lm.trainable_parameters())
    start = 0
    if resume_from is not None:
        weights = checkpoint.restore(resume_from, optimizer, lm.trainable_parameters())
        lm.load_weights(list(weights.items()), strict=False)
        state = checkpoint.load_state(resume_from)
        start = state["step"]
        say(f"resuming from {resume_from} (step {start})")
        if show and published_step(out) != start:
            # Stopped between the checkpoint and OUT/adapters: bring them up to it.
            publish(out, start, weights, cfg, bundle, state.get("summary", {}), opts.loss)
            say(f"{out / ADAPTERS_DIR}: brought up to the checkpoint of step {start}")
    mx.eval(lm.parameters(), optimizer.state)
    steps = Steps(lm, optimizer, opts, group)
    say(f"training {n_trainable / 1e6:.2f}M adapter parameters for {opts.steps} steps, "
        f"batch {opts.batch_size} x {opts.grad_accum} accumulated"
        + (f", {world} processes" if world > 1 else ""))

    if show:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / RUN, json.dumps({"settings": settings, "processes": world},
                                               indent=2) + "\n")
        except OSError as e:
            raise checkpoint.write_failed(out / RUN, e) from None
    order = Order(train_samples, opts.p_audio, opts.seed)
    batches = order.batches(opts.batch_size, start * opts.grad_accum)
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
            why = divergence(float(reduced[0]), lm, optimizer)
            if why is not None:
                log.write({"step": step, "diverged": why})
                raise _diverged(out, step, why)
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
                publish(out, step, trained_adapters(lm), cfg, bundle, summary, opts.loss)
                if step != opts.steps:
                    progress.note(f"step {step}: checkpoint {path}")
    say(f"adapters: {out / ADAPTERS_DIR}"
        + (f" ({notes_summary(preparer.notes)}: see {out / LOG})" if preparer.notes else ""))
    return metrics


def _diverged(out: Path, step: int, why: str) -> Diverged:
    last = checkpoint.latest(out)
    kept = (f"the last checkpoint ({last.name}) and {out / ADAPTERS_DIR} are kept"
            if last is not None else "no checkpoint had been saved yet")
    return Diverged(f"step {step}: the run diverged ({why}); nothing of this step was saved, "
                    f"{kept}", "lower --learning-rate (or set --max-grad-norm) and train "
                               "again into another --out")


def notes_summary(notes: list[dict[str, Any]]) -> str:
    """'2 samples cut to --max-seconds, 1 with dropped words (train.jsonl:3, ...)'."""
    from ..bundle import listing

    counts: dict[str, int] = {}
    for n in notes:
        counts[n["kind"]] = counts.get(n["kind"], 0) + 1
    where = listing(sorted({n["sample"] for n in notes}), 3)
    parts = [f"{c} sample{'s' if c > 1 else ''} {NOTE_KINDS[k]}" for k, c in counts.items()]
    return f"{', '.join(parts)} ({where})"


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise checkpoint.write_failed(self.path, e) from None

