"""moshivis-train end to end on a tiny bundle: what a run writes, exact resume, refusals,
data parallelism with mlx.launch (2 processes against 1), and the adapters it makes on
top of a bundle in the app, the benchmark, moshivis-eval and moshivis-convert."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from moshivis_mlx.cli.train import main
from train_support import build_task_bundle, write_dialogue, write_task

from moshivis_mlx.adapters import ADAPTER_WEIGHTS, AdapterError, apply_adapters, read_adapters
from moshivis_mlx.bundle import load_lm
from moshivis_mlx.errors import EXIT_USAGE, EXIT_WEIGHTS


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A bundle, and manifests mixing speechless and speech samples."""
    root = tmp_path_factory.mktemp("run")
    bundle = build_task_bundle(root / "bundle")
    train, _ = write_task(root, 8, "train", 0)
    valid, _ = write_task(root, 4, "valid", 1)
    write_dialogue(root, "talk", 1.5, [("what", 0.2, 0.4), ("red", 0.8, 1.0)])
    speech = json.dumps({"image": "images/train-000.png", "audio": "talk.wav",
                         "alignment": "talk.json"})
    train.write_text(train.read_text() + speech + "\n" + speech + "\n")
    return root, bundle, train, valid


def run(task, out: Path, *extra: str) -> int:
    root, bundle, train, valid = task
    return main(["--weights", str(bundle), "--train", str(train), "--valid", str(valid),
                 "--out", str(out), "--batch-size", "4", "--learning-rate", "1e-2",
                 "--p-audio", "0.3", "--report-every", "1", "--cache", str(root / "cache"),
                 *extra])


def adapters_of(out: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters" / ADAPTER_WEIGHTS)).items()}


def test_a_run_writes_adapters_checkpoints_and_a_log(task, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(task, out, "--steps", "4", "--save-every", "2", "--val-every", "2") == 0
    said = capsys.readouterr().out
    assert "10 training samples (2 speech, 8 speechless)" in said
    assert "validation loss" in said
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    reports = [r for r in log if "loss" in r]
    assert [r["step"] for r in reports] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
               for r in reports)
    assert any(r["audio_loss"] > 0 for r in reports)  # speech samples were trained on
    assert [r["step"] for r in log if "val_loss" in r and "loss" not in r] == [2, 4]
    adapters = read_adapters(out / "adapters")
    assert adapters.training["step"] == 4 and adapters.backbone["dim"] == 64
    before = {k: np.array(v) for k, v in tree_flatten(load_lm(task[1]).parameters())}
    after = adapters_of(out)
    assert all(k in before and before[k].shape == v.shape for k, v in after.items())
    assert any(not np.array_equal(before[k], v) for k, v in after.items())
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["steps"] == 4 and run_json["processes"] == 1


def test_resume_reproduces_the_uninterrupted_run(task, tmp_path):
    whole = tmp_path / "whole"
    assert run(task, whole, "--steps", "6", "--save-every", "3") == 0
    expected = adapters_of(whole)
    # The same run stopped after its step-3 checkpoint ...
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    shutil.rmtree(cut / "adapters")
    # ... and resumed.
    assert run(task, cut, "--steps", "6", "--save-every", "3", "--resume") == 0
    got = adapters_of(cut)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in got), "resumed run differs"


def test_refusals_are_one_line(task, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(task, out, "--steps", "2", "--save-every", "1") == 0
    capsys.readouterr()
    assert run(task, out, "--steps", "2") == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds a run" in err and "--resume" in err
    assert run(task, out, "--steps", "2", "--resume", "--learning-rate", "5e-3") == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "another learning_rate (0.01, now 0.005)" in err
    assert run(task, tmp_path / "b", "--batch-size", "0") == EXIT_USAGE
    root, bundle, train, valid = task
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0].replace("train-000", "nope") + "\n")
    assert main(["--weights", str(bundle), "--train", str(bad), "--out",
                 str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moshivis-train: error: ") and "bad.jsonl:1: image" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["--weights", str(bundle), "--train", str(train), "--valid", str(empty),
                 "--out", str(tmp_path / "d")]) == 1
    assert "empty.jsonl: no samples (an empty split)" in capsys.readouterr().err


def test_plain_moshi_is_refused(task, tmp_path, capsys):
    from moshivis_mlx.bundle import save_lm
    from moshivis_mlx.models.lm import LM, tiny

    moshi = tmp_path / "moshi"
    save_lm(LM(tiny(cross_attention=False)), moshi)
    root, _, train, _ = task
    assert main(["--weights", str(moshi), "--train", str(train), "--out",
                 str(tmp_path / "o")]) == EXIT_WEIGHTS
    assert "plain Moshi" in capsys.readouterr().err


# -- the adapters on top of a bundle ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "out"
    assert run(task, out, "--steps", "2") == 0
    return out / "adapters"


def adapter_values(lm) -> dict[str, np.ndarray]:
    from moshivis_mlx.adapters import adapter_parameters

    return {k: np.array(v.astype(mx.float32)) for k, v in adapter_parameters(lm).items()}


def test_adapters_for_another_shape_are_refused_in_one_line(trained, tmp_path):
    from moshivis_mlx.models.lm import LM, tiny

    cfg = tiny()
    cfg.dim, cfg.num_heads = 32, 2
    with pytest.raises(AdapterError) as e:
        apply_adapters(LM(cfg), trained, "bundle X")
    assert str(e.value).count("\n") == 0
    assert "trained for another backbone shape: dim 64 (the model's: 32)" in str(e.value)
    assert "use adapters trained on bundle X" in str(e.value)


def test_eval_app_and_bench_put_the_adapters_on(task, trained):
    from rich.console import Console

    from moshivis_mlx import bench
    from moshivis_mlx.app.opening import open_session
    from moshivis_mlx.app.options import ModelOptions
    from moshivis_mlx.eval.run import EvalOptions, load_models, read_trained
    from moshivis_mlx.loader import BundleOptions
    from moshivis_mlx.progress import Steps

    bundle = task[1]
    expected = {k: np.array(v) for k, v in read_adapters(trained).weights.items()}
    options = BundleOptions(weights=bundle, adapters=trained)
    models = load_models(EvalOptions("ocrvqa", bundle, bundle, bundle, bundle=options), bundle,
                         read_trained(trained))
    lm = models.answerer.session.stream.gen.lm
    assert all(np.array_equal(adapter_values(lm)[k], v) for k, v in expected.items())
    with Steps(Console(file=open(os.devnull, "w")), 4) as steps:
        opened = open_session(ModelOptions(options), steps, True)
    lm = opened.session.stream.gen.lm
    assert all(np.array_equal(adapter_values(lm)[k], v) for k, v in expected.items())
    opts = bench.BenchOptions(weights=bundle, adapters=trained, codec_frames=0,
                              image_encodes=0, scenarios=("moshivis",))
    models = bench._models(opts, {}, lambda label, total: lambda: None)
    assert all(np.array_equal(adapter_values(models.lm)[k], v) for k, v in expected.items())


def test_app_and_bench_take_adapters_on_the_command_line():
    from moshivis_mlx.cli.app import build_parser, options_from
    from moshivis_mlx.cli.bench import build_parser as bench_parser

    args = build_parser().parse_args(["--adapters", "runs/a/adapters", "--image", "x.jpg"])
    assert options_from(args).model.bundle.adapters == Path("runs/a/adapters")
    assert bench_parser().parse_args(["--adapters", "A"]).adapters == Path("A")


@pytest.mark.parametrize("quant", ["none", "q8"])
def test_convert_merges_adapters_into_a_new_bundle(task, trained, tmp_path, quant):
    from moshivis_mlx.cli.convert import main as convert

    bundle = task[1]
    out = tmp_path / "merged"
    extra = ["-q", "bf16", "--dtype", "float32"] if quant == "none" else ["-q", "q8"]
    assert convert(["--bundle", str(bundle), "--adapters", str(trained), "--out", str(out),
                    *extra]) == 0
    merged = load_lm(out)
    expected = {k: np.array(v) for k, v in read_adapters(trained).weights.items()}
    if quant == "none":
        got = adapter_values(merged)
        assert all(np.array_equal(got[k], v) for k, v in expected.items())
    else:
        from moshivis_mlx.adapters import dequantize_adapters

        assert "xa.q_proj.scales" in dict(tree_flatten(merged.parameters()))
        dequantize_adapters(merged, mx.float32)
        got = adapter_values(merged)
        for k, v in expected.items():
            np.testing.assert_allclose(got[k], v, atol=0.02 * np.abs(v).max() + 1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["adapters"] == str(trained)


def test_convert_refuses_adapters_without_a_bundle(trained, capsys):
    from moshivis_mlx.cli.convert import main as convert

    assert convert(["--moshi-weights", "x.safetensors", "--adapters", str(trained),
                    "--out", "o"]) != 0
    assert "--adapters merges into one of our bundles" in capsys.readouterr().err


# -- data parallel ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_adapters_one_process_would(task, tmp_path):
    """mlx.launch -n 2 (the ring backend over localhost): each process takes half of every
    batch, the gradients are summed; the adapters match one process on the same batches."""
    root, bundle, train, valid = task
    args = ["--weights", str(bundle), "--train", str(train), "--batch-size", "4",
            "--grad-accum", "2", "--learning-rate", "1e-2", "--p-audio", "0.3", "--steps", "3",
            "--cache", str(root / "cache")]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    bindir = Path(sys.executable).parent
    launch = [str(bindir / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port",
              str(free_port()), str(bindir / "moshivis-train"), *args,
              "--out", str(tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    one, two = adapters_of(tmp_path / "one"), adapters_of(tmp_path / "two")
    worst = max(float(np.abs(one[k] - two[k]).max() / (np.abs(one[k]).max() + 1e-12))
                for k in one)
    print(f"2 processes vs 1: largest relative difference {worst:.2e}")
    assert worst < 1e-4, f"largest relative difference {worst:.2e}"
    changed = adapters_of(tmp_path / "one")
    start = {k: np.array(v) for k, v in tree_flatten(load_lm(bundle).parameters())}
    assert any(not np.allclose(start[k], changed[k]) for k in changed)
