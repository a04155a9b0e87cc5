"""moshivis-eval end to end on the tiny random bundle: spoken questions (espeak-ng) and
text questions, sharded and merged, killed and resumed. Greedy decoding, each question in
a fresh conversation: a sample's prediction is the same whichever run produced it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from app_support import app_env, demo_bundle
from eval_support import COCO_QUESTIONS, make_benchmark

from moshivis_mlx.errors import EXIT_USAGE
from moshivis_mlx.eval.report import TIMING_FIELDS

pytestmark = [pytest.mark.system("espeak-ng", "sox"), pytest.mark.slow]

# Short conversations: a 0.4 s opening, answers end after 0.5 s of silence or 3 s.
CONVERSATION = ["--opening-s", "0.4", "--answer-silence", "0.5", "--max-answer-seconds", "3"]


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_benchmark(tmp_path_factory.mktemp("coco"), "coco")


def coco_args(b, bundle, out, *extra):
    return ["--task", "coco", "--data", b.data, "--images", b.images, "--annotations",
            b.annotations, "--weights", bundle, "--out", out, *CONVERSATION, *extra]


def run_cli(*args) -> int:
    from moshivis_mlx.cli.eval import main

    return main([str(a) for a in args])


def predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def without_timing(records):
    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records),
                  key=lambda r: r["index"])


@pytest.fixture(scope="module")
def full_run(coco, bundle, tmp_path_factory):
    """One uninterrupted, unsharded run of the spoken COCO questions."""
    out = tmp_path_factory.mktemp("full")
    t0 = time.perf_counter()
    assert run_cli(*coco_args(coco, bundle, out)) == 0
    return out, time.perf_counter() - t0


def test_audio_prompts(full_run, bundle, capsys):
    out, seconds = full_run
    records = predictions(out)
    assert [r["sample_id"] for r in records] == [q[0] for q in COCO_QUESTIONS]
    for r in records:
        assert r["stop"] in ("silence", "cap") and r["references"] and r["question_frames"] > 5
        assert r["answer_s"] <= 3.0 + 0.08 and r["model_s"] > 0
        assert isinstance(r["prediction"], str)
    assert any(r["prediction"] for r in records), "the random model says something"
    # Each image is encoded once, for the first of its questions.
    assert [r["image_s"] > 0 for r in records] == [True, False, True, False, True]

    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "coco" and m["mode"] == "audio" and m["metric"] == "CIDEr-D"
    assert m["samples_scored"] == 5 and m["complete"] and m["bundle"] == str(bundle)
    assert m["quantization"] == "float32" and m["sampling"] == "greedy (text and audio)"
    assert m["ci95"][0] <= m["score"] <= m["ci95"][1] and "bootstrap" in m["ci_method"]
    assert set(m["per_sample"]) == {str(q[0]) for q in COCO_QUESTIONS}
    table = (out / "results.md").read_text()
    for text in ("COCO captions", "audio prompts", str(bundle), "float32", "| samples scored | 5",
                 "CIDEr-D (raw)", "CIDEr-D (lenient)", "95% CI", "time per sample",
                 "First sentence only".lower()):
        assert text.lower() in table.lower(), text
    per_sample = m["time_per_sample_s"]
    assert 0 < per_sample < seconds
    print(f"\ntiny model, audio prompts: {per_sample:.2f} s per sample "
          f"({sum(r['frames'] for r in records) / 5:.0f} frames a sample)")


def test_rerun_does_nothing(full_run, coco, bundle, capsys):
    out, _ = full_run
    before = (out / "predictions.jsonl").read_bytes()
    assert run_cli(*coco_args(coco, bundle, out)) == 0
    assert "5 done already" in capsys.readouterr().out
    assert (out / "predictions.jsonl").read_bytes() == before
    # Other settings in the same directory are refused.
    assert run_cli(*coco_args(coco, bundle, out, "--mode", "text")) == EXIT_USAGE
    assert "holds a run with another mode" in capsys.readouterr().err


def test_sharded_interrupted_resumed_merged(full_run, coco, bundle, tmp_path):
    """Shard 0/2 in one go; shard 1/2 killed after its first prediction, then resumed;
    merged, they equal the uninterrupted run (timings aside)."""
    full, _ = full_run
    s0, s1, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "merged"
    assert run_cli(*coco_args(coco, bundle, s0, "--shard", "0/2")) == 0
    # Groups by image, dealt round robin: images 42 and 19 to shard 0, image 7 to shard 1.
    assert [r["image_id"] for r in predictions(s0)] == [42, 42, 19]

    cmd = [sys.executable, "-m", "moshivis_mlx.cli.eval",
           *map(str, coco_args(coco, bundle, s1, "--shard", "1/2"))]
    p = subprocess.Popen(cmd, env=app_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    pred = s1 / "predictions.jsonl"
    while time.monotonic() < deadline and p.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 1:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()
    assert len(predictions(s1)) == 1, "killed after its first sample"
    assert not (s1 / "metrics.json").exists()

    assert run_cli(*coco_args(coco, bundle, s1, "--shard", "1/2")) == 0  # resumes
    assert [r["sample_id"] for r in predictions(s1)] == [103, 104]

    assert run_cli("merge", "--out", merged, s0, s1) == 0
    assert without_timing(predictions(merged)) == without_timing(predictions(full))
    m, m_full = (json.loads((d / "metrics.json").read_text()) for d in (merged, full))
    assert m["score"] == pytest.approx(m_full["score"]) and m["samples_scored"] == 5
    assert m["shards"] == {"of": 2, "merged": [0, 1], "missing": []} and m["complete"]
    assert "| samples scored | 5 |" in (merged / "results.md").read_text()

    # A shard missing is said; shards of different runs are refused.
    assert run_cli("merge", "--out", tmp_path / "half", s0) == 0
    half = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert half["shards"]["missing"] == [1] and half["samples_scored"] == 3
    assert run_cli("merge", "--out", tmp_path / "bad", s0, full) == EXIT_USAGE


def test_text_prompts_vqav2(bundle, tmp_path, capsys):
    b = make_benchmark(tmp_path, "vqav2", spoken=False)
    out = tmp_path / "out"
    assert run_cli("--task", "vqav2", "--data", b.data, "--images", b.images, "--annotations",
                   b.annotations, "--weights", bundle, "--out", out, "--mode", "text",
                   *CONVERSATION) == 0
    records = predictions(out)
    assert [r["image_id"] for r in records] == [42, 42, 7]  # from the VQAv2 annotations
    for r in records:
        # The question went into the model's text stream, token by token.
        assert r["during_question"] == r["question"]
        assert r["question_frames"] <= len(r["question"]) and len(r["references"]) == 10
    assert records[0]["answer_type"] == "number"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "VQA accuracy" and m["mode"] == "text" and m["units"] == "%"
    assert "text prompts" in (out / "results.md").read_text()


def test_seeded_runs_replay(coco, bundle, tmp_path):
    """--seed samples with the bundle's settings; each question replays exactly."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_cli(*coco_args(coco, bundle, out, "--seed", "3", "--limit", "2")) == 0
    assert without_timing(predictions(a)) == without_timing(predictions(b))
    m = json.loads((a / "metrics.json").read_text())
    assert m["sampling"].startswith("sampled, seed 3") and m["samples_scored"] == 2
