"""Bundles as a hostile user (or a broken download) leaves them: every damaged file, wrong
type, absurd size or escaping path is one line naming the file and the key, exit 4, before
anything is allocated. No "internal error", no crash, no hang."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from app_support import demo_bundle, run_main

from moshivis_mlx.app.demo import SAMPLE_SPEECH
from moshivis_mlx.bundle import load_lm, load_mimi, read_config
from moshivis_mlx.errors import EXIT_WEIGHTS, WeightsError
from moshivis_mlx.models.lm import LmConfig


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A copy of the tiny demo bundle to damage."""
    return Path(shutil.copytree(demo_bundle(), tmp_path / "bundle"))


def edit_config(bundle: Path, **lm) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["lm"].update(lm)
    (bundle / "config.json").write_text(json.dumps(cfg))


def app_refuses(bundle: Path, tmp_path: Path, capsys, *expected: str) -> str:
    """File mode on the bundle: exit 4, one error line naming what is wrong, no output."""
    out = tmp_path / "o.wav"
    t0 = time.monotonic()
    code = run_main("--weights", str(bundle), "--no-image", "--input-wav", str(SAMPLE_SPEECH),
                    "--output-wav", str(out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moshivis-mlx: error: ")]
    assert code == EXIT_WEIGHTS, err
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert not out.exists()
    assert time.monotonic() - t0 < 30
    return lines[0]


# -- the weights files ------------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["model", "mimi"])
@pytest.mark.parametrize("damage,expected", [
    (lambda data: data[: len(data) // 2], "data runs past the end of the file"),
    (lambda data: b"", "truncated (0 bytes)"),
    (lambda data: b"<html>502 Bad Gateway</html>" * 3, "not a safetensors file"),
    (lambda data: struct.pack("<Q", 7) + b"[1,2,3]", "header is not a table"),
], ids=["truncated", "empty", "html", "list-header"])
def test_damaged_weights_file(bundle, tmp_path, capsys, stem, damage, expected):
    f = bundle / f"{stem}.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    app_refuses(bundle, tmp_path, capsys, str(f), expected)


def test_deeply_nested_header(bundle, tmp_path, capsys):
    raw = b"[" * 100_000 + b"]" * 100_000
    (bundle / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    app_refuses(bundle, tmp_path, capsys, "model.safetensors", "nested too deeply")


def _rewrite(bundle: Path, stem: str, change) -> None:
    path = bundle / f"{stem}.safetensors"
    tensors = {k: np.array(v) for k, v in mx.load(str(path)).items()}
    change(tensors)
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tensors.items()})


def test_nan_and_inf_weights(bundle, tmp_path, capsys):
    def poison(t):
        t["text_emb.weight"][3, 5] = np.nan
        t["out_norm.weight"][0] = np.inf

    _rewrite(bundle, "model", poison)
    line = app_refuses(bundle, tmp_path, capsys, "NaN or infinite values", "text_emb.weight")
    assert "out_norm.weight" in line


def test_integer_weights(bundle, tmp_path, capsys):
    def to_int8(t):
        t["text_emb.weight"] = t["text_emb.weight"].astype(np.int8)

    _rewrite(bundle, "model", to_int8)
    app_refuses(bundle, tmp_path, capsys, "not float tensors", "text_emb.weight int8")


def test_weights_of_another_model_are_listed_briefly(bundle, tmp_path, capsys):
    """The Mimi file where the LM belongs: hundreds of names, one short line."""
    shutil.copy(bundle / "mimi.safetensors", bundle / "model.safetensors")
    line = app_refuses(bundle, tmp_path, capsys, "missing tensors", "more)")
    assert len(line) < 1200


# -- the index of a sharded part -------------------------------------------------------------

def _sharded(bundle: Path, weight_map) -> Path:
    index = bundle / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "..\\x.safetensors",
                                  "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_bundle(bundle, tmp_path, capsys, name):
    (tmp_path / "outside.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    index = _sharded(bundle, {"text_emb.weight": name})
    app_refuses(bundle, tmp_path, capsys, str(index), "points outside")


@pytest.mark.parametrize("doc", [{"metadata": {}}, {"weight_map": []}, {"weight_map": {}}],
                         ids=["no-weight-map", "a-list", "empty"])
def test_index_without_a_weight_map(bundle, tmp_path, capsys, doc):
    index = bundle / "model.safetensors.index.json"
    index.write_text(json.dumps(doc))
    app_refuses(bundle, tmp_path, capsys, str(index), "no weight_map")


def test_index_that_is_not_json(bundle, tmp_path, capsys):
    index = bundle / "model.safetensors.index.json"
    index.write_bytes(b"\xff\xfe{not json")
    app_refuses(bundle, tmp_path, capsys, str(index), "not UTF-8")


# -- config.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,expected", [
    ("num_heads", "four", "lm.num_heads: expected an integer, got 'four'"),
    ("num_heads", True, "lm.num_heads: expected an integer, got True"),
    ("context", 1_000_000_000, "lm.context: 1000000000 is out of range"),
    ("context", -5, "lm.context: -5 is out of range"),
    ("num_layers", 10_000_000, "lm.num_layers: 10000000 is out of range"),
    ("num_heads", 3, "lm.dim: 64 is not a multiple of num_heads (3)"),
    ("text_card", 0, "lm.text_card: 0 is out of range"),
    ("card", 1 << 30, "lm.card: 1073741824 is out of range"),
    ("delays", [0, 1], "lm.delays: 2 delays for 17 streams"),
    ("delays", [99] * 17, "lm.delays[0]: 99 is out of range"),
    ("max_period", float("nan"), "lm.max_period"),
], ids=["heads-string", "heads-bool", "context-1e9", "context-negative", "layers-1e7",
        "heads-not-dividing", "vocabulary-0", "codebook-huge", "delays-count", "delay-huge",
        "nan"])
def test_bad_config_values(bundle, tmp_path, capsys, key, value, expected):
    edit_config(bundle, **{key: value})
    app_refuses(bundle, tmp_path, capsys, f"{bundle}/config.json", expected)


def test_depformer_heads_of_a_billion(bundle, tmp_path, capsys):
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["lm"]["depformer"]["num_heads"] = 10**9
    (bundle / "config.json").write_text(json.dumps(cfg))
    app_refuses(bundle, tmp_path, capsys, "lm.depformer.num_heads: 1000000000 is out of range")


@pytest.mark.parametrize("raw,expected", [
    (b"[1, 2, 3]", "expected a JSON object"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"{" * 50_000, "invalid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"format_version": 1, "lm": [1]}).encode(), "lm: expected a JSON object"),
], ids=["list", "not-utf8", "invalid", "nested", "lm-list"])
def test_config_that_is_not_a_config(bundle, tmp_path, capsys, raw, expected):
    (bundle / "config.json").write_bytes(raw)
    app_refuses(bundle, tmp_path, capsys, "config.json", expected)


@pytest.mark.parametrize("key,value,expected", [
    ("text_temperature", "hot", "generation.text_temperature: expected a number, got 'hot'"),
    ("audio_temperature", -1, "generation.audio_temperature: -1.0 is out of range"),
    ("text_top_k", 2.5, "generation.text_top_k: expected an integer"),
    ("xa_start", 1 << 40, "generation.xa_start"),
], ids=["string", "negative", "float-k", "huge"])
def test_bad_generation_settings(bundle, tmp_path, capsys, key, value, expected):
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["generation"][key] = value
    (bundle / "config.json").write_text(json.dumps(cfg))
    app_refuses(bundle, tmp_path, capsys, "config.json", expected)


# -- will it fit? -----------------------------------------------------------------------------

def test_a_model_too_large_for_the_machine_is_refused_before_allocating(bundle, tmp_path,
                                                                        capsys):
    """A million-position context of a 4096-wide, 32-layer model: 1 TB of attention cache.
    Refused from the config, in well under a second, before a byte is allocated."""
    edit_config(bundle, dim=4096, num_heads=32, num_layers=32, context=1 << 20)
    t0 = time.monotonic()
    app_refuses(bundle, tmp_path, capsys, "the model needs", "attention cache for lm.context "
                "1048576", "this machine has", "-q q4")
    assert time.monotonic() - t0 < 10


def test_memory_check_counts_weights_and_caches(bundle, monkeypatch):
    from moshivis_mlx import bundle as bundle_mod
    from moshivis_mlx.bundle import check_fits

    cfg = LmConfig.from_dict(read_config(bundle)["lm"])
    weights = sum(f.stat().st_size for f in bundle.glob("*.safetensors"))
    monkeypatch.setattr(bundle_mod, "machine_memory", lambda: weights)  # the weights alone
    with pytest.raises(WeightsError, match="attention cache"):
        check_fits(bundle, cfg, "float32")
    monkeypatch.setattr(bundle_mod, "machine_memory", lambda: 2 * weights)
    check_fits(bundle, cfg, "float32")
    load_lm(bundle)
    load_mimi(bundle)


@pytest.mark.parametrize("data", [b"<html>Not Found</html>", b""], ids=["html", "empty"])
def test_a_garbage_tokenizer_in_a_bundle(bundle, tmp_path, capsys, data):
    (bundle / "tokenizer.model").write_bytes(data)
    app_refuses(bundle, tmp_path, capsys, "tokenizer.model", "not a SentencePiece model")
