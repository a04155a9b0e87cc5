"""Kyutai's checkpoints on Hugging Face -> a converted bundle in the cache, made once.

    bundle_for_repo("kyutai/moshika-vis-pytorch-bf16", "8")
    # ~/.cache/moshivis-mlx/kyutai--moshika-vis-pytorch-bf16-q8

A bundle already in the cache is used as is. Otherwise the repository's files are
downloaded (or found in the Hugging Face cache) and converted; when that is impossible
(offline, unknown repository) the error names the files to fetch and what to do next.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from .convert import ConvertOptions, Quantization, convert
from .safetensors_io import WeightsError

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
REPO_FILES = [LM_FILE, MIMI_FILE, TOKENIZER_FILE]
QUANTIZATIONS = {"8": Quantization(8, 64), "4": Quantization(4, 32), "none": None}


class HubError(Exception):
    """The model could not be obtained; the message says how to get it by hand."""


def cache_root() -> Path:
    """$MOSHIVIS_MLX_CACHE, else $XDG_CACHE_HOME/moshivis-mlx, else ~/.cache/moshivis-mlx."""
    env = os.environ.get("MOSHIVIS_MLX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moshivis-mlx"


def bundle_path(repo: str, quantize: str) -> Path:
    q = "bf16" if quantize == "none" else f"q{quantize}"
    return cache_root() / f"{repo.replace('/', '--')}-{q}"


def _is_complete(bundle: Path) -> bool:
    return (bundle / "config.json").exists() and (bundle / "tokenizer.model").exists()


def _manual_steps(repo: str) -> str:
    return (f"fetch {', '.join(REPO_FILES)} from https://huggingface.co/{repo} into a folder "
            f"F, convert with: moshivis-convert --moshi-weights F/{LM_FILE} --mimi-weights "
            f"F/{MIMI_FILE} --out DIR; cp F/{TOKENIZER_FILE} DIR/tokenizer.model; then run "
            f"with --weights DIR")


def _why(e: Exception) -> str:
    """A download failure in a few words."""
    name = type(e).__name__
    text = " ".join(str(e).split())
    if name == "GatedRepoError":
        return "the repository is gated: accept its terms on huggingface.co and log in"
    if name == "RepositoryNotFoundError":
        return "no such repository (or it needs a login: huggingface-cli login)"
    if name in ("LocalEntryNotFoundError", "ConnectionError", "ConnectError", "OfflineModeIsEnabled"
                ) or "offline" in text.lower() or "connect" in text.lower():
        return "offline, or huggingface.co cannot be reached, and the files are not cached"
    return f"{name}: {text[:120]}"


def download(repo: str) -> Path:
    """The repository's files, from the Hugging Face cache or the network."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=REPO_FILES + [CONFIG_FILE])
    except Exception as e:  # offline, unknown repo, HTTP errors: all end the same way
        raise HubError(f"cannot download {repo}: {_why(e)}") from None
    local = Path(local)
    missing = [f for f in REPO_FILES if not (local / f).exists()]
    if missing:
        raise HubError(f"{repo} does not have {', '.join(missing)} (is it a PyTorch Moshi / "
                       f"MoshiVis repository?)")
    return local


def bundle_for_repo(repo: str, quantize: str = "8",
                    stage: Callable[[str], AbstractContextManager] | None = None) -> Path:
    """The converted bundle for `repo` at `quantize` ("8", "4" or "none"), made if needed.

    `stage(description)`, if given, wraps the download and the conversion (a progress
    display); the download shows Hugging Face's own progress bars.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    out = bundle_path(repo, quantize)
    if _is_complete(out):
        return out
    stage = stage or (lambda description: nullcontext())
    try:
        with stage(f"download {repo}"):
            local = download(repo)
    except HubError as e:
        raise HubError(f"{e}; to do it by hand, {_manual_steps(repo)}") from None
    config = local / CONFIG_FILE
    try:
        with stage(f"convert (once) to {out.name}"):
            _convert(local, out, quantize, config if config.exists() else None)
    except (WeightsError, OSError) as e:
        raise HubError(f"cannot convert {repo}: {' '.join(str(e).split())}") from None
    return out


def _convert(local: Path, out: Path, quantize: str, config: Path | None) -> None:
    convert(ConvertOptions(
        out=out, moshi_weights=local / LM_FILE, mimi_weights=local / MIMI_FILE,
        kyutai_config=config, quantization=QUANTIZATIONS[quantize], force=True))
    shutil.copyfile(local / TOKENIZER_FILE, out / "tokenizer.model")
