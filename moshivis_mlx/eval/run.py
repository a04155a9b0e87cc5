"""moshivis-eval's runner: plan the samples, load the model, ask every question, write
each prediction as it comes, then score.

The plan is deterministic: the dataset's samples in file order, the first `limit` of
them, grouped by image (in the order each image first appears), the groups dealt round
robin to the `shard` I of N. So the N shards of a run partition exactly the samples of
the unsharded run, every image's keys and values are computed in one shard only, and,
each question being asked in a fresh conversation (greedy, or a seeded sampler restarted
per question), a sample's prediction does not depend on which shard or which attempt
produced it: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..babillage import TASKS, Babillage, DataError, Sample, parquet_files
from ..errors import UsageError
from ..loader import BundleOptions, resolve
from ..progress import Counter
from ..session import Session
from .answer import MODES, Answerer, AnswerSettings
from .data import ImageFolder, References, load_references
from .metrics import running_score
from .report import (
    PREDICTIONS,
    PredictionWriter,
    read_predictions,
    read_run,
    write_reports,
    write_run,
)


@dataclass
class EvalOptions:
    task: str
    data: Path
    images: Path
    out: Path
    annotations: Path | None = None
    split: str | None = None
    mode: str = "audio"
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    bundle: BundleOptions = field(default_factory=BundleOptions)
    seed: int | None = None
    settings: AnswerSettings = field(default_factory=AnswerSettings)
    ptb: str = "python"

    def check(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r} (choose {', '.join(TASKS)})")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r} (choose {' or '.join(MODES)})")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise UsageError(f"--shard {i}/{n}: I must be in 0..N-1")
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be at least 1")
        s = self.settings
        if s.opening_s < 0 or s.silence_s <= 0 or s.max_answer_s <= 0:
            raise UsageError("--opening-s must be >= 0, --answer-silence and "
                             "--max-answer-seconds > 0")
        if self.ptb not in ("python", "java"):
            raise UsageError("--ptb is python or java")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: write I/N, e.g. 0/4 (the first of 4)") from None
    return i, n


# -- the plan --------------------------------------------------------------------------------

@dataclass
class Group:
    """The samples about one image."""

    image_id: int | str
    path: Path
    samples: list[Sample]


@dataclass
class Plan:
    dataset: Babillage
    references: References
    groups: list[Group]

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]


def make_plan(opts: EvalOptions) -> Plan:
    dataset = Babillage(parquet_files(opts.data, opts.task, opts.split), opts.task)
    samples = dataset.samples[: opts.limit] if opts.limit else list(dataset.samples)
    if not samples:
        raise DataError(f"{opts.data}: no samples")
    seen: set[int] = set()
    for s in samples:
        if s.sample_id in seen:
            raise DataError(f"{opts.data}: sample_id {s.sample_id} appears twice")
        seen.add(s.sample_id)
    refs = load_references(opts.task, opts.annotations, samples, dataset)
    folder = ImageFolder(opts.images)
    by_image: dict[Any, list[Sample]] = {}
    for s in samples:
        image = refs.image_of.get(s.sample_id, s.image_id)
        by_image.setdefault(image, []).append(s)
    i, n = opts.shard
    groups = []
    for k, (image, members) in enumerate(by_image.items()):
        if k % n != i:
            continue
        path = folder.path(image, refs.file_names.get(image), members[0].sample_id)
        groups.append(Group(image, path, members))
    return Plan(dataset, refs, groups)


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Models:
    bundle: Path
    quantization: str
    answerer: Answerer
    vision: Any
    sampling: str


def read_trained(path: Path | None):
    """Fine-tuned adapters (moshivis-train's OUT/adapters), read before anything is loaded
    so that a bad directory fails at once; checked against the model when put on it."""
    if path is None:
        return None
    from ..adapters import read_adapters

    return read_adapters(path)


def describe_sampling(opts: EvalOptions, bundle: Path) -> str:
    if opts.seed is None:
        return "greedy (text and audio)"
    from ..bundle import load_generation

    g = load_generation(bundle)
    return (f"sampled, seed {opts.seed} (text T={g.text_temperature} top-k {g.text_top_k}, "
            f"audio T={g.audio_temperature} top-k {g.audio_top_k})")


def bundle_quantization(bundle: Path) -> str:
    from ..bundle import read_config
    from ..loader import quantization_label

    return quantization_label(read_config(bundle))


def load_models(opts: EvalOptions, bundle: Path, adapters: Any = None,
                note: Callable[[str], None] = lambda line: None) -> Models:
    """The bundle's models (with `adapters` on the language model) around one answering
    session; `note(line)` hears remarks (weights close to what the GPU keeps resident)."""
    from ..loader import load

    model = load(bundle, adapters=adapters, vision=True, note=note)
    generator = model.generator(seed=opts.seed, greedy=opts.seed is None)
    session = Session(model.stream(generator))
    return Models(bundle, model.quantization, Answerer(session, opts.settings), model.vision,
                  describe_sampling(opts, bundle))


# -- the run -------------------------------------------------------------------------------------

METRIC_SHORT = {"coco": "CIDEr", "vqav2": "VQA acc", "ocrvqa": "acc"}


def run_settings(opts: EvalOptions, plan: Plan, bundle: Path, quantization: str,
                 sampling: str) -> dict[str, Any]:
    return {
        "task": opts.task, "split": opts.split or None, "mode": opts.mode,
        "data": [f.name for f in plan.dataset.files], "bundle": str(bundle),
        "quantization": quantization, "sampling": sampling, "settings": opts.settings.to_dict(),
        "limit": opts.limit, "ptb": opts.ptb, "shard": list(opts.shard),
        "planned": len(plan.samples),
        "adapters": str(Path(opts.bundle.adapters).resolve()) if opts.bundle.adapters else None,
    }


def _check_resumable(out: Path, run: dict[str, Any]) -> None:
    old = read_run(out)
    if old is None:
        return
    for k in ("task", "split", "mode", "data", "bundle", "quantization", "sampling", "settings",
              "limit", "shard", "ptb", "adapters"):
        if old.get(k) != run.get(k):
            raise UsageError(f"{out} holds a run with another {k} ({old.get(k)!r}, this one "
                             f"{run.get(k)!r})", "give another --out, or the same options")


@contextmanager
def _writer(path: Path) -> Iterator[PredictionWriter]:
    w = PredictionWriter(path)
    try:
        yield w
    finally:
        w.close()


def question_audio(plan: Plan, sample: Sample, rate: int):
    from ..resample import resample

    pcm, sr = plan.dataset.question_audio(sample)
    return resample(pcm, sr, rate) if sr != rate else pcm


def evaluate(opts: EvalOptions, console: Console) -> dict[str, Any]:
    """Runs (or resumes) one evaluation; returns its metrics."""
    opts.check()
    if opts.split is None:
        from ..babillage import DEFAULT_SPLIT

        opts = replace(opts, split=DEFAULT_SPLIT[opts.task])
    out = Path(opts.out).expanduser()
    trained = read_trained(opts.bundle.adapters)
    plan = make_plan(opts)
    b = opts.bundle
    bundle = resolve(b.weights, b.hf_repo, b.quantize,
                     note=lambda line: console.print(line, highlight=False))
    run = run_settings(opts, plan, bundle, bundle_quantization(bundle),
                       describe_sampling(opts, bundle))
    _check_resumable(out, run)
    out.mkdir(parents=True, exist_ok=True)
    write_run(out, run)
    done = {r["sample_id"]: r for r in read_predictions(out / PREDICTIONS)}
    planned_ids = {s.sample_id for s in plan.samples}
    todo = [g for g in plan.groups if any(s.sample_id not in done for s in g.samples)]
    records = [r for sid, r in done.items() if sid in planned_ids]
    shard = f", shard {opts.shard[0]}/{opts.shard[1]}" if opts.shard[1] > 1 else ""
    console.print(f"{opts.task} ({opts.split}), {opts.mode} prompts: {len(plan.samples)} "
                  f"samples about {len(plan.groups)} images{shard}"
                  + (f"; {len(records)} done already" if records else ""), highlight=False,
                  soft_wrap=True)
    if todo:
        console.print(f"loading {bundle} ({run['quantization']}) ...", highlight=False,
                      soft_wrap=True)
        models = load_models(opts, bundle, trained,
                             note=lambda line: console.print(line, highlight=False))
        records += _ask(opts, plan, models, todo, done, records, out, console)
    metrics = write_reports(out, run, records)
    others = "".join(f", {o['name']} {o['score']:.1f}" for o in metrics["other_scores"])
    console.print(f"{metrics['metric']} ({metrics['score_name']}): {metrics['score']:.1f} "
                  f"(95% CI {metrics['ci95'][0]:.1f}-{metrics['ci95'][1]:.1f}){others}, "
                  f"{metrics['normalised_name']} {metrics['normalised_score']:.1f}, "
                  f"{metrics['samples_scored']} samples, "
                  f"{metrics['time_per_sample_s'] or 0:.2f} s per sample -> {out}",
                  highlight=False, soft_wrap=True)
    return metrics


def _ask(opts: EvalOptions, plan: Plan, models: Models, groups: list[Group],
         done: dict[int, dict], records: list[dict], out: Path, console: Console) -> list[dict]:
    answerer = models.answerer
    refs = plan.references
    new: list[dict] = []
    scored = [(r["prediction"], r["references"]) for r in records]
    last_scored = len(scored)
    metric, total = METRIC_SHORT[opts.task], len(plan.samples)
    done_now, t_start = len(records), time.perf_counter()
    with _writer(out / PREDICTIONS) as writer, \
            Counter(console, unit="samples", transient=False, every=0.05) as bar:
        task = bar.add("samples", total, completed=done_now)
        latest = float("nan")
        for group in groups:
            t0 = time.perf_counter()
            answerer.set_image(models.vision.encode_image(group.path))
            image_s = time.perf_counter() - t0
            for sample in group.samples:
                if sample.sample_id in done:
                    continue
                if opts.mode == "audio":
                    question = question_audio(plan, sample, answerer.sample_rate)
                else:
                    question = sample.question
                a = answerer.answer(question, opts.mode)
                record = {
                    "index": sample.index, "sample_id": sample.sample_id,
                    "image_id": group.image_id, "image": group.path.name,
                    "question": sample.question, "prediction": a.text,
                    "references": refs.answers[sample.sample_id], "stop": a.stop,
                    "opening": a.opening, "during_question": a.during_question,
                    "frames": a.frames, "question_frames": a.question_frames,
                    "answer_s": a.answer_s, "model_s": round(a.seconds, 4),
                    "image_s": round(image_s, 4), **refs.extra.get(sample.sample_id, {}),
                }
                image_s = 0.0  # the image is encoded once for the group
                writer.write(record)
                new.append(record)
                scored.append((a.text, record["references"]))
                if len(scored) - last_scored >= max(1, last_scored // 20):
                    latest = running_score(opts.task, [p for p, _ in scored],
                                           [r for _, r in scored])
                    last_scored = len(scored)
                done_now += 1
                rate = len(new) / max(time.perf_counter() - t_start, 1e-9)
                score = f" \u00b7 {metric} {latest:.1f}" if latest == latest else ""
                bar.update(task, done_now, rate=f"{rate:.2f} samples/s{score}")
    return new
