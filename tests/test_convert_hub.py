"""Converting from Hugging Face: Kyutai's repositories read from a Hugging Face cache made
here (tests never reach the network), offline failures, and the app's convert-once cache
(moshivis_mlx.weights_convert.hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from convert_support import assert_same_tensors, nothing_left, ok, run
from lanes import reference_wanted
from moshivis_mlx.weights_convert import hub
from moshivis_mlx.weights_convert.hub import (
    HubError,
    bundle_for_files,
    bundle_for_repo,
    resolve_repo,
)
from safetensors.numpy import save_file
from synthetic import (
    TINY_LM_CONFIG,
    TINY_TOKENIZER,
    fake_hf_repo,
    quantize_kyuteye,
    tiny_mimi_tensors,
    tiny_moshivis_pt_tensors,
    to_kyuteye_mlx,
)

from moshivis_mlx import load_mimi
from moshivis_mlx.bundle import read_config
from moshivis_mlx.quant import PRESETS

if reference_wanted():  # Kyutai's PyTorch reference, for the tests marked torch
    from reference import (
        LOGIT_TOL,
        build_moshi_lm,
        compare,
        greedy_generator,
        save_released,
        tiny_lm_kwargs,
    )

ROOT = Path(__file__).resolve().parents[1]
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER = "tokenizer_spm_32k_3.model"
COMMIT = "0123456789abcdef" * 2 + "01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test (offline, as all tests)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MOSHIVIS_MLX_CACHE", str(tmp_path / "bundles"))
    return cache


@pytest.fixture(scope="module")
def kyutai_files(tmp_path_factory) -> dict:
    """Kyutai's PyTorch Moshi (their code, tiny, random: the tests using it are marked
    torch), a Mimi and a tokenizer, as files."""
    d = tmp_path_factory.mktemp("kyutai")
    kw = tiny_lm_kwargs(context=50)
    lm = build_moshi_lm(kw, seed=3)
    save_released(lm, d / "model.safetensors")
    mimi, mimi_cfg = tiny_mimi_tensors()
    save_file(mimi, str(d / MIMI))
    (d / "mimi_config.json").write_text(json.dumps(mimi_cfg))
    (d / TOKENIZER).write_bytes(TINY_TOKENIZER)
    # A Kyutai config.json: the LM's kwargs and the names of the other files.
    (d / "config.json").write_text(json.dumps({**kw, "mimi_config_name": "mimi_config.json",
                                               "lm_gen_config": {"temp": 0.6, "top_k": 100}}))
    return {"dir": d, "lm": lm, "kwargs": kw}


def moshiko_repo(hf_cache: Path, kyutai_files: dict, repo="kyutai/moshiko-pytorch-bf16") -> Path:
    d = kyutai_files["dir"]
    names = ["model.safetensors", MIMI, TOKENIZER, "config.json", "mimi_config.json"]
    return fake_hf_repo(hf_cache, repo, {n: d / n for n in names}, commit=COMMIT)


@pytest.mark.torch
def test_hf_repo_matches_kyutais_pytorch_model(tmp_path, hf_cache, kyutai_files):
    """--hf-repo with Kyutai's PyTorch Moshi: the repository's config.json is honoured
    (settings, Mimi config, generation defaults), every file comes into the bundle, and the
    converted model gives Kyutai's tokens and logits."""
    moshiko_repo(hf_cache, kyutai_files)
    out = tmp_path / "moshiko"
    ok("--hf-repo", "kyutai/moshiko-pytorch-bf16", "--dtype", "float32", "--no-quantize",
       "--out", out)
    cfg = read_config(out)
    assert cfg["source"]["hf_repo"] == "kyutai/moshiko-pytorch-bf16"
    assert cfg["source"]["revision"] == COMMIT
    assert cfg["source"]["layout"] == "moshi-pytorch"
    assert cfg["lm"]["context"] == 50 and cfg["generation"]["audio_top_k"] == 100
    assert (out / "tokenizer.model").read_bytes() == TINY_TOKENIZER
    assert load_mimi(out).num_codebooks == 8
    worst_text, worst_audio = compare(kyutai_files["lm"], greedy_generator(out), 8)
    assert worst_text < LOGIT_TOL and worst_audio < LOGIT_TOL

    # The same files in a plain folder convert to the same bundle.
    folder = tmp_path / "folder"
    ok("--hf-repo", kyutai_files["dir"], "--dtype", "float32", "--no-quantize", "--out", folder)
    assert_same_tensors(out, folder, "model")
    assert_same_tensors(out, folder, "mimi")


@pytest.mark.torch
def test_repo_without_config_means_the_7b_settings(tmp_path, hf_cache, kyutai_files):
    d = kyutai_files["dir"]
    fake_hf_repo(hf_cache, "kyutai/old", {n: d / n for n in ("model.safetensors", MIMI, TOKENIZER)},
                 absent=("config.json",))
    files = resolve_repo("kyutai/old")
    assert files.kyutai_config is None and files.moshi_weights.name == "model.safetensors"
    # The tiny model is no 7B: the defaults do not fit, and the message says what to pass.
    rc, _, err = run("--hf-repo", "kyutai/old", "--out", tmp_path / "old")
    assert rc == 1 and "pass Kyutai's config.json" in err and err.count("\n") == 1
    assert nothing_left(tmp_path / "old")


def test_offline_with_an_empty_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and nothing cached: one line naming the files and where to get them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "bundle"
    p = subprocess.run([sys.executable, "-m", "cli.convert", "--hf-repo",
                        "kyutai/moshika-vis-pytorch-bf16", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    for piece in ("offline", "model.safetensors", MIMI, TOKENIZER,
                  "https://huggingface.co/kyutai/moshika-vis-pytorch-bf16", "--hf-repo F"):
        assert piece in p.stderr, piece
    assert nothing_left(out)


@pytest.mark.torch
def test_files_of_the_repository_can_be_chosen(tmp_path, hf_cache, kyutai_files):
    """With --hf-repo a file option names a file of the repository (Kyutai's MLX repository
    holds model.safetensors, model.q8.safetensors and model.q4.safetensors)."""
    vis = to_kyuteye_mlx(tiny_moshivis_pt_tensors())
    kyuteye = {k: mx.array(v).astype(mx.bfloat16) for k, v in vis.items()}
    d = tmp_path / "mlx_files"
    d.mkdir()
    mx.save_safetensors(str(d / "model.safetensors"), kyuteye)
    mx.save_safetensors(str(d / "model.q8.safetensors"), quantize_kyuteye(vis, 8, 64, 2))
    k = kyutai_files["dir"]
    fake_hf_repo(hf_cache, "kyutai/moshika-vis-mlx", {
        "model.safetensors": d / "model.safetensors",
        "model.q8.safetensors": d / "model.q8.safetensors",
        MIMI: k / MIMI, TOKENIZER: k / TOKENIZER, "mimi_config.json": k / "mimi_config.json",
        "config.json": json.dumps({**TINY_LM_CONFIG,
                                   "mimi_config_name": "mimi_config.json"}).encode()})
    out = tmp_path / "q8"
    ok("--hf-repo", "kyutai/moshika-vis-mlx", "--moshi-weights", "model.q8.safetensors",
       "--out", out)
    cfg = read_config(out)
    assert cfg["source"]["lm_weights"] == "model.q8.safetensors"
    assert cfg["source"]["layout"] == "kyuteye-mlx"
    # The app's choice: Kyutai's q8 file for a q8 bundle, model.safetensors otherwise.
    assert resolve_repo("kyutai/moshika-vis-mlx",
                        prefer_lm=hub._prefer_quantized("kyutai/moshika-vis-mlx",
                                                        PRESETS["q8"])
                        ).moshi_weights.name == "model.q8.safetensors"
    assert resolve_repo("kyutai/moshika-vis-mlx",
                        prefer_lm=["model.q4.safetensors"]).moshi_weights.name == \
        "model.safetensors"
    assert hub._prefer_quantized("kyutai/moshika-vis-pytorch-bf16", PRESETS["q8"]) \
        is None


@pytest.mark.torch
def test_bundle_for_repo_converts_once(tmp_path, hf_cache, kyutai_files, monkeypatch):
    moshiko_repo(hf_cache, kyutai_files)
    stages, progress = [], []
    from contextlib import contextmanager

    @contextmanager
    def stage(description):
        stages.append(description)
        yield

    path = bundle_for_repo("kyutai/moshiko-pytorch-bf16", "4", stage=stage,
                           progress=lambda what, done, total: progress.append((what, done, total)))
    assert path == tmp_path / "bundles" / "kyutai--moshiko-pytorch-bf16-q4"
    assert stages == ["download kyutai/moshiko-pytorch-bf16",
                      "convert (once) to kyutai--moshiko-pytorch-bf16-q4"]
    assert progress[-1][0] == "Mimi codec" and progress[-1][1] == progress[-1][2]
    assert read_config(path)["quantization"] == {"bits": 4, "group_size": 32}
    assert (path / "tokenizer.model").exists()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert", no_conversion)
    assert bundle_for_repo("kyutai/moshiko-pytorch-bf16", "4") == path


def test_bundle_for_repo_offline(hf_cache):
    with pytest.raises(HubError) as e:
        bundle_for_repo("kyutai/moshika-vis-pytorch-bf16", "8")
    msg = str(e.value)
    assert "offline" in msg and MIMI in msg and "--hf-repo F" in msg
    assert not (hub.cache_root() / "kyutai--moshika-vis-pytorch-bf16-q8").exists()


@pytest.mark.torch
def test_bundle_for_files(tmp_path, hf_cache, kyutai_files, monkeypatch):
    d = kyutai_files["dir"]
    args = (d / "model.safetensors", d / MIMI, d / TOKENIZER)
    with pytest.raises(HubError, match="number of attention heads"):
        bundle_for_files(*args)  # a tiny model: the 7B defaults do not fit
    with pytest.raises(HubError, match=r"\(\d+ more\).*pass its config with --mimi-config"):
        bundle_for_files(*args, config=d / "config.json")  # nor the released Mimi's config
    kw = dict(config=d / "config.json", mimi_config=d / "mimi_config.json", quantize="none")
    path = bundle_for_files(*args, **kw)
    assert path.parent == tmp_path / "bundles" and path.name.endswith("-bf16")
    assert read_config(path)["quantization"] is None
    monkeypatch.setattr(hub, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert bundle_for_files(*args, **kw) == path


@pytest.mark.torch
def test_a_repository_holding_one_of_our_bundles(tmp_path, hf_cache, kyutai_files):
    src = tmp_path / "ours"
    ok("--hf-repo", kyutai_files["dir"], "--out", src)
    fake_hf_repo(hf_cache, "someone/moshiko-moshivis-mlx-q8",
                 {p.name: p for p in src.iterdir()})
    out = tmp_path / "requantized"
    ok("--hf-repo", "someone/moshiko-moshivis-mlx-q8", "--q-bits", 4, "--out", out)
    cfg = read_config(out)
    assert cfg["source"]["layout"] == "bundle" and cfg["quantization"]["bits"] == 4
    assert np.array(mx.load(str(out / "model.safetensors"))["text_linear.weight"]).dtype \
        == np.uint32


@pytest.mark.torch
def test_dry_run_reads_only_the_remote_headers(tmp_path, hf_cache, kyutai_files, monkeypatch):
    """--dry-run --hf-repo downloads no weights: their headers come by themselves (here
    from a stand-in for the Hub's header request), the small config files are fetched."""
    from types import SimpleNamespace

    import huggingface_hub
    from moshivis_mlx.weights_convert.safetensors_io import read_header

    d = kyutai_files["dir"]
    snap = fake_hf_repo(hf_cache, "kyutai/moshiko-pytorch-bf16", {
        n: d / n for n in ("config.json", "mimi_config.json")})
    asked = []

    def header(self, repo_id, filename, **kw):
        asked.append(filename)
        table = read_header(d / filename)
        return SimpleNamespace(metadata={}, tensors={
            k: SimpleNamespace(dtype=t.dtype, shape=list(t.shape),
                               data_offsets=(t.start, t.end)) for k, t in table.items()})

    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", header)
    monkeypatch.setattr(hub, "_online", True)  # the stand-in is a Hub that answers
    text = ok("--hf-repo", "kyutai/moshiko-pytorch-bf16", "--dry-run")
    assert sorted(asked) == sorted(["model.safetensors", MIMI])
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "mimi_config.json"]
    assert "plan for kyutai/moshiko-pytorch-bf16" in text
    assert "hf://kyutai/moshiko-pytorch-bf16/model.safetensors" in text
    assert "emb.0.weight [65, 64] float32 -> audio_emb.0.weight" in text
    assert "Mimi codec -> mimi.safetensors" in text and "bundle size: bfloat16" in text
    # The header of a remote file is validated like a local one.
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata",
                        lambda self, repo_id, filename, **kw: SimpleNamespace(tensors={
                            "text_emb.weight": SimpleNamespace(dtype="BF16", shape=[1 << 40, 9],
                                                               data_offsets=(0, 2))}))
    rc, _, err = run("--hf-repo", "kyutai/moshiko-pytorch-bf16", "--dry-run")
    assert rc == 1 and "absurd shape" in err and "hf://kyutai/moshiko-pytorch-bf16" in err


def test_find_bundle_takes_the_given_weights_as_they_are(tmp_path):
    """--weights is used as converted (-q only noted); a missing or non-directory path is
    one clear error before anything is downloaded."""
    from moshivis_mlx.weights_convert.hub import find_bundle

    from moshivis_mlx.errors import WeightsError

    notes: list[str] = []
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert find_bundle(bundle, "kyutai/unused", "4", note=notes.append) == bundle
    assert notes == [f"note: -q 4 is ignored: the bundle in {bundle} is used as it was "
                     f"converted"]
    assert find_bundle(bundle, "kyutai/unused", None, note=notes.append) == bundle
    assert len(notes) == 1
    (tmp_path / "file").write_text("x")
    for path, what in ((tmp_path / "nope", "does not exist"),
                       (tmp_path / "file", "is not a directory")):
        with pytest.raises(WeightsError, match=f"weights directory {path} {what}") as e:
            find_bundle(path, "kyutai/unused")
        assert "--weights DIR" in e.value.fix
