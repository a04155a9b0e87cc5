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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..babillage import TASKS, Babillage, DataError, Sample, parquet_files
from ..errors import ImageError, UsageError, check_option
from ..fileio import fingerprint, output_lock
from ..loader import BundleOptions, resolve
from ..paths import check_outputs, check_writable
from ..progress import Counter
from ..sampling import MAX_SEED
from ..session import ANSWER_LIMIT_S, Session
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

MAX_OPENING_S = 60.0
"""The longest opening (the released model greets in about 2 s)."""


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
        check_option("--opening-s", s.opening_s, 0, MAX_OPENING_S, unit="seconds")
        check_option("--answer-silence", s.silence_s, 0, ANSWER_LIMIT_S, open_low=True,
                     unit="seconds")
        check_option("--max-answer-seconds", s.max_answer_s, 0, ANSWER_LIMIT_S, open_low=True,
                     unit="seconds")
        check_option("--seed", self.seed, 0, MAX_SEED)
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
    if not groups:
        raise UsageError(f"--shard {i}/{n}: the {len(by_image)} images of this run leave "
                         f"shard {i} none", f"split it into at most {len(by_image)} shards")
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


LOCK_FIX = "wait for it to finish (the same command then resumes), or give another --out"
"""What to do when --out is being written by another run."""
MAX_QUESTION_S = 120.0
"""The longest question asked (Babillage's last 2 to 4 s); a longer one is skipped, with a
note and a record saying why, rather than cut (a cut question is another question)."""
LONG_QUESTION_S = 30.0
"""A question longer than this is announced with its length (its conversation takes a
while before the counter moves)."""


def run_settings(opts: EvalOptions, plan: Plan, bundle: Path, quantization: str,
                 sampling: str) -> dict[str, Any]:
    """run.json: what was run. The bundle and the adapters are identified by what they
    hold (fileio.fingerprint), not only by their path: a bundle rebuilt at the same path
    is another model."""
    return {
        "task": opts.task, "split": opts.split or None, "mode": opts.mode,
        "data": [f.name for f in plan.dataset.files], "bundle": str(bundle),
        "bundle_id": fingerprint(bundle),
        "quantization": quantization, "sampling": sampling, "settings": opts.settings.to_dict(),
        "limit": opts.limit, "ptb": opts.ptb, "shard": list(opts.shard),
        "planned": len(plan.samples),
        "adapters": str(Path(opts.bundle.adapters).resolve()) if opts.bundle.adapters else None,
        "adapters_id": fingerprint(opts.bundle.adapters) if opts.bundle.adapters else None,
    }


RESUMED_SAME = ("task", "split", "mode", "data", "bundle", "bundle_id", "quantization",
                "sampling", "settings", "limit", "shard", "ptb", "adapters", "adapters_id")
"""What a rerun in the same --out must share with the run there (a key the older run.json
lacks is not compared)."""


def _check_resumable(out: Path, run: dict[str, Any]) -> None:
    old = read_run(out)
    if old is None:
        return
    if old.get("merged_from"):
        raise UsageError(f"{out} holds merged shards (made by moshivis-eval merge), not a run "
                         f"to resume", "give another --out")
    for k in RESUMED_SAME:
        if k in old and old.get(k) != run.get(k):
            what = {"bundle_id": "bundle content (the bundle was rebuilt or changed)",
                    "adapters_id": "adapters content (they were retrained or changed)"}.get(k, k)
            raise UsageError(f"{out} holds a run with another {what} ({old.get(k)!r}, this one "
                             f"{run.get(k)!r})", "give another --out, or the same options")


def check_out(opts: EvalOptions, bundle: Path) -> None:
    """--out may not be (or lie inside) anything the run reads: the bundle, the data, the
    images, the annotations, the adapters; and it must be a directory that can be
    written. Checked before the lock (which is a file next to --out)."""
    check_outputs({"--out": Path(opts.out)},
                  {"the bundle": bundle, "--data": Path(opts.data), "--images": Path(opts.images),
                   "--annotations": opts.annotations, "--adapters": opts.bundle.adapters})
    check_writable(opts.out, "write the evaluation to", directory=True)


@contextmanager
def _writer(path: Path) -> Iterator[PredictionWriter]:
    w = PredictionWriter(path)
    try:
        yield w
    finally:
        w.close()


def question_input(plan: Plan, sample: Sample, mode: str, answerer: Answerer
                   ) -> str | np.ndarray:
    """The question as the answerer takes it: its text, or its audio at the model's rate.
    A DataError naming the file, the row and the column when it cannot be asked (an
    empty, undecodable or overlong cell): the sample is then skipped."""
    if mode == "text":
        where = plan.dataset.where(sample, "question_transcript")
        if not sample.question:
            raise DataError(f"{where}: the question is empty")
        frames = len(answerer.question_tokens(sample.question))
        if frames * answerer.frame_s > MAX_QUESTION_S:
            raise DataError(f"{where}: the question is {frames} tokens, more than the "
                            f"{MAX_QUESTION_S:g} s ({round(MAX_QUESTION_S / answerer.frame_s)} "
                            f"tokens) a question may last")
        return sample.question
    from ..resample import resample

    pcm, sr = plan.dataset.question_audio(sample, MAX_QUESTION_S)
    rate = answerer.sample_rate
    return resample(pcm, sr, rate) if sr != rate else pcm


def evaluate(opts: EvalOptions, console: Console) -> dict[str, Any]:
    """Runs (or resumes) one evaluation; returns its metrics. Every option is checked
    before anything is read, every input before the model loads; --out is locked for the
    whole run, so a second run on it is refused at once."""
    opts.check()
    if opts.split is None:
        from ..babillage import DEFAULT_SPLIT

        opts = replace(opts, split=DEFAULT_SPLIT[opts.task])
    trained = read_trained(opts.bundle.adapters)
    plan = make_plan(opts)
    b = opts.bundle
    bundle = resolve(b.weights, b.hf_repo, b.quantize,
                     note=lambda line: console.print(line, highlight=False))
    check_out(opts, bundle)
    with output_lock(opts.out, fix=LOCK_FIX) as out:
        return _evaluate(opts, plan, bundle, trained, out, console)


def _evaluate(opts: EvalOptions, plan: Plan, bundle: Path, trained: Any, out: Path,
              console: Console) -> dict[str, Any]:
    run = run_settings(opts, plan, bundle, bundle_quantization(bundle),
                       describe_sampling(opts, bundle))
    _check_resumable(out, run)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["sample_id"]: r for r in read_predictions(out / PREDICTIONS)}
    write_run(out, run)
    planned_ids = {s.sample_id for s in plan.samples}
    todo = [g for g in plan.groups if any(s.sample_id not in done for s in g.samples)]
    records = [r for sid, r in done.items() if sid in planned_ids]
    shard = f", shard {opts.shard[0]}/{opts.shard[1]}" if opts.shard[1] > 1 else ""
    skipped = sum(1 for r in records if r.get("skipped"))
    console.print(f"{opts.task} ({opts.split}), {opts.mode} prompts: {len(plan.samples)} "
                  f"samples about {len(plan.groups)} images{shard}"
                  + (f"; {len(records)} done already" if records else "")
                  + (f" ({skipped} skipped)" if skipped else ""), highlight=False,
                  soft_wrap=True)
    if todo:
        console.print(f"loading {bundle} ({run['quantization']}) ...", highlight=False,
                      soft_wrap=True)
        models = load_models(opts, bundle, trained,
                             note=lambda line: console.print(line, highlight=False))
        records += _ask(opts, plan, models, todo, done, records, out, console)
    metrics = write_reports(out, run, records)
    others = "".join(f", {o['name']} {o['score']:.1f}" for o in metrics["other_scores"])
    skipped = (f", {metrics['samples_skipped']} skipped (see metrics.json)"
               if metrics["samples_skipped"] else "")
    console.print(f"{metrics['metric']} ({metrics['score_name']}): {metrics['score']:.1f} "
                  f"(95% CI {metrics['ci95'][0]:.1f}-{metrics['ci95'][1]:.1f}){others}, "
                  f"{metrics['normalised_name']} {metrics['normalised_score']:.1f}, "
                  f"{metrics['samples_scored']} samples{skipped}, "
                  f"{metrics['time_per_sample_s'] or 0:.2f} s per sample -> {out}",
                  highlight=False, soft_wrap=True)
    return metrics


def _frame_progress(bar: Counter, task: Any, done: int, sample_id: int, fed: int,
                    planned: int) -> None:
    """Every 2 s of conversation, where the current sample is (a long question moves
    the bar's text, not its count)."""
    if fed % 25 == 0:
        bar.update(task, done, rate=f"sample {sample_id}: {fed}/{planned}+ frames")


def _ask(opts: EvalOptions, plan: Plan, models: Models, groups: list[Group],
         done: dict[int, dict], records: list[dict], out: Path, console: Console) -> list[dict]:
    answerer = models.answerer
    refs = plan.references
    new: list[dict] = []
    scored = [(r["prediction"], r["references"]) for r in records if not r.get("skipped")]
    last_scored = len(scored)
    metric, total = METRIC_SHORT[opts.task], len(plan.samples)
    done_now, t_start = len(records), time.perf_counter()
    with _writer(out / PREDICTIONS) as writer, \
            Counter(console, unit="samples", transient=False, every=0.05) as bar:
        task = bar.add("samples", total, completed=done_now)
        latest = float("nan")
        for group in groups:
            t0 = time.perf_counter()
            try:
                answerer.set_image(models.vision.encode_image(group.path))
                unusable = None
            except ImageError as e:  # its questions cannot be asked; the others can
                unusable = str(e)
            image_s = time.perf_counter() - t0
            for sample in group.samples:
                if sample.sample_id in done:
                    continue
                base = {"index": sample.index, "sample_id": sample.sample_id,
                        "image_id": group.image_id, "image": group.path.name,
                        "question": sample.question}
                try:
                    if unusable is not None:
                        raise DataError(f"{unusable} (the image of sample {sample.sample_id})")
                    question = question_input(plan, sample, opts.mode, answerer)
                except DataError as e:
                    # One bad cell or image does not stop the run: said, recorded, counted.
                    record = {**base, "skipped": str(e)}
                    console.print(f"skipped: {e}", highlight=False, soft_wrap=True)
                else:
                    seconds = (len(question) / answerer.sample_rate
                               if opts.mode == "audio" else 0.0)
                    if seconds > LONG_QUESTION_S:
                        console.print(f"sample {sample.sample_id}: a {seconds:.0f} s question",
                                      highlight=False)

                    a = answerer.answer(question, opts.mode, on_frame=partial(
                        _frame_progress, bar, task, done_now, sample.sample_id))
                    record = {
                        **base, "prediction": a.text,
                        "references": refs.answers[sample.sample_id], "stop": a.stop,
                        "opening": a.opening, "during_question": a.during_question,
                        "frames": a.frames, "question_frames": a.question_frames,
                        "answer_s": a.answer_s, "model_s": round(a.seconds, 4),
                        "image_s": round(image_s, 4), **refs.extra.get(sample.sample_id, {}),
                    }
                    image_s = 0.0  # the image is encoded once for the group
                    scored.append((a.text, record["references"]))
                writer.write(record)
                new.append(record)
                if len(scored) - last_scored >= max(1, last_scored // 20):
                    latest = running_score(opts.task, [p for p, _ in scored],
                                           [r for _, r in scored])
                    last_scored = len(scored)
                done_now += 1
                rate = len(new) / max(time.perf_counter() - t_start, 1e-9)
                score = f" \u00b7 {metric} {latest:.1f}" if latest == latest else ""
                bar.update(task, done_now, rate=f"{rate:.2f} samples/s{score}")
    return new
