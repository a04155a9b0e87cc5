"""moshivis-convert as a hostile user drives it: configs of the wrong type or size, damaged
weights and tokenizers, outputs that are inputs, --force over someone's files, two
conversions at once, signals and kills mid-write, full and read-only disks, escaping
paths. Each is one line naming the file, the key or the path; nothing is lost and nothing
is left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from convert_support import nothing_left, ok, run
from safetensors.numpy import save_file
from synthetic import (
    TINY_LM_CONFIG,
    TINY_TOKENIZER,
    tiny_mimi_tensors,
    tiny_moshi_pt_tensors,
)

from moshivis_mlx.bundle import read_config

ROOT = Path(__file__).resolve().parents[1]
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER = "tokenizer_spm_32k_3.model"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Moshi, its Kyutai config, a tiny Mimi and its config, a tokenizer."""
    d = tmp_path_factory.mktemp("hostile")
    save_file(tiny_moshi_pt_tensors(), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY_LM_CONFIG))
    mimi, mimi_cfg = tiny_mimi_tensors()
    save_file(mimi, str(d / MIMI))
    (d / "mimi_config.json").write_text(json.dumps(mimi_cfg))
    (d / TOKENIZER).write_bytes(TINY_TOKENIZER)
    return {"dir": d, "lm": d / "model.safetensors", "config": d / "config.json",
            "mimi": d / MIMI, "mimi_config": d / "mimi_config.json", "tokenizer": d / TOKENIZER}


def mimi_args(files) -> tuple:
    return ("--mimi-weights", files["mimi"], "--mimi-config", files["mimi_config"])


def lm_args(files, config: Path | None = None) -> tuple:
    return ("--moshi-weights", files["lm"], "--config", config or files["config"])


def refused(out: Path, *args, rc: int = 1) -> str:
    """One line, the exit status, no traceback, no internal error, nothing left."""
    code, _, err = run(*args, "--out", out)
    assert code == rc, err
    assert err.count("\n") == 1 and err.startswith("moshivis-convert: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    assert nothing_left(out), sorted(p.name for p in out.parent.iterdir())
    return err


# -- Kyutai's config.json ---------------------------------------------------------------------

@pytest.mark.parametrize("change,expected", [
    ({"context": 1_000_000_000}, "context: 1000000000 is out of range"),
    ({"context": -5}, "context: -5 is out of range"),
    ({"num_heads": "four"}, "num_heads: expected an integer, got 'four'"),
    ({"num_heads": True}, "num_heads: expected an integer, got True"),
    ({"num_heads": 3}, "dim: 64 is not a multiple of num_heads (3)"),
    ({"depformer_num_heads": 10**9}, "depformer.num_heads: 1000000000 is out of range"),
    ({"delays": "abc"}, "delays: expected a list"),
    ({"delays": [0] * 3}, "delays: 3 delays for 17 streams"),
    ({"max_period": "long"}, "max_period: expected a number"),
    ({"lm_gen_config": {"temp_text": "hot"}}, "lm_gen_config.temp_text: expected a number"),
    ({"lm_gen_config": {"temp": -3}}, "lm_gen_config: audio_temperature: -3.0 is out of range"),
    ({"lm_gen_config": [1]}, "lm_gen_config: expected a JSON object"),
    ({"lm_kwargs": [1, 2]}, "lm_kwargs: expected a JSON object"),
    ({"xa_start": 2.5}, "xa_start: expected 'start', 'boi', 'eoi' or a token index, got 2.5"),
    ({"xa_start": [0, 4]}, "xa_start: expected 'start', 'boi', 'eoi' or a token index, got [0"),
    ({"xa_start": "begin"}, "xa_start: expected 'start', 'boi', 'eoi' or a token index, got "
                            "'begin'"),
    ({"xa_start": True}, "xa_start: expected 'start', 'boi', 'eoi' or a token index, got True"),
    ({"xa_end": -1}, "xa_end: expected 'end', 'eoi' or a token index, got -1"),
    ({"xa_end": {"at": 3}}, "xa_end: expected 'end', 'eoi' or a token index, got {'at': 3}"),
    ({"lm_kwargs": {"xa_end": "finish"}}, "xa_end: expected 'end', 'eoi' or a token index"),
    # Kyutai's values, but a scope this port's cross-attention (every token) does not run
    ({"xa_start": "boi"}, "xa_start: 'boi' limits cross-attention to part of the stream"),
    ({"xa_start": 16}, "xa_start: 16 limits cross-attention to part of the stream"),
    ({"xa_start": "start", "xa_end": 40}, "xa_end: 40 limits cross-attention to part of"),
], ids=["context-1e9", "context-negative", "heads-string", "heads-bool", "heads-not-dividing",
        "depformer-heads-1e9", "delays-string", "delays-count", "period-string",
        "temperature-string", "temperature-negative", "gen-list", "kwargs-list", "xa-float",
        "xa-list", "xa-unknown", "xa-bool", "xa-end-negative", "xa-end-object",
        "xa-end-kwargs", "xa-boi", "xa-int", "xa-end-int"])
def test_kyutai_config_values(tmp_path, files, change, expected):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_LM_CONFIG, **change}))
    err = refused(tmp_path / "out", *lm_args(files, config))
    assert str(config) in err and expected in err, err


@pytest.mark.parametrize("raw,expected", [
    (b"[1, 2]", "expected a JSON object"), (b"\xff\xfe\x00", "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"), (b"{", "invalid JSON"),
], ids=["list", "not-utf8", "nested", "invalid"])
def test_kyutai_config_that_is_not_one(tmp_path, files, raw, expected):
    config = tmp_path / "config.json"
    config.write_bytes(raw)
    err = refused(tmp_path / "out", *lm_args(files, config))
    assert str(config) in err and expected in err


def test_repository_folder_config_is_checked_too(tmp_path, files):
    """--hf-repo FOLDER: the folder's config.json is read with the same checks."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("model.safetensors", MIMI, TOKENIZER, "mimi_config.json"):
        os.link(files["dir"] / name, repo / name)
    (repo / "config.json").write_text(json.dumps({**TINY_LM_CONFIG, "context": 10**9,
                                                  "mimi_config_name": "mimi_config.json"}))
    err = refused(tmp_path / "out", "--hf-repo", repo)
    assert f"{repo / 'config.json'}: context: 1000000000 is out of range" in err
    (repo / "config.json").write_text(json.dumps({**TINY_LM_CONFIG, "num_heads": "four"}))
    assert "num_heads: expected an integer" in refused(tmp_path / "out", "--hf-repo", repo)


@pytest.mark.parametrize("key,name", [
    ("tokenizer_name", "../secret.model"), ("tokenizer_name", "/etc/passwd"),
    ("moshi_name", "../../model.safetensors"), ("mimi_config_name", "..\\x.json"),
    ("mimi_name", 42),
])
def test_repository_config_naming_files_outside(tmp_path, files, key, name):
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("model.safetensors", MIMI, TOKENIZER, "mimi_config.json"):
        os.link(files["dir"] / f, repo / f)
    (tmp_path / "secret.model").write_bytes(TINY_TOKENIZER)
    (repo / "config.json").write_text(json.dumps({**TINY_LM_CONFIG, key: name}))
    err = refused(tmp_path / "out", "--hf-repo", repo)
    assert f"{repo / 'config.json'}: {key}" in err
    assert "points outside" in err or "expected a string" in err


# -- weights and tokenizers -----------------------------------------------------------------

def _with(tmp_path: Path, files, change) -> Path:
    tensors = tiny_moshi_pt_tensors()
    change(tensors)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, str(path))
    return path


def test_nan_weights(tmp_path, files):
    def poison(t):
        t["transformer.layers.0.gating.linear_in.weight"][2, 3] = np.nan

    bad = _with(tmp_path, files, poison)
    err = refused(tmp_path / "out", "--moshi-weights", bad, "--config", files["config"])
    assert "NaN or infinite values" in err and "gating.linear_in.weight" in err


def test_infinite_mimi_weights(tmp_path, files):
    tensors, _ = tiny_mimi_tensors()
    first = sorted(k for k in tensors if k.endswith("conv.weight"))[0]
    tensors[first].flat[0] = np.inf
    save_file(tensors, str(tmp_path / "mimi.safetensors"))
    err = refused(tmp_path / "out", "--mimi-weights", tmp_path / "mimi.safetensors",
                  "--mimi-config", files["mimi_config"])
    assert "NaN or infinite values" in err and first in err


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.float64])
def test_weights_that_are_not_floats(tmp_path, files, dtype):
    def cast(t):
        t["text_emb.weight"] = (t["text_emb.weight"] * 100).astype(dtype)

    bad = _with(tmp_path, files, cast)
    err = refused(tmp_path / "out", "--moshi-weights", bad, "--config", files["config"])
    assert "expected bfloat16, float16 or float32" in err
    assert f"text_emb.weight {np.dtype(dtype).name}" in err


@pytest.mark.parametrize("data", [b"<html>Not Found</html>", b"\x0a" * 64, os.urandom(4096),
                                  b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00" + bytes(range(32))],
                         ids=["html", "newlines", "random", "protobuf-like"])
def test_garbage_tokenizer(tmp_path, files, data):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(data)
    err = refused(tmp_path / "out", *mimi_args(files), "--tokenizer", bad)
    assert f"{bad}: not a SentencePiece model" in err


def test_tokenizer_of_another_vocabulary(tmp_path, files):
    from moshivis_mlx.app.demo import train_tokenizer

    other = tmp_path / "other.model"
    other.write_bytes(train_tokenizer(80))
    err = refused(tmp_path / "out", *lm_args(files), "--tokenizer", other)
    assert "80 text pieces" in err and "96" in err


def test_missing_hundreds_of_tensors_is_one_short_line(tmp_path, files):
    """The Mimi file given as the language model: a short line, not 10 KB of names."""
    err = refused(tmp_path / "out", "--moshi-weights", files["mimi"], "--config", files["config"])
    assert len(err) < 1200


def test_deeply_nested_header(tmp_path):
    raw = b"[" * 200_000 + b"]" * 200_000
    bad = tmp_path / "nested.safetensors"
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert "nested too deeply" in refused(tmp_path / "out", "--moshi-weights", bad)


# -- outputs -----------------------------------------------------------------------------------

def test_force_over_a_file_or_a_folder_is_refused_and_leaves_nothing(tmp_path, files):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for _ in range(2):  # the second --force meets no leftover of the first
        code, _, err = run(*mimi_args(files), "--out", target, "--force")
        assert code == 1 and "is a file, not a moshivis-mlx bundle" in err
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_force_again_and_again(tmp_path, files):
    out = tmp_path / "bundle"
    for _ in range(3):
        ok(*mimi_args(files), "--out", out, "--force")
    (tmp_path / ".bundle.old").mkdir()  # what a run killed while replacing leaves
    ok(*mimi_args(files), "--out", out, "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_out_dot(tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run(*mimi_args(files), "--out", ".")
    assert code == 1 and "already exists" in err
    code, _, err = run(*mimi_args(files), "--out", ".", "--force")
    assert code == 1 and "not a moshivis-mlx bundle" in err and "internal" not in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_outputs_that_are_inputs(tmp_path, files):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(files["mimi"].read_bytes())
    before = weights.read_bytes()
    code, _, err = run("--mimi-weights", weights, "--mimi-config", files["mimi_config"],
                       "--out", weights, "--force")
    assert code == 1 and "--out" in err and "--mimi-weights" in err
    link = tmp_path / "link.safetensors"
    link.symlink_to(weights)
    code, _, err = run("--mimi-weights", link, "--mimi-config", files["mimi_config"],
                       "--out", tmp_path, "--force")
    assert code == 1 and "holds --mimi-weights" in err
    assert weights.read_bytes() == before

    bundle = tmp_path / "b"
    ok(*mimi_args(files), "--out", bundle)
    code, _, err = run("--bundle", bundle, "--out", bundle / "inner")
    assert code == 1 and "is inside --bundle" in err
    code, _, err = run("--bundle", bundle, "--out", bundle, "--force")
    assert code == 1 and "is --bundle" in err
    assert read_config(bundle)["mimi"]


def test_bundle_index_naming_a_file_outside(tmp_path, files):
    bundle = tmp_path / "b"
    ok(*mimi_args(files), "--out", bundle)
    os.rename(bundle / "mimi.safetensors", tmp_path / "outside.safetensors")
    (bundle / "mimi.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "../outside.safetensors"}}))
    err = refused(tmp_path / "out", "--bundle", bundle)
    assert "points outside" in err and "weight_map" in err


def test_bundles_are_readable_by_others(tmp_path, files):
    old = os.umask(0o022)
    try:
        ok(*mimi_args(files), "--out", tmp_path / "b")
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b" / "config.json").stat().st_mode & 0o777 == 0o644


def test_a_second_conversion_to_the_same_out_is_refused(tmp_path, files):
    """While one conversion writes --out (its lock held), another is refused at once."""
    from moshivis_mlx.fileio import staged_dir

    class Abandoned(Exception):
        pass

    out = tmp_path / "b"
    with pytest.raises(Abandoned), staged_dir(out):
        code, _, err = run(*mimi_args(files), "--out", out)
        assert code == 1 and f"{out} is being written by another process (pid {os.getpid()})" \
            in err
        raise Abandoned
    ok(*mimi_args(files), "--out", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.slow
def test_two_conversions_at_once(tmp_path, files):
    """Two processes converting to one --out at the same moment: one writes it, the other
    is refused (never both exit 0, one silently replacing the other)."""
    out = tmp_path / "b"
    args = [sys.executable, "-c", SLOW, "0.05", "-m", *map(str, mimi_args(files)), "--out",
            str(out)]
    procs = [subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [r[0] for r in results] == [0, 1], results
    assert "being written by another process" in results[1][1] or "already exists" in \
        results[1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -- signals and kills -------------------------------------------------------------------------

SLOW = """import sys, time
from moshivis_mlx.weights_convert import safetensors_io
delay = float(sys.argv.pop(1))
original = safetensors_io.SafetensorsWriter.write
def slow(self, name, array):
    time.sleep(delay)
    return original(self, name, array)
safetensors_io.SafetensorsWriter.write = slow
sys.argv.pop(1)  # -m
from moshivis_mlx.cli.convert import main
sys.exit(main(sys.argv[1:]))
"""


def _start_slow(out: Path, *args, delay: float = 0.3) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SLOW, str(delay), "-m", *map(str, args),
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    stage = out.with_name(f".{out.name}.partial")
    while not any(stage.glob("*.safetensors")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    return p


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                      (signal.SIGINT, 130)])
def test_signal_during_a_conversion_leaves_nothing(tmp_path, files, sig, code):
    out = tmp_path / "b"
    p = _start_slow(out, *mimi_args(files))
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err == "moshivis-convert: interrupted, nothing written\n"
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_conversion_left_is_cleaned_by_the_next(tmp_path, files):
    out = tmp_path / "b"
    p = _start_slow(out, *mimi_args(files))
    p.kill()
    p.wait(timeout=30)
    assert (tmp_path / ".b.partial").is_dir()  # SIGKILL cannot be caught
    ok(*mimi_args(files), "--out", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_conversion_killed_while_replacing_keeps_the_old_bundle(tmp_path, files):
    """Killed between moving the old bundle aside and renaming the new one in: the next
    run puts the old one back before anything else."""
    out = tmp_path / "b"
    ok(*mimi_args(files), "--out", out)
    os.rename(out, tmp_path / ".b.old")
    code, _, err = run(*mimi_args(files), "--out", out)
    assert code == 1 and "already exists" in err  # the old bundle is back, not replaced
    assert read_config(out)["mimi"] and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_the_app_cache_is_swept(tmp_path, monkeypatch):
    """Remains of a killed first-run conversion in the app's cache are removed by the next
    run (whichever model it asks for); a conversion under way is left alone."""
    from moshivis_mlx.fileio import staged_dir, sweep

    monkeypatch.setenv("MOSHIVIS_MLX_CACHE", str(tmp_path))
    dead = tmp_path / ".kyutai--x-q8.partial"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(bytes(1000))
    (tmp_path / ".kyutai--x-q8.lock").write_text("12345")
    with staged_dir(tmp_path / "kyutai--y-q8") as live:
        (live / "model.safetensors").write_bytes(b"being written")
        sweep(tmp_path)
        assert not dead.exists() and not (tmp_path / ".kyutai--x-q8.lock").exists()
        assert (live / "model.safetensors").exists()
    from moshivis_mlx.weights_convert.hub import HubError, bundle_for_repo

    dead.mkdir()
    with pytest.raises(HubError):
        bundle_for_repo("kyutai/none", "8")  # offline: the sweep ran first
    assert not dead.exists()


# -- disks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("err_no,expected", [
    (errno.ENOSPC, "No space left on device; free some space or choose another --out"),
    (errno.EROFS, "Read-only file system; choose an --out on a writable disk"),
    (errno.EACCES, "Permission denied; choose an --out you may write to"),
])
def test_write_errors_say_what_to_do(tmp_path, files, monkeypatch, err_no, expected):
    from moshivis_mlx.weights_convert import safetensors_io

    def fail(self, name, array):
        raise OSError(err_no, os.strerror(err_no))

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", fail)
    err = refused(tmp_path / "out", *mimi_args(files))
    assert f"cannot write the bundle {tmp_path / 'out'}: {expected}" in err


def test_read_only_output_directory(tmp_path, files, monkeypatch):
    from moshivis_mlx import fileio

    def read_only(path, flags, mode=0o777):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(fileio.os, "open", read_only)
    code, _, err = run(*mimi_args(files), "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and "Read-only file system" in err
    assert "choose an --out on a writable disk" in err and "internal" not in err


# -- the first contact -------------------------------------------------------------------------

def test_offline_is_detected_in_seconds(tmp_path):
    """No HF_HUB_OFFLINE, but the Hub cannot be reached: a few seconds, not minutes of
    retries, and the manual steps list every file the conversion needs."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               MOSHIVIS_MLX_CACHE=str(tmp_path / "cache"))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.convert", "--dry-run",
                        "--hf-repo", "kyutai/moshika-vis-pytorch-bf16"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert elapsed < 15, elapsed
    for name in ("model.safetensors", MIMI, TOKENIZER, "--hf-repo F"):
        assert name in p.stderr, name


def test_help_reads_well():
    p = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.convert", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "\\" not in p.stdout
    description = p.stdout.split("\n\n")[1].splitlines()
    assert len(description) > 1 and all(len(line) <= 100 for line in description)


def test_the_documented_sizes_are_the_dry_runs():
    """docs/CONVERT.md's size table is what --dry-run prints for the released files."""
    text = (ROOT / "docs" / "CONVERT.md").read_text()
    for manifest, row in (("moshivis.pt.json", "MoshiVis"), ("moshi_7b_lm.pt.json", "Moshi (")):
        _, out, _ = run("--dry-run", "--manifest", ROOT / "tests/data/manifests" / manifest)
        line = next(x for x in out.splitlines() if x.startswith("bundle size: "))
        sizes = [part.rsplit(" ", 2)[-2] + " GB" for part in line.split(" | ")]
        documented = next(x for x in text.splitlines() if x.startswith(f"| {row}"))
        assert [c.strip() for c in documented.split("|")[2:5]] == sizes, (documented, line)


def test_installing_prints_no_license_deprecation():
    """project.license is an SPDX string (setuptools >= 77 warns about a table, and about a
    License classifier next to it)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


@pytest.mark.parametrize("change,expected", [
    ({"num_layers": 10_000_000}, "lm.num_layers: 10000000 is out of range"),
    ({"context": 1_000_000_000}, "lm.context: 1000000000 is out of range"),
    ({"num_heads": "four"}, "lm.num_heads: expected an integer"),
])
def test_bundle_configs_are_checked_before_anything_is_built(tmp_path, change, expected):
    """--bundle with an absurd config: refused in seconds (ten million layers used to hang,
    memory climbing)."""
    import shutil

    from app_support import demo_bundle

    bundle = Path(shutil.copytree(demo_bundle(), tmp_path / "b"))
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["lm"].update(change)
    (bundle / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    err = refused(tmp_path / "out", "--bundle", bundle)
    assert time.monotonic() - t0 < 20 and f"{bundle}/config.json" in err and expected in err


def test_output_lock_refuses_a_second_holder_and_is_free_after(tmp_path):
    from moshivis_mlx.fileio import Locked, output_lock

    out = tmp_path / "run"
    with output_lock(out) as held:
        assert held == out
        with pytest.raises(Locked) as e:
            with output_lock(out, fix="use another --out"):
                pass
        assert "being written by another process" in e.value.message
        assert e.value.fix == "use another --out"
    with output_lock(out):  # released: the next run takes it
        pass
    assert not list(tmp_path.glob(".run.lock"))
