"""The adapters learn a visual task, on this CPU: "what colour is the shape?" about
pictures of one coloured shape (4 colours: chance is 25%), speechless samples made here.

Only the adapters are trained (moshivis-train's command line); the answers are read with
moshivis-eval's machinery: its model loading with --adapters, its answering seam (the
question forced into the text stream, --mode text, which feeds Mimi's silence in the
audio streams, so training fills the speechless samples' audio with silence too) and its
exact-match metric.

Two backbones, both frozen:
* random: it cannot speak, so the adapters carry everything; the user's question is
  input only (--user-text-weight 0) and the colour is learnt from the picture;
* random, then taught the task's text without images: it says the question by itself and
  can only guess the colour, as Moshi knows the language but not the picture. Then the
  gates open where the image is needed: the step that says the colour has the highest
  mean gate (the paper's Figure 7). With the random backbone they stay level: the
  cross-attention is its only way to say anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from moshivis_mlx.cli.train import main
from train_support import QUESTION, build_task_bundle, write_task

CHANCE = 0.25


def answer_accuracy(bundle: Path, adapters: Path | None, manifest: Path) -> float:
    """Exact match of the model's answers, through moshivis-eval (text questions)."""
    from moshivis_mlx.eval.answer import AnswerSettings
    from moshivis_mlx.eval.metrics import exact_match
    from moshivis_mlx.eval.run import EvalOptions, load_models, read_trained
    from moshivis_mlx.loader import BundleOptions

    # No opening, the answer is the one step after the question.
    settings = AnswerSettings(opening_s=0.0, silence_s=0.08, max_answer_s=0.08)
    opts = EvalOptions(task="ocrvqa", data=manifest.parent, images=manifest.parent,
                       out=manifest.parent / "eval",
                       bundle=BundleOptions(weights=bundle, adapters=adapters),
                       mode="text", settings=settings)
    models = load_models(opts, bundle, read_trained(adapters))
    scores = []
    for line in manifest.read_text().splitlines():
        sample = json.loads(line)
        models.answerer.set_image(models.vision.encode_image(manifest.parent / sample["image"]))
        answer = models.answerer.answer(sample["turns"][0]["text"], "text")
        scores.append(exact_match(answer.text, [sample["turns"][1]["text"]], rule="normalised"))
    return float(np.mean(scores))


def gates_by_step(bundle: Path, adapters: Path, manifest: Path, cache: Path) -> np.ndarray:
    """The mean gate (over layers, channels and held-out samples) of each step: the
    question's steps, then the step that says the colour."""
    from moshivis_mlx.adapters import apply_adapters
    from moshivis_mlx.bundle import load_lm
    from moshivis_mlx.text import TextTokenizer, find_tokenizer
    from moshivis_mlx.train.dataset import Preparer
    from moshivis_mlx.train.manifest import read_manifest

    lm = load_lm(bundle)
    apply_adapters(lm, adapters)
    tok = TextTokenizer(find_tokenizer(bundle), lm.cfg.text_padding_ids)
    prep = Preparer(bundle, lm.cfg, tok, cache, 30.0, "silence")
    entries = read_manifest(manifest)
    prep.encode_all(entries)
    samples = prep.samples(entries)
    codes = mx.array(np.stack([s.codes for s in samples]))
    images = mx.stack([prep.images.get(s.image) for s in samples])
    out = lm.forward(codes, images, audio_codebooks=0)
    return np.array(out.gates).mean(axis=0)


def train(bundle: Path, root: Path, *flags: str) -> tuple[Path, float]:
    t0 = time.perf_counter()
    out = root / "out"
    assert main(["--weights", str(bundle), "--train", str(root / "train.jsonl"),
                 "--out", str(out), "--batch-size", "16", "--warmup", "0",
                 "--speechless-audio", "silence", "--report-every", "50",
                 "--save-every", "1000", "--no-grad-checkpoint", *flags]) == 0
    return out / "adapters", time.perf_counter() - t0


@pytest.mark.slow
def test_adapters_learn_the_colour_from_the_picture(tmp_path, capsys):
    bundle = build_task_bundle(tmp_path / "bundle")
    write_task(tmp_path, 128, "train", seed=1)
    test, _ = write_task(tmp_path, 32, "test", seed=2)
    before = answer_accuracy(bundle, None, test)
    # Closed gates: one answer whatever the picture, right for one colour in four at most.
    assert before <= CHANCE
    adapters, seconds = train(bundle, tmp_path, "--steps", "200", "--learning-rate", "1e-2",
                              "--weight-decay", "0.1", "--user-text-weight", "0")
    accuracy = answer_accuracy(bundle, adapters, test)
    gates = gates_by_step(bundle, adapters, test, tmp_path / "out" / "cache")
    with capsys.disabled():
        print(f"\nrandom backbone: held-out accuracy {accuracy:.2f} (before {before:.2f}, "
              f"chance {CHANCE}), training {seconds:.1f} s, mean gate by step "
              f"{[round(float(g), 3) for g in gates]}")
    assert accuracy >= 0.9


@pytest.mark.slow
def test_gates_open_where_the_image_is_needed(tmp_path, capsys):
    bundle = build_task_bundle(tmp_path / "bundle", teach_steps=400, audio_scale=0.1)
    write_task(tmp_path, 128, "train", seed=1)
    test, _ = write_task(tmp_path, 32, "test", seed=2)
    adapters, seconds = train(bundle, tmp_path, "--steps", "300", "--learning-rate", "3e-2",
                              "--weight-decay", "0", "--max-grad-norm", "0")
    gates = gates_by_step(bundle, adapters, test, tmp_path / "out" / "cache")
    n = len(QUESTION.split())
    question, answer = gates[:n], gates[n]
    accuracy = answer_accuracy(bundle, adapters, test)
    with capsys.disabled():
        print(f"\ntaught backbone: mean gate on the answer {answer:.3f}, on the question "
              f"{question.mean():.3f} (by step {[round(float(g), 3) for g in question]}), held-out "
              f"accuracy {accuracy:.2f}, training {seconds:.1f} s")
    assert answer > question.max()
    assert accuracy > CHANCE
