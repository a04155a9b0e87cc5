"""Adapters as a hostile user (or a diverged run, or a bad disk) hands them over: NaN,
infinity, absurd magnitudes, integer tensors, broken files, configs that lie. Each is
refused in one line naming the file, by every reader: the app, the benchmark,
moshivis-eval, the merge into a bundle (which then writes nothing) and a resumed run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console
from train_support import build_task_bundle

from moshivis_mlx.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    adapter_parameters,
    apply_adapters,
    read_adapters,
    write_adapters,
)
from moshivis_mlx.bundle import load_lm
from moshivis_mlx.errors import EXIT_ERROR


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_task_bundle(tmp_path_factory.mktemp("adapters") / "bundle")


@pytest.fixture(scope="module")
def good(bundle, tmp_path_factory) -> Path:
    """A valid set: the bundle's own adapters, float32, a little moved."""
    lm = load_lm(bundle)
    weights = {k: (v.astype(mx.float32) + 0.01) for k, v in adapter_parameters(lm).items()}
    return write_adapters(tmp_path_factory.mktemp("good") / "adapters", weights, lm.cfg,
                          {"step": 3})


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / ADAPTER_WEIGHTS)).items()}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), {k: mx.array(v) for k, v in arrays.items()})


def _config(path: Path, change) -> None:
    doc = json.loads((path / ADAPTER_CONFIG).read_text())
    (path / ADAPTER_CONFIG).write_text(json.dumps(change(doc)))


def _value(path: Path, value: float) -> None:
    w = _tensors(path)
    k = sorted(w)[-1]
    w[k].flat[0] = value
    _save(path, w)


def _int8(path: Path) -> None:
    w = _tensors(path)
    k = sorted(w)[0]
    w[k] = np.clip(w[k] * 100, -127, 127).astype(np.int8)
    _save(path, w)


def _reshape(path: Path) -> None:
    w = _tensors(path)
    k = "xa.q_proj.weight"
    w[k] = w[k][:, :-1]
    _save(path, w)


CORRUPTIONS = {
    # name: (how, what the one line must say)
    "nan": (lambda p: _value(p, np.nan), "NaN, infinite or absurd values"),
    "inf": (lambda p: _value(p, np.inf), "NaN, infinite or absurd values"),
    "minus-inf": (lambda p: _value(p, -np.inf), "NaN, infinite or absurd values"),
    "1e30": (lambda p: _value(p, 1e30), "beyond 10000 in magnitude"),
    "int8": (_int8, "adapters are float tensors"),
    "truncated": (lambda p: (p / ADAPTER_WEIGHTS).write_bytes(
        (p / ADAPTER_WEIGHTS).read_bytes()[:200]), ADAPTER_WEIGHTS),
    "mis-shaped": (_reshape, "does not fit the model"),
    "config-not-utf8": (lambda p: (p / ADAPTER_CONFIG).write_bytes(b"\xff\xfe{}"),
                        "not UTF-8"),
    "config-nested": (lambda p: (p / ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000),
                      ADAPTER_CONFIG),
    "config-list": (lambda p: (p / ADAPTER_CONFIG).write_text("[1, 2]"), ADAPTER_CONFIG),
    "version-true": (lambda p: _config(p, lambda d: {**d, "format_version": True}),
                     "adapters format True"),
    "dim-string": (lambda p: _config(p, lambda d: {**d, "backbone": {**d["backbone"],
                                                                     "dim": "64"}}),
                   "backbone dimensions must be positive integers"),
    "dim-negative": (lambda p: _config(p, lambda d: {**d, "backbone": {**d["backbone"],
                                                                       "dim": -64}}),
                     "backbone dimensions must be positive integers"),
    "training-list": (lambda p: _config(p, lambda d: {**d, "training": [1]}),
                      '"training" must be an object'),
}


@pytest.fixture
def damaged(good, tmp_path, request) -> tuple[Path, str]:
    import shutil

    path = tmp_path / "adapters"
    shutil.copytree(good, path)
    how, says = CORRUPTIONS[request.param]
    how(path)
    return path, says


def _one_line(e: BaseException, *pieces: str) -> None:
    text = str(e)
    assert "\n" not in text, text
    for piece in pieces:
        assert piece in text, (piece, text)


@pytest.mark.parametrize("damaged", sorted(CORRUPTIONS), indirect=True)
def test_a_damaged_set_is_refused_where_it_is_read(bundle, damaged):
    path, says = damaged
    with pytest.raises(AdapterError) as e:
        apply_adapters(load_lm(bundle), path, str(bundle))  # read, then fitted to the model
    _one_line(e.value, str(path), says)


@pytest.mark.parametrize("damaged", sorted(CORRUPTIONS), indirect=True)
def test_the_merge_refuses_a_damaged_set_and_writes_nothing(bundle, damaged, tmp_path, capsys):
    from moshivis_mlx.cli.convert import main as convert

    path, says = damaged
    out = tmp_path / "merged"
    code = convert(["--bundle", str(bundle), "--adapters", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("moshivis-convert: error: ")]
    assert code == EXIT_ERROR, err  # the converter's one code for what it refuses
    assert len(lines) == 1 and "Traceback" not in err and says in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("damaged", ["nan", "1e30", "int8"], indirect=True)
def test_app_bench_and_eval_refuse_a_damaged_set(bundle, damaged):
    from moshivis_mlx import bench
    from moshivis_mlx.app.opening import open_session
    from moshivis_mlx.app.options import ModelOptions
    from moshivis_mlx.eval.run import read_trained
    from moshivis_mlx.loader import BundleOptions, load
    from moshivis_mlx.progress import Steps

    path, says = damaged
    with pytest.raises(AdapterError) as e:
        read_trained(path)  # moshivis-eval's reader
    _one_line(e.value, says)
    with pytest.raises(AdapterError) as e:
        load(bundle, adapters=path)  # the one opener of every command
    _one_line(e.value, says)
    with Steps(Console(file=open(os.devnull, "w")), 4) as steps:
        with pytest.raises(AdapterError) as e:
            open_session(ModelOptions(BundleOptions(weights=bundle, adapters=path)), steps, True)
    _one_line(e.value, says)
    opts = bench.BenchOptions(weights=bundle, adapters=path, codec_frames=0, image_encodes=0,
                              scenarios=("moshivis",))
    with pytest.raises(AdapterError) as e:
        bench._models(opts, {}, lambda label, total: lambda: None)
    _one_line(e.value, says)


def test_a_good_set_still_goes_on(bundle, good):
    lm = load_lm(bundle)
    apply_adapters(lm, good, str(bundle))
    got = {k: np.array(v.astype(mx.float32)) for k, v in adapter_parameters(lm).items()}
    want = {k: np.array(v) for k, v in read_adapters(good).weights.items()}
    assert all(np.allclose(got[k], want[k], atol=1e-2) for k in want)


def test_a_set_is_never_written_with_values_no_reader_would_take(bundle, tmp_path):
    lm = load_lm(bundle)
    weights = {k: v.astype(mx.float32) for k, v in adapter_parameters(lm).items()}
    k = sorted(weights)[0]
    weights[k] = weights[k] * float("nan")
    with pytest.raises(AdapterError, match="NaN, infinite or absurd"):
        write_adapters(tmp_path / "a", weights, lm.cfg)
    assert not (tmp_path / "a" / ADAPTER_WEIGHTS).exists()
