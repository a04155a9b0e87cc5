"""moshivis-train as a hostile user drives it: absurd option values, two runs on one
`--out`, `--out` inside the bundle, a run that diverges, checkpoints damaged or half
written, a disk that fills up, kills at the worst moment, alignments and transcripts
that do not fit their audio, hours of speech. Each is refused in one line before the
model loads, or stopped in one line with nothing finite lost, or done and reported."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from moshivis_mlx.cli.train import main
from train_support import build_task_bundle, write_dialogue, write_task

from moshivis_mlx.adapters import ADAPTER_WEIGHTS, read_adapters
from moshivis_mlx.errors import EXIT_ERROR, EXIT_USAGE, EXIT_WEIGHTS
from moshivis_mlx.fileio import output_lock
from moshivis_mlx.train import checkpoint, trainer

PROG = "moshivis-train: error: "


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A bundle, and a manifest of speechless samples and one speech sample."""
    root = tmp_path_factory.mktemp("hostile")
    bundle = build_task_bundle(root / "bundle")
    train, _ = write_task(root, 6, "train", 0)
    write_dialogue(root, "talk", 1.5, [("what", 0.2, 0.4), ("red", 0.8, 1.0)])
    speech = json.dumps({"image": "images/train-000.png", "audio": "talk.wav",
                         "alignment": "talk.json"})
    train.write_text(train.read_text() + speech + "\n")
    return root, bundle, train


def args(task, out: Path, *extra: str) -> list[str]:
    root, bundle, train = task
    return ["--weights", str(bundle), "--train", str(train), "--out", str(out),
            "--batch-size", "2", "--learning-rate", "1e-2", "--p-audio", "0.3",
            "--report-every", "1", "--cache", str(root / "cache"), *extra]


def run(task, out: Path, *extra: str) -> int:
    return main(args(task, out, *extra))


def refused(capsys, code: int, expected: int, *pieces: str) -> str:
    """The run ended with `expected`, one error line holding `pieces`, no traceback."""
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith(PROG)]
    assert code == expected, captured.err + captured.out
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "internal error" not in lines[0], lines[0]
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def adapters_of(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / ADAPTER_WEIGHTS)).items()}


def leftovers(out: Path) -> list[str]:
    """Hidden temporary files or folders anywhere under `out` (and its lock)."""
    found = [str(p.relative_to(out)) for p in out.rglob(".*")]
    if (out.parent / f".{out.name}.lock").exists():
        found.append("lock")
    return found


def _no_loading(monkeypatch) -> None:
    """Loading the model fails the test: what is checked must be checked before."""
    import moshivis_mlx.bundle as bundle_mod
    import moshivis_mlx.loader as loader

    def loading(*a, **k):
        pytest.fail("the model loaded")

    monkeypatch.setattr(bundle_mod, "load_lm", loading)
    monkeypatch.setattr(loader, "load_lm", loading, raising=False)
    monkeypatch.setattr(loader, "load", loading)


# -- options ------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("--learning-rate", "1e20"), ("--learning-rate", "inf"), ("--learning-rate", "nan"),
    ("--learning-rate", "0"), ("--learning-rate", "-1e-4"),
    ("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--weight-decay", "-0.1"),
    ("--max-grad-norm", "nan"), ("--max-grad-norm", "inf"), ("--max-grad-norm", "-1"),
    ("--text-loss-weight", "inf"), ("--text-loss-weight", "nan"),
    ("--audio-loss-weight", "-1"), ("--audio-loss-weight", "inf"),
    ("--text-padding-weight", "nan"), ("--first-codebook-weight", "inf"),
    ("--user-text-weight", "nan"), ("--audio-codebooks", "0"), ("--audio-codebooks", "-3"),
    ("--keep-checkpoints", "0"), ("--keep-checkpoints", "-1"),
    ("--max-seconds", "inf"), ("--max-seconds", "nan"), ("--max-seconds", "0"),
    ("--max-seconds", "1e6"), ("--seed", "-1"), ("--seed", str(1 << 64)),
    ("--p-audio", "nan"), ("--p-audio", "1.5"), ("--steps", "0"), ("--steps", "-5"),
    ("--batch-size", "0"), ("--grad-accum", "0"), ("--val-every", "0"),
    ("--save-every", "-1"), ("--report-every", "0"), ("--val-batches", "0"),
    ("--warmup", "-1"), ("--warmup", "5000"),
]


@pytest.mark.parametrize("flag,value", BAD_OPTIONS)
def test_numeric_options_out_of_range_are_refused_before_the_model_loads(
        task, tmp_path, capsys, monkeypatch, flag, value):
    _no_loading(monkeypatch)
    out = tmp_path / "out"
    code = run(task, out, f"{flag}={value}")
    refused(capsys, code, EXIT_USAGE, flag)
    assert not out.exists() and not (tmp_path / ".out.lock").exists()


def test_a_learning_rate_times_weight_decay_of_one_is_refused(task, tmp_path, capsys):
    code = run(task, tmp_path / "o", "--learning-rate", "0.5", "--weight-decay", "2")
    refused(capsys, code, EXIT_USAGE, "--weight-decay 2 with --learning-rate 0.5")


@pytest.mark.parametrize("extra", [["--max-seconds", "inf"], ["--batch-size", "0"],
                                   ["--max-seconds", "nan"], ["--audio-codebooks", "0"]])
def test_estimate_refuses_the_same_values(capsys, extra):
    refused(capsys, main(["--estimate", *extra]), EXIT_USAGE, extra[0])


# -- where it writes -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["bundle", "inside-bundle", "manifest", "cache-in-bundle"])
def test_out_in_the_bundle_or_on_an_input_is_refused(task, tmp_path, capsys, where):
    root, bundle, train = task
    before = sorted(p.name for p in bundle.rglob("*"))
    if where == "cache-in-bundle":
        a = args(task, tmp_path / "o")
        a[a.index("--cache") + 1] = str(bundle / "cache")
        code = main(a)
        line = refused(capsys, code, EXIT_USAGE, "--cache")
    else:
        out = {"bundle": bundle, "inside-bundle": bundle / "runs" / "a", "manifest": train}[where]
        line = refused(capsys, run(task, out), EXIT_USAGE, "--out")
    assert "the bundle" in line or "--train" in line
    assert sorted(p.name for p in bundle.rglob("*")) == before
    assert not list(bundle.parent.glob(".bundle*"))


@pytest.mark.parametrize("case", ["out-file", "cache-file", "train-dir"])
def test_outputs_and_inputs_of_the_wrong_kind_are_refused_before_loading(
        task, tmp_path, capsys, monkeypatch, case):
    _no_loading(monkeypatch)
    a = args(task, tmp_path / "out")
    if case == "out-file":
        (tmp_path / "out").write_text("x")
        expect = ("write the run into", "it is a file, not a directory; give another --out")
    elif case == "cache-file":
        (tmp_path / "c").write_text("x")
        a[a.index("--cache") + 1] = str(tmp_path / "c")
        expect = ("cache the", "it is a file, not a directory; give another --cache")
    else:
        a[a.index("--train") + 1] = str(tmp_path)
        expect = (f"manifest {tmp_path}: not a file",)
    code = main(a)
    refused(capsys, code, EXIT_ERROR, *expect)


@pytest.mark.parametrize("thing", ["adapters", "log.jsonl", "run.json", "checkpoints"])
def test_something_in_the_way_of_a_write_is_one_line(task, tmp_path, capsys, thing):
    out = tmp_path / "out"
    out.mkdir()
    if thing in ("adapters", "checkpoints"):
        (out / thing).write_text("in the way")
    else:
        (out / thing).mkdir()
    code = run(task, out, "--steps", "2")
    refused(capsys, code, EXIT_WEIGHTS, f"cannot write {out / thing}",
            "move what is in the way")
    assert not leftovers(out), leftovers(out)


def test_a_second_run_on_the_same_out_is_refused_at_once(task, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _no_loading(monkeypatch)
    with output_lock(out):  # what a running moshivis-train holds
        code = run(task, out, "--steps", "2")
        line = refused(capsys, code, EXIT_ERROR, f"{out} is being written by another process")
    assert "give another --out" in line
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()


def _background(task, out: Path, *extra: str) -> subprocess.Popen:
    code = ("import sys; from moshivis_mlx.cli.train import main; "
            f"sys.exit(main({args(task, out, *extra)!r}))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _wait_for(check, timeout: float, p: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not check():
        if p.poll() is not None:
            pytest.fail(f"the run ended early: {p.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            p.kill()
            pytest.fail("timed out")
        time.sleep(0.05)


def _reports(out: Path) -> int:
    try:
        return sum(1 for line in (out / "log.jsonl").read_text().splitlines()
                   if '"loss"' in line)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                      (signal.SIGINT, 130)])
def test_two_processes_on_one_out_and_a_stop_by_a_signal(task, tmp_path, capsys, sig, code):
    """A real second run while the first trains is refused (the log holds the first's
    records only, once each); a signal then stops the first with 128 + the signal, its
    lock gone, its checkpoints whole, and --resume finishes it."""
    out = tmp_path / "out"
    p = _background(task, out, "--steps", "400", "--save-every", "2")
    _wait_for(lambda: _reports(out) >= 3, 120, p)
    assert run(task, out, "--steps", "400", "--save-every", "2", "--resume") == EXIT_ERROR
    assert "is being written by another process" in capsys.readouterr().err
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err and not leftovers(out), leftovers(out)
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "the log interleaves two runs"
    last = checkpoint.latest(out)
    assert last is not None
    assert read_adapters(out / "adapters").training["step"] == int(last.name[5:])
    assert run(task, out, "--steps", str(int(last.name[5:]) + 2), "--save-every", "2",
               "--resume") == EXIT_USAGE  # another --steps: refused, naming it
    assert "another steps" in capsys.readouterr().err


# -- divergence ------------------------------------------------------------------------------

def _unchecked(monkeypatch) -> None:
    """Lets absurd settings through the option checks: what the divergence guard sees when
    settings in range still diverge."""
    monkeypatch.setattr(trainer.TrainOptions, "check", lambda self, world=1: None)


def _finite(path: Path) -> bool:
    return all(np.isfinite(v).all() for v in adapters_of(path).values())


@pytest.mark.parametrize("extra", [["--learning-rate", "1e20"],
                                   ["--learning-rate", "1e20", "--weight-decay", "nan"],
                                   ["--text-loss-weight", "inf"]])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_finite_checkpoints(
        task, tmp_path, capsys, monkeypatch, extra):
    _unchecked(monkeypatch)
    out = tmp_path / "out"
    code = run(task, out, "--steps", "8", "--save-every", "1", *extra)
    line = refused(capsys, code, EXIT_ERROR, "the run diverged", "lower --learning-rate")
    step = int(line.split("step ")[1].split(":")[0])
    kept = checkpoint.checkpoint_dirs(out)
    assert all(_finite(c) for c in kept)
    assert [int(c.name[5:]) for c in kept] == list(range(max(1, step - 2), step))
    if kept:
        assert f"the last checkpoint ({kept[-1].name})" in line
        assert _finite(out / "adapters")
        assert read_adapters(out / "adapters").training["step"] == step - 1
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == step and "diverged" in log[-1]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert not leftovers(out)


def test_a_non_finite_checkpoint_is_never_written_nor_prunes_a_finite_one(task, tmp_path):
    out = tmp_path / "out"
    assert run(task, out, "--steps", "2", "--save-every", "1") == 0
    before = checkpoint.checkpoint_dirs(out)
    weights = read_adapters(before[-1]).weights
    bad = {k: (v * np.nan if i == 0 else v) for i, (k, v) in enumerate(sorted(weights.items()))}
    from moshivis_mlx.bundle import load_lm
    from moshivis_mlx.train.trainer import TrainOptions, make_optimizer

    lm = load_lm(task[1])
    opt = make_optimizer(TrainOptions(train=Path("x"), out=out))
    opt.init(weights)
    with pytest.raises(Exception, match="NaN, infinite or absurd"):
        checkpoint.save(out, 3, bad, opt, lm.cfg, {"settings": {}}, keep=1)
    assert checkpoint.checkpoint_dirs(out) == before and not leftovers(out)


def _damage(ckpt: Path, what: str) -> str:
    """Damages a checkpoint as a crash, a bad disk or a hand edit would; returns the
    name of the file the refusal must give."""
    if what == "nan-adapters":
        w = adapters_of(ckpt)
        k = sorted(w)[0]
        w[k][...] = np.nan
        mx.save_safetensors(str(ckpt / ADAPTER_WEIGHTS), {k: mx.array(v) for k, v in w.items()})
        return ADAPTER_WEIGHTS
    if what == "inf-moments":
        o = {k: np.array(v) for k, v in mx.load(str(ckpt / checkpoint.OPTIMIZER)).items()}
        k = next(k for k in sorted(o) if k.endswith(".v"))
        o[k][...] = np.inf
        mx.save_safetensors(str(ckpt / checkpoint.OPTIMIZER),
                            {k: mx.array(v) for k, v in o.items()})
        return checkpoint.OPTIMIZER
    if what == "truncated-optimizer":
        f = ckpt / checkpoint.OPTIMIZER
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return checkpoint.OPTIMIZER
    if what == "truncated-adapters":
        f = ckpt / ADAPTER_WEIGHTS
        f.write_bytes(f.read_bytes()[:100])
        return ADAPTER_WEIGHTS
    state = json.loads((ckpt / checkpoint.STATE).read_text())
    text = {"step-string": lambda: json.dumps({**state, "step": str(state["step"])}),
            "step-other": lambda: json.dumps({**state, "step": 99}),
            "settings-number": lambda: json.dumps({**state, "settings": 5}),
            "state-list": lambda: json.dumps([state]),
            "summary-string": lambda: json.dumps({**state, "summary": "x"}),
            "state-not-utf8": lambda: None}[what]()
    if text is None:
        (ckpt / checkpoint.STATE).write_bytes(b"\xff\xfe{" + b"\x00" * 10)
    else:
        (ckpt / checkpoint.STATE).write_text(text)
    return checkpoint.STATE


@pytest.mark.parametrize("what", ["nan-adapters", "inf-moments", "truncated-optimizer",
                                  "truncated-adapters", "step-string", "step-other",
                                  "settings-number", "state-list", "summary-string",
                                  "state-not-utf8"])
def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(task, tmp_path, capsys,
                                                                  what):
    out = tmp_path / "out"
    assert run(task, out, "--steps", "4", "--save-every", "2") == 0
    ckpt = checkpoint.latest(out)
    name = _damage(ckpt, what)
    capsys.readouterr()
    code = run(task, out, "--steps", "4", "--save-every", "2", "--resume")
    line = refused(capsys, code, EXIT_WEIGHTS, f"{ckpt}", name)
    assert f"remove {ckpt} to resume from the checkpoint before it" in line
    assert "--adapters" not in line  # an option nobody gave


# -- writes that fail, kills that leave files --------------------------------------------------

def _mlx_disk_full(monkeypatch, at_step: int) -> None:
    """The disk fills up while MLX writes the optimizer's state of `at_step`'s checkpoint:
    part of the file is written, then MLX's own error (it says only "[write] Unable to
    write", no errno)."""
    real_save = mx.save_safetensors

    def save(path, arrays, metadata=None):
        if "optimizer" in path and f"step-{at_step:08d}" in path:
            Path(path).write_bytes(b"\0" * 4096)
            raise RuntimeError(f"[write] Unable to write 1048576 bytes to file {path}.")
        return real_save(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save)


@pytest.mark.parametrize("which", ["optimizer", "adapter_config.json", "adapters.safetensors"])
def test_a_full_disk_while_saving_stops_in_one_line_and_leaves_nothing(
        task, tmp_path, capsys, monkeypatch, which):
    """`optimizer`: MLX's writer fails inside the checkpoint; `adapter_config.json`: the
    config of OUT/adapters (ENOSPC at its rename); `adapters.safetensors`: ENOSPC at OUT/
    adapters' weights."""
    out = tmp_path / "out"
    if which == "optimizer":
        _mlx_disk_full(monkeypatch, 4)
    else:
        import errno

        import moshivis_mlx.fileio as fileio

        real_replace = os.replace
        calls = {"n": 0}

        def replace(src, dst):
            if str(dst).endswith(f"adapters/{which}"):
                calls["n"] += 1
                if calls["n"] == 2:  # the second publication: step 4
                    raise OSError(errno.ENOSPC, "No space left on device", str(src))
            return real_replace(src, dst)

        import moshivis_mlx.adapters as adapters_mod

        monkeypatch.setattr(fileio.os, "replace", replace)
        monkeypatch.setattr(adapters_mod.os, "replace", replace)
    code = run(task, out, "--steps", "6", "--save-every", "2")
    line = refused(capsys, code, EXIT_WEIGHTS, "cannot write", "--resume")
    assert "space" in line or "disk" in line
    assert not leftovers(out), leftovers(out)
    assert checkpoint.latest(out) is not None
    monkeypatch.undo()
    assert run(task, out, "--steps", "6", "--save-every", "2", "--resume") == 0
    assert read_adapters(out / "adapters").training["step"] == 6
    assert not leftovers(out)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import mlx.core as mx
    import moshivis_mlx.adapters as adapters
    import moshivis_mlx.fileio as fileio
    from moshivis_mlx.train import checkpoint, trainer
    from moshivis_mlx.cli.train import main

    where, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    now = {"step": 0}
    real_replace, real_write = os.replace, trainer.write_adapters

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write_adapters(out, weights, cfg, training=None):
        if Path(out).name == "adapters":  # OUT/adapters, not a checkpoint's
            now["step"] = (training or {}).get("step")
            if where == "before-publish" and now["step"] == step:
                die()
        return real_write(out, weights, cfg, training)

    def replace(src, dst):
        if now["step"] == step and where in str(dst) and "/checkpoints/" not in str(dst):
            die()
        return real_replace(src, dst)

    trainer.write_adapters = write_adapters
    adapters.os.replace = replace
    fileio.os.replace = replace
    sys.exit(main(argv))
""")


@pytest.mark.parametrize("where", ["before-publish", "adapters.safetensors",
                                   "adapter_config.json", "run.json"])
def test_sigkill_at_the_worst_moment_then_resume(task, tmp_path, where):
    """SIGKILL after the last checkpoint but before OUT/adapters is rewritten, or while
    OUT/adapters' files or run.json are replaced: --resume removes the half-written
    files and brings OUT/adapters up to the last checkpoint."""
    out = tmp_path / "out"
    at = 0 if where == "run.json" else 4
    if where == "run.json":
        assert run(task, out, "--steps", "4", "--save-every", "2") == 0
    argv = args(task, out, "--steps", "4", "--save-every", "2",
                *(["--resume"] if where == "run.json" else []))
    if where == "run.json":
        # A run killed while it writes run.json (a resume of a finished run rewrites it).
        argv = args(task, out, "--steps", "4", "--save-every", "2", "--resume")
    done = subprocess.run([sys.executable, "-c", KILLED, where, str(at), *argv],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    if where != "before-publish":
        assert leftovers(out), "the kill left nothing: the test did not kill mid-write"
    last = checkpoint.latest(out)
    assert last.name == "step-00000004"
    if where == "before-publish":
        assert read_adapters(out / "adapters").training["step"] == 2  # stale
    assert run(task, out, "--steps", "4", "--save-every", "2", "--resume") == 0
    assert not leftovers(out), leftovers(out)
    assert read_adapters(out / "adapters").training["step"] == 4
    got, want = adapters_of(out / "adapters"), adapters_of(last)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


# -- data that does not fit ------------------------------------------------------------------

def _log_notes(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "note" in r]


def test_words_outside_the_audio_are_reported_per_sample(task, tmp_path, capsys):
    root, bundle, _ = task
    write_dialogue(tmp_path, "odd", 1.5, [("early", -0.6, -0.2), ("what", 0.2, 0.4),
                                          ("back", 0.9, 0.7), ("red", 0.8, 1.0),
                                          ("late", 4.0, 4.3), ("later", 9.0, 9.5)])
    write_task(tmp_path, 1, "m", 0)
    m = tmp_path / "m.jsonl"
    m.write_text(m.read_text() + json.dumps({"image": "images/m-000.png", "audio": "odd.wav",
                                             "alignment": "odd.json"}) + "\n")
    out = tmp_path / "out"
    a = args(task, out, "--steps", "1")
    a[a.index("--train") + 1] = str(m)
    assert main(a) == 0
    said = capsys.readouterr().out
    assert "1 sample with words dropped (" in said and "m.jsonl:2" in said
    (note,) = _log_notes(out)
    assert note["sample"].endswith("m.jsonl:2") and note["kind"] == "dropped_words"
    assert "4 of 6 words dropped" in note["note"]
    assert "1 end before they start" in note["note"]
    assert "1 start before 0 s" in note["note"]
    assert "2 start after the audio's end (1.52 s)" in note["note"]


def test_a_huge_turn_cut_to_the_window_is_reported(task, tmp_path, capsys):
    write_task(tmp_path, 2, "m", 0)
    m = tmp_path / "m.jsonl"
    lines = m.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["turns"][1]["text"] = " ".join(["red"] * 200_000)
    m.write_text(lines[0] + "\n" + json.dumps(doc) + "\n")
    out = tmp_path / "out"
    a = args(task, out, "--steps", "1", "--max-seconds", "30")
    a[a.index("--train") + 1] = str(m)
    assert main(a) == 0
    said = capsys.readouterr().out
    assert "1 sample cut to --max-seconds (" in said and "m.jsonl:2" in said
    assert said.count("m.jsonl:2") == 2  # at the start and in the last line
    (note,) = _log_notes(out)
    assert note["kind"] == "cut" and note["sample"].endswith("m.jsonl:2")
    assert "the first 375 kept" in note["note"] and "200" in note["note"]


def _babillage(root: Path, times: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from eval_support import tone_bytes

    table = pa.table({
        "sample_id": [11], "image_id": [42],
        "question_audio": [{"bytes": tone_bytes(0.5), "path": "q.wav"}],
        "question_transcript": [["what"]], "question_alignment": [[[0.0, 0.1]]],
        "answer_audio": [{"bytes": tone_bytes(0.4), "path": "a.wav"}],
        "answer_transcript": [["a", "house", "now"]],
        "answer_alignment": [times],
    })
    path = root / "b-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("times,refuse,expect", [
    ([[0.05, 0.1], [float("nan"), 0.35], [0.3, 0.4]], True, "answer word 1 'house'"),
    ([[0.05, 0.1], [0.2, float("inf")], [0.3, 0.4]], True, "answer word 1 'house'"),
    ([[-0.5, 0.1], [0.2, 0.35], [0.3, 0.4]], True, "answer word 0 'a'"),
    ([[0.05, 0.1], [0.35, 0.2], [0.3, 0.4]], False,
     "1 of 3 words dropped: 1 end before they start"),
    ([[0.05, 0.1], [0.2, 0.35], [5.0, 5.4]], False, "1 start after the audio's end"),
])
def test_babillage_timestamps_refused_or_reported(task, tmp_path, capsys, times, refuse,
                                                  expect):
    data = _babillage(tmp_path, times)
    write_task(tmp_path, 1, "m", 0)
    m = tmp_path / "m.jsonl"
    m.write_text(m.read_text() + json.dumps({"image": "images/m-000.png",
                                             "babillage": data.name, "sample_id": 11}) + "\n")
    out = tmp_path / "out"
    a = args(task, out, "--steps", "1")
    a[a.index("--train") + 1] = str(m)
    a[a.index("--cache") + 1] = str(tmp_path / "cache")
    code = main(a)
    if refuse:
        refused(capsys, code, EXIT_ERROR, "m.jsonl:2", expect, "finite and not negative")
    else:
        assert code == 0, capsys.readouterr().err
        (note,) = _log_notes(out)
        assert expect in note["note"] and note["sample"].endswith("m.jsonl:2")


# -- memory --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Mimi.*padded")
def test_a_long_dialogue_is_read_and_encoded_in_bounded_memory(task, tmp_path):
    """Two minutes of stereo speech (23 MB as float32) go through Mimi without ever being
    in memory whole: the peak of what NumPy allocates stays far below it (a few windows
    of 5 s), and the codes are those of encoding each window whole."""
    from moshivis_mlx.bundle import load_lm, load_mimi
    from moshivis_mlx.text import TextTokenizer, find_tokenizer
    from moshivis_mlx.train.dataset import Preparer
    from moshivis_mlx.train.manifest import read_manifest
    from moshivis_mlx.wav import WavWriter

    root, bundle, _ = task
    seconds, rate, window = 120, 24000, 5
    rng = np.random.default_rng(0)
    wav = tmp_path / "long.wav"
    with WavWriter(wav, rate, 2) as w:  # written in pieces: the test holds no whole copy
        for _ in range(seconds // 10):
            w.write((0.1 * rng.standard_normal((10 * rate, 2))).astype(np.float32))
    (tmp_path / "long.json").write_text(json.dumps({"alignments": [["hi", [1.0, 1.2]]]}))
    write_task(tmp_path, 1, "m", 0)
    m = tmp_path / "s.jsonl"
    m.write_text(json.dumps({"image": "images/m-000.png", "audio": "long.wav",
                             "alignment": "long.json"}) + "\n")
    cfg = load_lm(bundle).cfg
    tok = TextTokenizer(find_tokenizer(bundle), cfg.text_padding_ids)
    p = Preparer(bundle, cfg, tok, tmp_path / "cache", float(window))
    entries = read_manifest(m)
    p.mimi()
    tracemalloc.start()
    try:
        p.encode_all(entries)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = seconds * rate * 2 * 4
    assert peak < whole / 3, f"peak {peak / 1e6:.1f} MB for {whole / 1e6:.1f} MB of audio"
    samples = p.samples(entries)
    assert len(samples) == seconds // window
    assert all(s.frames == math.ceil(window * 12.5) for s in samples)
    # The last window against Mimi encoding it whole.
    from moshivis_mlx.wav import read_wav

    pcm, _ = read_wav(wav)
    mimi = load_mimi(bundle)
    piece = pcm[(seconds - window) * rate:]
    whole_codes = np.concatenate([np.asarray(mimi.encode(piece[:, c])) for c in (0, 1)])
    np.testing.assert_array_equal(samples[-1].codes[1:], whole_codes)


def test_ctrl_c_while_a_checkpoint_is_written_removes_it_and_keeps_the_others(
        task, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = mx.save_safetensors

    def save(path, arrays, metadata=None):
        if "optimizer" in path and "step-00000004" in path:
            Path(path).write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        return real_save(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save)
    code = run(task, out, "--steps", "6", "--save-every", "2")
    err = capsys.readouterr().err
    assert code == 130 and "moshivis-train: interrupted" in err and "Traceback" not in err
    assert [c.name for c in checkpoint.checkpoint_dirs(out)] == ["step-00000002"]
    assert not leftovers(out), leftovers(out)
    assert read_adapters(out / "adapters").training["step"] == 2


def test_the_cache_keeps_the_half_written_files_of_a_live_writer_only(tmp_path):
    """`--cache` may be shared by runs on other outputs: what a killed writer left goes,
    what a running one is writing stays."""
    import subprocess as sp

    gone = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                  text=True).stdout.strip()
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    dead = cache / "images" / f".abc.{gone}.partial.safetensors"
    live = cache / "images" / f".def.{os.getpid()}.partial.safetensors"
    done = cache / "images" / "abc.safetensors"
    for f in (dead, live, done):
        f.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / ".my-notes.tmp"  # the user's own hidden file in OUT stays too
    mine.write_text("x")
    removed = checkpoint.sweep(out, cache)
    assert removed == [dead] and live.exists() and done.exists() and mine.exists()
